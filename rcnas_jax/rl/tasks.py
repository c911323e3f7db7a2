"""Tasks and what the agent observes of them (METHOD §2-3).

A task is (dataset, attack, teacher, budget). Meta-training draws its tasks from the buffers of
config.search; fine-tuning and the baselines work on the held-out target. A task's observation
is the teacher's normalised stage vectors plus task features: LIPS (the Lipschitz coefficient of
attacked data w.r.t. the teacher), the budget, and the dataset's complexity. LIPS and the
teacher's robust error need an attack and a power iteration on a probe batch, so they are
cached per task in the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rcnas_jax.nets import arch, models
from rcnas_jax.rl.policy import Observation
from rcnas_jax.robust import attacks, lipschitz
from rcnas_jax.runtime import parallel, store

# The numpy streams of meta-training's task draws, mixed with the seed: fixed, so that a
# resumed or repeated search meets the same tasks.
PAIR_ORDER_STREAM = 7  # The order of the (dataset, attack) pairs in each cycle.
TEACHER_AND_BUDGET_STREAM = 8  # The teacher and budget of each update.


@dataclasses.dataclass(frozen=True)
class Task:
  """What the agent compresses for: a dataset, a threat model, a teacher and a MAC budget."""

  dataset: str
  attack: attacks.ThreatModel
  teacher: str
  budget_macs: int

  def key(self) -> str:
    """A stable string key for caches and reports."""
    return f"{self.dataset}|{self.attack.key()}|{self.teacher}|{self.budget_macs}"


def target_task(config: ml_collections.ConfigDict, image_size: int, num_classes: int,
                in_channels: int) -> Task:
  """The held-out task that fine-tuning optimises for."""
  t = config.search.target
  budget = t.budget_macs or int(t.budget_fraction * arch.count_macs(
      arch.teacher(t.teacher), image_size, num_classes, in_channels))
  return Task(t.dataset, attacks.parse_task_attack(t.attack, config.attack.eps,
                                                   config.attack.norm), t.teacher, budget)


def meta_task(config: ml_collections.ConfigDict, iteration: int, target: Task,
              dataset_infos: dict) -> Task:
  """The task of one meta-training update: a (dataset, attack) pair from a seeded cycle through
  the buffers (never the target's pair, every pair once per cycle), a random teacher and budget.
  """
  s = config.search
  pairs = [(d, attacks.parse_task_attack(a, config.attack.eps, config.attack.norm))
           for d in s.datasets for a in s.attacks]
  pairs = [p for p in pairs if p != (target.dataset, target.attack)]
  cycle, position = divmod(iteration, len(pairs))
  order = np.random.default_rng((config.seed, PAIR_ORDER_STREAM, cycle)).permutation(len(pairs))
  dataset, attack = pairs[order[position]]
  rng = np.random.default_rng((config.seed, TEACHER_AND_BUDGET_STREAM, iteration))
  teacher = s.teachers[rng.integers(len(s.teachers))]
  info = dataset_infos[dataset]
  teacher_macs = arch.count_macs(arch.teacher(teacher), info.image_shape[0], info.num_classes,
                                 info.image_shape[-1])
  low, high = s.budget_range
  return Task(dataset, attack, teacher, int(rng.uniform(low, high) * teacher_macs))


# ---------------------------------------------------------------------------------------------
# Probe statistics: LIPS and the teacher's robust error.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("threat", "model", "num_iters", "unroll"))
def probe_statistics(variables: dict, images: jax.Array, labels: jax.Array, key: jax.Array, *,
                     threat: attacks.ThreatModel, model, num_iters: int = 20,
                     unroll: bool = True) -> dict:
  """LIPS (mean Jacobian spectral norm at attacked probe points) and the teacher's error there."""
  logits_fn = models.logits_fn(model, variables)
  attack_key, power_key = jax.random.split(key)
  adversarial = attacks.run(threat, logits_fn, images, labels, attack_key, unroll)
  norms = lipschitz.jacobian_spectral_norm(logits_fn, adversarial, power_key, num_iters)
  error = jnp.mean(jnp.argmax(logits_fn(adversarial), -1) != labels)
  return {"lips": jnp.mean(norms), "teacher_error": error}


def probe_statistics_on_mesh(mesh: Mesh, variables: dict, images, labels, key, **settings) -> dict:
  """`probe_statistics` as host floats, with the probe batch split over `mesh`.

  Every statistic is a mean of per-example values, so splitting changes nothing but the speed;
  a probe that does not divide over the devices is replicated instead.
  """
  variables = parallel.replicate(mesh, variables)
  images, labels = parallel.shard_or_replicate(mesh, images, labels)
  stats = probe_statistics(variables, images, labels, key, **settings)
  return {k: float(v) for k, v in stats.items()}


class ProbeCache:
  """Probe statistics per key (`artifacts.probe`), kept as JSON so a resumed run reuses them."""

  def __init__(self, path: str):
    self.path = path
    self.entries = store.read_json(path, {})

  def get(self, key: str, compute) -> dict:
    """The statistics stored under `key`, computing and saving them on a miss."""
    if key not in self.entries:
      self.entries[key] = compute()
      store.write_json(self.path, self.entries)
    return self.entries[key]


# ---------------------------------------------------------------------------------------------
# The observation.
# ---------------------------------------------------------------------------------------------


def stage_features(spec: arch.NetworkSpec) -> np.ndarray:
  """(S, 4) normalised [stride, depth, width, robust] of each teacher stage."""
  return np.array([[s.stride / 2, math.log2(s.depth + 1) / 6, math.log2(s.channels) / 11,
                    float(s.block == "robust")] for s in spec.stages], np.float32)


def task_features(task: Task, probe: dict, teacher_macs: int, num_classes: int,
                  image_shape) -> np.ndarray:
  """[log1p LIPS, budget / teacher MACs, log10 budget / 10, log classes, log pixels, error]."""
  pixels = image_shape[0] * image_shape[1] * image_shape[2]
  return np.array([
      math.log1p(probe["lips"]), task.budget_macs / teacher_macs,
      math.log10(task.budget_macs) / 10, math.log(num_classes) / math.log(1000),
      math.log(pixels) / math.log(64 * 64 * 3), probe["teacher_error"]], np.float32)


def observe(task: Task, probe: dict, num_classes: int, image_shape) -> Observation:
  """The policy's view of a task."""
  spec = arch.teacher(task.teacher)
  teacher_macs = arch.count_macs(spec, image_shape[0], num_classes, image_shape[-1])
  return Observation(
      stages=jnp.asarray(stage_features(spec)),
      task=jnp.asarray(task_features(task, probe, teacher_macs, num_classes, image_shape)),
      max_downsamples=jnp.int32(arch.max_downsamples(spec, image_shape[0])))
