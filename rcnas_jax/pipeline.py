"""The main job, phase by phase; each phase resumes from what the workdir already holds.

Today: data -> adversarial training of `config.model.arch` -> evaluation on the test split
-> `results.json` / `results.md`. The RL search phases slot in before the final training.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from rcnas_jax import arch, config as config_lib, data, evaluate, models, parallel, training


def enable_compilation_cache(directory: str) -> None:
  """Persists compiled programs across processes (~5x faster start on this CPU)."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
  """The configured dataset's splits."""
  d = config.dataset
  return data.load(d.name, data_dir=d.data_dir or None, validation_size=d.validation_size,
                   seed=config.seed, download=d.download,
                   max_train_examples=d.max_train_examples or None)


def _evaluation_split(split: data.Split, max_examples: int) -> data.Split:
  """The first `max_examples` examples (all when 0)."""
  if not max_examples:
    return split
  return data.Split(split.images[:max_examples], split.labels[:max_examples])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Adversarially trains the configured network and evaluates it on the test split."""
  mesh = parallel.data_mesh()
  config_lib.validate(config, num_devices=len(jax.devices()))
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(config.compilation_cache_dir or os.path.join(workdir, "jax_cache"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))

  dataset = load_dataset(config)
  info = dataset.info
  spec = arch.teacher(config.model.arch)
  model = models.build(spec, info.num_classes, info.mean, info.std)
  print(f"{config.model.arch}: {arch.count_params(spec, info.num_classes, info.image_shape[-1]):,}"
        f" params, {arch.count_macs(spec, info.image_shape[0], info.num_classes, info.image_shape[-1]):,}"
        f" MACs; {info.name}: {len(dataset.train)} train / {len(dataset.validation)} validation /"
        f" {len(dataset.test)} test; {len(jax.devices())} {jax.default_backend()} device(s)")

  state = training.train(model, dataset.train, info.image_shape, config, workdir, mesh)
  variables = training.eval_variables(state, use_ema=config.training.ema_decay > 0)
  results = evaluate.evaluate(
      model, variables, _evaluation_split(dataset.test, config.evaluation.max_examples),
      evaluate.attacks_from_config(config.evaluation), jax.random.key(config.seed + 1), mesh,
      batch_size=config.evaluation.batch_size,
      unroll=training.unroll_attack_loops(config.attack.loop))
  table = evaluate.format_table(results)
  print(f"\nTest split of {info.name}, {config.model.arch}, eval-mode BN:\n{table}")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"arch": spec.to_dict(), "dataset": info.name, "results": results}, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the job that `config.mode` names."""
  return train_and_evaluate(config, workdir)
