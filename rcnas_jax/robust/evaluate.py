"""Clean and robust accuracy of a model on a split, with the attack settings beside every number.

The model is always evaluated in eval mode (BN running statistics), inside the attacks too.
Batches are padded to a fixed size (one compile per attack) and split over the mesh. The suite
(METHOD §7) adds AutoAttack's attacks and two composites (`attacks.COMPOSITES`), each the
point-wise worst case of its attacks, each run only on the points still robust:
- 'autoattack', AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square;
- 'aa-lite', the same without FAB-T: an upper bound on AutoAttack's robust accuracy.
Every adversarial batch is checked as AutoAttack checks it (perturbation within eps, values in
[0, 1], no NaN); a violation stops the evaluation. Given a progress file, every (attack, batch)
result is appended to it as it finishes, keyed by the attack's settings and code version, so a
killed evaluation continues where it stopped and a fixed attack never reuses stale results.
"""

from __future__ import annotations

import functools
import hashlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rcnas_jax import data
from rcnas_jax.nets import models
from rcnas_jax.robust import attacks
from rcnas_jax.runtime import parallel, preemption, store

# AutoAttack's standard version: (steps or queries, targets) per attack, 1 restart each.
STANDARD = {"apgd-ce": (100, None), "apgd-t": (100, 9), "fab-t": (100, 9), "square": (5000, None)}
# Perturbations may exceed eps by float rounding only.
TOLERANCE = 1e-5


class EvaluationError(RuntimeError):
  """An attack produced an invalid adversarial batch; the evaluation stopped."""


def settings_for(name: str, e: ml_collections.ConfigDict) -> attacks.ThreatModel:
  """The settings config.evaluation gives attack `name` (one of attacks.ATTACKS)."""
  steps = {"pgd": (e.pgd_steps, e.pgd_step_size), "cw": (e.cw_steps, e.cw_step_size),
           "apgd-ce": (e.apgd_steps, 0.0), "apgd-dlr": (e.apgd_steps, 0.0),
           "apgd-t": (e.apgd_steps, 0.0), "fab-t": (e.fab_steps, 0.0),
           "square": (e.square_queries, 0.0)}
  num_steps, step_size = steps.get(name, (1, e.eps))
  targets = e.fab_targets if name == "fab-t" else e.apgd_targets
  return attacks.ThreatModel(name, eps=e.eps, step_size=step_size, num_steps=num_steps,
                             norm=e.norm, restarts=e.restarts, num_targets=targets)


def attacks_from_config(e: ml_collections.ConfigDict,
                        names=None) -> tuple[attacks.ThreatModel, ...]:
  """The attacks of `names` (default config.evaluation.attacks) that run on every example."""
  return tuple(settings_for(name, e) for name in (names or e.attacks)
               if name not in attacks.COMPOSITES)


def composites_from_config(e: ml_collections.ConfigDict,
                           names=None) -> dict[str, tuple[attacks.ThreatModel, ...]]:
  """Per composite of `names` (default config.evaluation.attacks), its attacks in order."""
  return {name: tuple(settings_for(n, e) for n in attacks.COMPOSITES[name])
          for name in (names or e.attacks) if name in attacks.COMPOSITES}


def is_standard(components: tuple[attacks.ThreatModel, ...], num_classes: int) -> bool:
  """Whether every component runs at AutoAttack's standard settings (targets capped at the
  number of other classes, as AutoAttack caps them)."""
  def standard(a):
    steps, targets = STANDARD[a.name]
    return (a.num_steps == steps and a.restarts == 1 and
            (targets is None or min(a.num_targets, num_classes - 1) == min(targets,
                                                                            num_classes - 1)))
  return all(standard(a) for a in components)


def composite_label(name: str, components: tuple[attacks.ThreatModel, ...],
                    num_classes: int) -> str:
  """What a composite's number is: AutoAttack (standard or not) or AA-lite, and its parts."""
  parts = ", ".join(a.describe() for a in components) + ", each on the points still robust"
  if name == "aa-lite":
    return ("AA-lite (AutoAttack without FAB-T: an upper bound on AutoAttack's robust "
            f"accuracy): point-wise worst case of {parts}")
  version = ("standard version" if is_standard(components, num_classes) else
             "NOT the standard settings (APGD 100 steps, 9 targets, FAB-T 100 steps, Square "
             "5000 queries, 1 restart)")
  return f"AutoAttack ({version}): point-wise worst case of {parts}"


# ---------------------------------------------------------------------------------------------
# Per-example results, batch by batch, with a progress file.
# ---------------------------------------------------------------------------------------------


def _violations(adversarial: jax.Array, images: jax.Array, norm: str) -> jax.Array:
  """(3,) of a batch: its largest perturbation norm, how far its values leave [0, 1], and
  whether any is NaN (AutoAttack's run-time checks)."""
  delta = (adversarial - images).reshape(images.shape[0], -1)
  size = jnp.max(jnp.abs(delta), axis=1) if norm == "linf" else jnp.linalg.norm(delta, axis=1)
  outside = jnp.maximum(jnp.max(-adversarial), jnp.max(adversarial - 1.0))
  return jnp.stack([jnp.max(size), jnp.maximum(outside, 0.0),
                    jnp.any(jnp.isnan(adversarial)).astype(jnp.float32)])


def _outcome(logits_fn, adversarial: jax.Array, images: jax.Array, labels: jax.Array,
             attack: attacks.ThreatModel) -> tuple[jax.Array, jax.Array]:
  """Per example, whether it is classified right both clean and attacked (the clean point lies
  in the threat ball, so an attack never counts a misclassified point as robust, as
  AutoAttack does); and the batch's `_violations`."""
  return (robust_flags(logits_fn, adversarial, images, labels),
          _violations(adversarial, images, attack.norm))


def robust_flags(logits_fn, adversarial: jax.Array, images: jax.Array,
                 labels: jax.Array) -> jax.Array:
  """Per example, whether `logits_fn` classifies it right at the clean and adversarial point."""
  correct = lambda x: jnp.argmax(logits_fn(x), axis=-1) == labels
  return correct(images) & correct(adversarial)


def stepped_from_host(attack: attacks.ThreatModel) -> bool:
  """Whether `attack` runs one program per step from a Python loop: APGD and FAB-T on CPU,
  where XLA runs convolution gradients inside a loop on a slow path (4-5x slower here)."""
  return attack.name in attacks.STEPPED and jax.default_backend() == "cpu"


def _stages(model, variables, images, attack, target_rank):
  """(logits_fn, images as floats, the attack's stages) of one host-stepped batch."""
  logits_fn, x = models.logits_fn(model, variables), images.astype(jnp.float32) / 255.0
  num_classes = jax.eval_shape(logits_fn, x).shape[1]
  return logits_fn, x, attacks.stages(attack, num_classes, target_rank)


@functools.partial(jax.jit, static_argnames=("model", "attack"))
def _stepped_start(variables, images, labels, key, target_rank, *, model, attack):
  """The start program of a host-stepped attack."""
  logits_fn, x, stages = _stages(model, variables, images, attack, target_rank)
  return stages.start(logits_fn, x, labels, key)


@functools.partial(jax.jit, static_argnames=("model", "attack"))
def _stepped_step(variables, images, labels, i, state, target_rank, *, model, attack):
  """Step `i` (traced: one program for every step) of a host-stepped attack."""
  logits_fn, x, stages = _stages(model, variables, images, attack, target_rank)
  return stages.step(logits_fn, x, labels, i, state)


@functools.partial(jax.jit, static_argnames=("model", "attack"))
def _stepped_finish(variables, images, labels, state, target_rank, *, model, attack):
  """The finishing program of a host-stepped attack, with `_correct`'s outputs."""
  logits_fn, x, stages = _stages(model, variables, images, attack, target_rank)
  adversarial = stages.finish(logits_fn, x, labels, state)
  return _outcome(logits_fn, adversarial, x, labels, attack)


def _correct_stepped(variables, images, labels, key, target_rank, *, model: nn.Module,
                     attack: attacks.ThreatModel) -> tuple[jax.Array, jax.Array]:
  """`_correct` of an attack of attacks.STEPPED, one program per step: the same computation."""
  kwargs = dict(model=model, attack=attack)
  # Waiting for each program keeps two programs' collectives from interleaving: with many
  # virtual CPU devices on few cores, queued steps deadlocked XLA:CPU's all-gather rendezvous.
  state = jax.block_until_ready(
      _stepped_start(variables, images, labels, key, target_rank, **kwargs))
  for i in range(attack.num_steps):
    state = jax.block_until_ready(
        _stepped_step(variables, images, labels, i, state, target_rank, **kwargs))
  return _stepped_finish(variables, images, labels, state, target_rank, **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "attack", "unroll"))
def _correct(variables, images, labels, key, target_rank, *, model: nn.Module,
             attack: attacks.ThreatModel, unroll: bool) -> tuple[jax.Array, jax.Array]:
  """Per example, whether the model still classifies it correctly under `attack` (against the
  one target rank `target_rank` when given, a traced int); and the batch's `_violations`.

  `unroll` applies to PGD and CW; other loops stay rolled here (unrolled, 100 steps compile
  for minutes). On CPU APGD and FAB-T run through `_correct_stepped` instead.
  """
  unroll = unroll and attack.name in ("pgd", "cw")
  logits_fn = models.logits_fn(model, variables)
  x = images.astype(jnp.float32) / 255.0
  adversarial = attacks.run(attack, logits_fn, x, labels, key, unroll, target_rank)
  return _outcome(logits_fn, adversarial, x, labels, attack)


def check_batch(violations, attack: attacks.ThreatModel, batch: int) -> None:
  """Raises EvaluationError (one line) when a batch broke the threat model."""
  size, outside, nan = (float(v) for v in violations)
  where = f"evaluation stopped: {attack.describe()}, batch {batch}"
  if nan:
    raise EvaluationError(f"{where}: NaN in the adversarial images")
  if outside > TOLERANCE:
    raise EvaluationError(f"{where}: adversarial values leave [0, 1] by {outside:.3g}")
  if size > attack.eps * (1 + TOLERANCE) + TOLERANCE:
    raise EvaluationError(f"{where}: a perturbation of {attack.norm} norm {size:.6g} exceeds "
                          f"eps={attack.eps:.6g}")


def _padded_batches(split: data.Split, batch_size: int):
  """Fixed-size batches with a validity mask (the last one padded by repeating example 0)."""
  for start in range(0, len(split), batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    valid = len(labels)
    pad = batch_size - valid
    if pad:
      images = np.concatenate([images, np.repeat(split.images[:1], pad, 0)])
      labels = np.concatenate([labels, np.repeat(split.labels[:1], pad, 0)])
    yield images, labels, np.arange(batch_size) < valid


class Progress:
  """Per-(attack, batch) results appended to a JSONL file, read back on restart (None = off)."""

  def __init__(self, path: str | None):
    self.path = path
    self.done = {(r["tag"], r["batch"]): r for r in store.read_jsonl(path)} if path else {}

  def get(self, tag: str, batch: int) -> dict | None:
    return self.done.get((tag, batch))

  def put(self, tag: str, batch: int, correct: np.ndarray, seconds: float) -> None:
    record = {"tag": tag, "batch": batch, "correct": "".join("01"[int(c)] for c in correct),
              "seconds": round(seconds, 3)}
    self.done[(tag, batch)] = record
    if self.path:
      store.append_jsonl(self.path, [record])


def _batch_size(batch_size: int, count: int, mesh: Mesh) -> int:
  """`batch_size`, shrunk for small splits, a multiple of the mesh size."""
  devices = len(mesh.devices.flat)
  return min(batch_size, -(-count // devices) * devices)


def points_digest(index: np.ndarray) -> str:
  """A short name of a set of example indices, for progress tags."""
  return hashlib.sha256(np.asarray(index, np.int64).tobytes()).hexdigest()[:12]


def correct_flags(model: nn.Module, variables: dict, split: data.Split,
                  attack: attacks.ThreatModel, key: jax.Array, mesh: Mesh, *,
                  batch_size: int = 256, unroll: bool = True, progress: Progress | None = None,
                  tag: str = "") -> tuple[np.ndarray, float]:
  """Per example of `split`, correct under `attack`; and the attack's compute seconds.

  A targeted attack runs as AutoAttack runs it: target rank by target rank, each only on the
  points still robust (one program for every rank; the result equals the all-targets worst
  case, as each example keeps any target's adversarial point).
  """
  progress = progress or Progress(None)
  if attack.name not in attacks.TARGETED:
    return _batched_flags(model, variables, split, attack, key, mesh, None,
                          batch_size=batch_size, unroll=unroll, progress=progress, tag=tag)
  robust, seconds = np.ones(len(split), bool), 0.0
  for rank in range(2, min(attack.num_targets, model.num_classes - 1) + 2):
    index = np.flatnonzero(robust)
    flags, spent = _batched_flags(
        model, variables, data.Split(split.images[index], split.labels[index]), attack,
        jax.random.fold_in(key, rank), mesh, rank, batch_size=batch_size, unroll=unroll,
        progress=progress, tag=f"{tag}target={rank}|points={points_digest(index)}|")
    robust[index] = flags
    seconds += spent
  return robust, seconds


def _batched_flags(model, variables, split, attack, key, mesh, target_rank, *, batch_size,
                   unroll, progress, tag) -> tuple[np.ndarray, float]:
  """`correct_flags` of one attack (one target rank, or None), batch by batch."""
  if len(split) == 0:
    return np.zeros(0, bool), 0.0
  batch_size = _batch_size(batch_size, len(split), mesh)
  tag = f"{tag}{attack.describe()}|v{attack.version}|n={len(split)}|batch={batch_size}"
  flags, seconds = [], 0.0
  for i, (images, labels, mask) in enumerate(_padded_batches(split, batch_size)):
    record = progress.get(tag, i)
    if record is None:
      preemption.check(f"evaluation ({attack.describe()}, batch {i})")
      started = time.perf_counter()
      images, labels = parallel.shard_batch(mesh, images, labels)
      rank = None if target_rank is None else jnp.int32(target_rank)
      run = _correct_stepped if stepped_from_host(attack) else functools.partial(
          _correct, unroll=unroll)
      correct, violations = run(variables, images, labels, jax.random.fold_in(key, i), rank,
                                model=model, attack=attack)
      check_batch(violations, attack, i)
      progress.put(tag, i, parallel.gather(correct)[mask], time.perf_counter() - started)
      record = progress.get(tag, i)
    flags.append(np.array([c == "1" for c in record["correct"]], bool))
    seconds += record["seconds"]
  return np.concatenate(flags), seconds


def _result(correct: np.ndarray, attack: str, seconds: float) -> dict:
  """The reported entry of one attack."""
  return {"accuracy": float(np.mean(correct)), "n_examples": int(len(correct)),
          "attack": attack, "seconds": round(seconds, 2)}


def robust_accuracy(model: nn.Module, variables: dict, split: data.Split,
                    attack: attacks.ThreatModel, key: jax.Array, mesh: Mesh, *,
                    batch_size: int = 256, unroll: bool = True,
                    progress: Progress | None = None) -> dict:
  """Accuracy under `attack` on `split`: {accuracy, n_examples, attack, seconds}."""
  variables = parallel.replicate(mesh, variables)
  correct, seconds = correct_flags(model, variables, split, attack, key, mesh,
                                   batch_size=batch_size, unroll=unroll, progress=progress)
  return _result(correct, attack.describe(), seconds)


def composite(model: nn.Module, variables: dict, split: data.Split, name: str,
              components: tuple[attacks.ThreatModel, ...], robust: np.ndarray, key: jax.Array,
              mesh: Mesh, *, batch_size: int = 256, unroll: bool = True,
              progress: Progress | None = None, known: dict | None = None) -> dict:
  """The point-wise worst case of `components`, each run only on the points still robust.

  `robust` is the clean-correct mask; `known` maps settings to (per-example flags, seconds)
  already computed on the whole split (reused, with their time, instead of running again).
  The result's 'after' gives the robust accuracy after each component, 'standard' whether
  every component ran at AutoAttack's standard settings. A component's key and progress tag
  depend only on the attack, its settings and the points it runs on, so composites that share
  a prefix of components (AutoAttack and AA-lite) share its results.
  """
  variables = parallel.replicate(mesh, variables)
  robust, seconds, after = robust.copy(), 0.0, {}
  for attack in components:
    if known and attack in known:
      robust &= known[attack][0]
      seconds += known[attack][1]
    else:
      index = np.flatnonzero(robust)
      flags, spent = correct_flags(
          model, variables, data.Split(split.images[index], split.labels[index]), attack,
          jax.random.fold_in(key, attacks.ATTACKS.index(attack.name)), mesh,
          batch_size=batch_size, unroll=unroll, progress=progress,
          tag=f"composite|points={points_digest(index)}|")
      robust[index] = flags
      seconds += spent
    after[attack.name] = float(np.mean(robust))
  label = composite_label(name, components, model.num_classes)
  return {**_result(robust, label, seconds), "after": after,
          "standard": is_standard(components, model.num_classes), "robust": robust}


def evaluate(model: nn.Module, variables: dict, split: data.Split,
             attack_list: tuple[attacks.ThreatModel, ...], key: jax.Array, mesh: Mesh, *,
             batch_size: int = 256, unroll: bool = True,
             composites: dict[str, tuple[attacks.ThreatModel, ...]] | None = None,
             progress_path: str | None = None) -> dict[str, dict]:
  """Results keyed by attack name: each of `attack_list`, then each of `composites`.

  A composite reuses the per-example results of its attacks that are in `attack_list`.
  """
  progress = Progress(progress_path)
  variables = parallel.replicate(mesh, variables)
  results, known = {}, {}
  for i, a in enumerate(attack_list):
    correct, seconds = correct_flags(model, variables, split, a, jax.random.fold_in(key, i),
                                     mesh, batch_size=batch_size, unroll=unroll,
                                     progress=progress)
    known[a] = (correct, seconds)
    results[a.name] = _result(correct, a.describe(), seconds)
  if composites:
    clean = next((flags for a, (flags, _) in known.items() if a.name == "clean"), None)
    if clean is None:
      clean = correct_flags(model, variables, split, attacks.ThreatModel("clean"), key, mesh,
                            batch_size=batch_size, progress=progress)[0]
  for name, components in (composites or {}).items():
    result = composite(model, variables, split, name, components, clean,
                       jax.random.fold_in(key, len(attack_list)), mesh,
                       batch_size=batch_size, unroll=unroll, progress=progress, known=known)
    del result["robust"]
    results[name] = result
  return results


def format_table(results: dict[str, dict]) -> str:
  """A Markdown table: attack, accuracy, examples, settings, seconds."""
  rows = ["| attack | accuracy (%) | examples | settings | time (s) |",
          "|---|---:|---:|---|---:|"]
  for name, r in results.items():
    rows.append(f"| {name} | {100 * r['accuracy']:.2f} | {r['n_examples']} | {r['attack']} | "
                f"{r.get('seconds', 0):.1f} |")
  return "\n".join(rows)
