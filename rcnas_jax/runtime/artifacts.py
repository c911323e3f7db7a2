"""What every cached artifact of a workdir is computed from, and the key it is stored under.

A workdir belongs to one configuration. Each artifact (a teacher, a task's probe statistics, a
proxy evaluation, a search phase, a final training, a test-split evaluation, an export) is
stored under a key: a hash of its format version and of exactly the config fields, and the
upstream artifacts, it is computed from. A rerun with changed fields finds every artifact whose
inputs did not change and recomputes the others under new keys, so nothing computed under other
settings is ever mixed in. Bump an artifact's version when the code changes what it computes.

Upstream artifacts enter a key by their own key, or, for trained weights, by a hash of the
weights themselves (`weights_digest`), so a loaded teacher and a trained one are told apart.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import numpy as np

# The format version of each artifact: bump it when the code changes what the artifact holds.
# (evaluation 3, phase 2, training 2: a student's fresh weights are drawn on the host, and a
# point counts as robust only where it is also right clean; test-evaluation 2: that rule.)
VERSIONS = {"teacher": 1, "probe": 1, "evaluation": 3, "phase": 2, "training": 2,
            "test-evaluation": 2, "export": 1}

# Fields that change how a run computes, not what: they never enter a key, and
# `--config.resume=strict` ignores them. Rolled and unrolled loops run the same attack; a
# student on its masked family network computes what it computes on its own, and XLA's
# optimisation level changes only float rounding.
EXECUTION_ONLY = ("resume", "compilation_cache_dir", "dataset.data_dir", "dataset.download",
                  "distributed", "parallel", "attack.loop", "evaluation.loop",
                  "search.proxy.programs", "search.proxy.cpu_optimization_level",
                  "training.log_every_steps", "training.checkpoint_every_steps")

# Fields that reach keys through a value derived from them rather than by name: which job and
# which artifacts run (mode, the baselines), the task (its dataset, attack and budget), the
# student's spec, the teacher's weights, the attacks that run, a phase's length (a longer run
# of a phase extends a shorter one; fine-tuning keys on meta-training's length). The
# gradient-masking checks (check_examples) are not cached: they run every time.
INDIRECT = ("mode", "checkpoint", "dataset.name", "model.arch", "teacher.checkpoint_dir",
            "search.target", "search.meta_updates", "search.finetune_updates",
            "search.baselines", "search.selection.top_k", "evaluation.attacks", "evaluation.suite",
            "evaluation.check_examples")

# The splits of a dataset (and the model's normalisation, their statistics), carved by
# `dataset.split_seed`; and `seed`, which every initialisation and sample draws from.
DATA = ("seed", "dataset.split_seed", "dataset.validation_size", "dataset.max_train_examples",
        "dataset.max_image_size")
# What an adversarial training computes from, besides its data, start and length.
RECIPE = ("training.method", "training.trades_beta", "training.batch_size",
          "training.learning_rate", "training.momentum", "training.nesterov",
          "training.weight_decay", "training.schedule", "training.decay_points",
          "training.warmup_epochs", "training.grad_clip", "training.ema_decay",
          "training.distill_weight", "training.distill_temperature", "attack.eps",
          "attack.step_size", "attack.num_steps", "attack.norm", "dataset.crop_padding",
          "dataset.flip", "model.dtype")
# A proxy training (env.proxy_config): config.search.proxy replaces the schedule, the learning
# rate, the batch, the attack's steps and distillation; the rest comes from the recipe.
PROXY = ("search.proxy.epochs", "search.proxy.train_examples",
         "search.proxy.validation_examples", "search.proxy.batch_size",
         "search.proxy.learning_rate", "search.proxy.method", "search.proxy.attack_steps",
         "search.proxy.distill_weight", "search.selection.examples", "training.trades_beta", "training.momentum",
         "training.weight_decay", "training.grad_clip", "training.distill_temperature",
         "attack.eps", "attack.norm", "dataset.crop_padding", "dataset.flip", "model.dtype")
PROBE = ("search.probe_size", "search.lipschitz_iterations")
# What every search phase shares: how actions become students and students rewards.
SEARCH = ("search.students_per_update", "search.width_multiple", "search.beta")
POLICY = ("search.policy",)
EVOLUTION = ("search.evolution",)
META_TASKS = ("search.datasets", "search.attacks", "search.teachers", "search.budget_range")
# The attacks themselves enter a test evaluation's key as the list that runs (their order seeds
# them): evaluation.attacks, or in mode='evaluate' evaluation.suite.
TEST_EVALUATION = ("seed", "dataset.max_image_size", "evaluation.eps", "evaluation.norm",
                   "evaluation.pgd_steps", "evaluation.pgd_step_size", "evaluation.cw_steps",
                   "evaluation.cw_step_size", "evaluation.apgd_steps", "evaluation.apgd_targets",
                   "evaluation.fab_steps", "evaluation.fab_targets",
                   "evaluation.square_queries", "evaluation.restarts", "evaluation.batch_size",
                   "evaluation.max_examples")


def digest(value: Any) -> str:
  """A short stable hash of a JSON-able value (dict order does not matter)."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
  if isinstance(value, tuple):
    return list(value)
  if hasattr(value, "to_dict"):
    return value.to_dict()
  raise TypeError(f"cannot hash a {type(value).__name__}")


def weights_digest(tree: Any) -> str:
  """A hash of a pytree of arrays: its structure, shapes, dtypes and bytes."""
  import jax  # Imported here: the rest of this module is plain Python.
  h = hashlib.sha256()
  leaves, structure = jax.tree.flatten(tree)
  h.update(str(structure).encode())
  for leaf in leaves:
    array = np.asarray(leaf)
    h.update(f"{array.shape}{array.dtype}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()[:16]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Leaf fields of a (nested) config as {'training.epochs': 100, ...}."""
  fields = {}
  for name, value in config.items():
    path = f"{prefix}{name}"
    if isinstance(value, Mapping):
      fields.update(flatten(value, path + "."))
    else:
      fields[path] = list(value) if isinstance(value, tuple) else value
  return fields


def _within(field: str, groups: Iterable[str]) -> bool:
  """Whether `field` is one of `groups` or inside one of them (a section name)."""
  return any(field == g or field.startswith(g + ".") for g in groups)


def select(config, groups: Iterable[str]) -> dict[str, Any]:
  """The values of the fields named by `groups` (fields or whole sections)."""
  groups = tuple(groups)
  return {f: v for f, v in flatten(config.to_dict()).items() if _within(f, groups)}


def key(artifact: str, config=None, groups: Iterable[str] = (), **inputs) -> str:
  """The key of `artifact`: its version, the fields of `groups` and the other `inputs`."""
  fields = select(config, groups) if config is not None else {}
  return digest({"artifact": artifact, "version": VERSIONS[artifact], "fields": fields,
                 **inputs})


def changed_fields(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
  """'field (old -> new)' for every result field that differs between two flat configs."""
  changes = []
  for field in sorted(set(before) | set(after)):
    if _within(field, EXECUTION_ONLY):
      continue
    old, new = before.get(field, "<unset>"), after.get(field, "<unset>")
    if old != new:
      changes.append(f"{field} ({old!r} -> {new!r})")
  return changes


# ---------------------------------------------------------------------------------------------
# The artifacts.
# ---------------------------------------------------------------------------------------------


def teacher(config, dataset: str, name: str) -> str:
  """A teacher trained here: its data, the recipe and teacher.epochs."""
  return key("teacher", config, DATA + RECIPE + ("teacher.epochs",), dataset=dataset,
             teacher=name)


def probe(config, task_key: str, teacher_weights: str) -> str:
  """LIPS and the teacher's error on a task's probe batch."""
  return key("probe", config, DATA + PROBE, task=task_key, teacher=teacher_weights)


def _proxy_groups(config) -> tuple[str, ...]:
  """PROXY, and the training method when the proxy inherits it."""
  return PROXY + (() if config.search.proxy.method else ("training.method",))


def evaluation(config, task_key: str, spec: dict, teacher_weights: str) -> str:
  """One student's proxy training and validation robust accuracy on one task."""
  return key("evaluation", config, DATA + _proxy_groups(config), task=task_key, spec=spec,
             teacher=teacher_weights)


def phase(config, name: str, teacher_weights: Mapping[str, str], target_key: str,
          meta: str | None = None) -> str:
  """A search phase: its policy updates and episodes (any length: a longer run extends it).

  Every phase depends on its tasks, how students are evaluated (proxy, probes) and rewarded;
  the learning phases on the policy settings; fine-tuning on the meta-trained policy (`meta`:
  the meta phase's key and length).
  """
  groups = DATA + _proxy_groups(config) + SEARCH + ("attack.eps", "attack.norm")
  if name in ("meta", "finetune", "rnas"):
    groups += PROBE + POLICY
  if name == "evolution":
    groups += EVOLUTION
  if name == "meta":
    groups += META_TASKS
  return key("phase", config, groups, phase=name, target=target_key,
             teachers=dict(sorted(teacher_weights.items())), meta=meta)


def training(config, dataset: str, spec: dict, start: str | None) -> str:
  """A full adversarial training of `spec` on `dataset`; `start`: the teacher it inherits from."""
  return key("training", config, DATA + RECIPE + ("training.epochs",), dataset=dataset,
             spec=spec, start=start)


def test_evaluation(config, dataset: str, weights: str, attacks=None) -> str:
  """`attacks` (default evaluation.attacks) on `dataset`'s test split, for `weights`' weights."""
  return key("test-evaluation", config, TEST_EVALUATION, dataset=dataset, weights=weights,
             attacks=list(attacks or config.evaluation.attacks))
