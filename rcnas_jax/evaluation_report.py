"""mode='evaluate': the evaluation suite on an exported student, reported RobustBench-style.

  python -m rcnas_jax.main --config=configs/quickstart.py --config.mode=evaluate \
      --config.checkpoint=workdir/quickstart/export --workdir=workdir/quickstart_evaluation

Runs config.evaluation.suite (clean, FGSM, PGD, CW, APGD-CE, APGD-T, Square, AA-lite) on the test
split in eval mode, then the gradient-masking checks, and writes `robustness.json`
(architecture, params, MACs, dataset, threat model, eps, clean and per-attack robust accuracy,
aa_lite_acc, n_examples, warnings) and `robustness.md`. Per-(attack, batch) results go to
`evaluation-<key>.jsonl` as they finish, named after the weights and every evaluation setting:
run the same command again after a kill to continue.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from rcnas_jax import (arch, artifacts, config as config_lib, data, evaluate, export,
                       gradient_masking, models, parallel, store, training)


def _architecture(spec: arch.NetworkSpec) -> str:
  """A one-line description, e.g. 'pre-act ResNet: stem 16, stages 2x16 basic /1, ...'."""
  stages = ", ".join(f"{s.depth}x{s.channels} {s.block} /{s.stride}" for s in spec.stages)
  return f"pre-act ResNet ({spec.activation}): stem {spec.stem_channels}, stages {stages}"


def _eps_label(eps: float, norm: str) -> str:
  """RobustBench's eps string: '8/255' for L-inf radii on that grid, else the number."""
  if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
    return f"{round(eps * 255)}/255"
  return f"{eps:g}"


def robustbench_entry(student: export.Student, dataset: str, results: dict[str, dict],
                      e: ml_collections.ConfigDict, warnings: list[str], name: str) -> dict:
  """RobustBench's model-info fields (accuracies in %) plus our per-attack details."""
  percent = lambda r: round(100 * r["accuracy"], 2)
  aa_lite = results.get("aa-lite")
  return {
      "name": name, "architecture": _architecture(student.spec),
      "spec": student.spec.to_dict(), "params": student.meta["params"],
      "macs": student.meta["macs"], "dataset": dataset,
      "threat_model": "Linf" if e.norm == "linf" else "L2", "eps": _eps_label(e.eps, e.norm),
      "clean_acc": percent(results["clean"]) if "clean" in results else None,
      "robust_acc": {k: percent(r) for k, r in results.items() if k != "clean"},
      "aa_lite_acc": percent(aa_lite) if aa_lite else None,
      "n_examples": next(iter(results.values()))["n_examples"],
      "attacks": {k: {"settings": r["attack"], "seconds": r["seconds"],
                      **({"after": r["after"]} if "after" in r else {})}
                  for k, r in results.items()},
      "unreliable_evaluation": bool(warnings), "warnings": warnings,
  }


def markdown(entry: dict, results: dict[str, dict]) -> str:
  """The report as Markdown: a header line, the attack table and the warnings."""
  lines = [f"# Robustness of {entry['name']}", "",
           f"{entry['architecture']}; {entry['params']:,} params, {entry['macs']:,} MACs. "
           f"{entry['dataset']} test split, {entry['n_examples']} examples, threat model "
           f"{entry['threat_model']} eps={entry['eps']}, eval-mode BN.", "",
           evaluate.format_table(results), ""]
  if "aa-lite" in results:
    after = ", ".join(f"{k} {100 * v:.2f}%" for k, v in results["aa-lite"]["after"].items())
    lines += [f"AA-lite, robust accuracy after each attack: {after}.", ""]
  lines += [f"- WARNING (possible gradient masking): {w}" for w in entry["warnings"]]
  if not entry["warnings"]:
    lines.append("Gradient-masking checks: no warning.")
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the student at config.checkpoint; writes robustness.json and robustness.md."""
  e = config.evaluation
  student = export.load_student(config.checkpoint)
  dataset_name = student.meta.get("dataset") or config.dataset.name
  d = config.dataset
  dataset = data.load(dataset_name, data_dir=d.data_dir or None,
                      validation_size=d.validation_size, seed=config.seed, download=d.download,
                      max_train_examples=d.max_train_examples or None,
                      max_image_size=d.max_image_size or None)
  if tuple(dataset.info.image_shape) != tuple(student.meta["image_shape"]):
    raise config_lib.ConfigError(
        f"config.dataset: {dataset_name} images are {dataset.info.image_shape}, the student at "
        f"{config.checkpoint} takes {tuple(student.meta['image_shape'])} (check "
        "dataset.max_image_size)")
  model = models.build(student.spec, student.meta["num_classes"], student.meta["mean"],
                       student.meta["std"])
  split = data.sample(dataset.test, e.max_examples)
  key = jax.random.key(config.seed + 1)
  names = tuple(e.suite) or tuple(e.attacks)
  # Named after the weights and every evaluation setting, so no other run's results are reused.
  progress_key = artifacts.test_evaluation(config, dataset_name,
                                           artifacts.weights_digest(student.variables), names)
  results = evaluate.evaluate(
      model, student.variables, split, evaluate.attacks_from_config(e, names), key,
      parallel.data_mesh(), batch_size=e.batch_size,
      unroll=training.unroll_attack_loops(e.loop),
      aa_lite_attacks=evaluate.aa_lite_from_config(e, names),
      progress_path=os.path.join(workdir, f"evaluation-{progress_key}.jsonl"))
  warnings = []
  if e.check_examples:
    probe = data.sample(split, e.check_examples)
    logits_fn = jax.tree_util.Partial(lambda v, x: model.apply(v, x, train=False),
                                      student.variables)
    warnings = gradient_masking.run_all(
        logits_fn, np.asarray(probe.images, np.float32) / 255.0, probe.labels,
        jax.random.fold_in(key, 10_000), eps=e.eps, norm=e.norm, results=results)
  entry = robustbench_entry(student, dataset_name, results, e, warnings,
                            "/".join(os.path.normpath(config.checkpoint).split(os.sep)[-2:]))
  store.write_json(os.path.join(workdir, "robustness.json"), entry)
  text = markdown(entry, results)
  store.write_text(os.path.join(workdir, "robustness.md"), text)
  print("\n" + text)
  return entry
