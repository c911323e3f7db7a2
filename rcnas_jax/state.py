"""Tasks and what the agent observes of them (METHOD §2-3).

A task is (dataset, attack, teacher, budget). Its observation is the teacher's normalised
stage vectors plus task features: LIPS (the Lipschitz coefficient of attacked data w.r.t. the
teacher), the budget, and the dataset's complexity. LIPS and the teacher's robust error need
an attack and a power iteration on a probe batch, so they are cached per task in the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from rcnas_jax import arch, attacks, lipschitz, models, parallel, store
from rcnas_jax.policy import Observation

TASK_ATTACKS = ("clean", "fgsm", "pgd", "cw", "apgd-ce")


@dataclasses.dataclass(frozen=True)
class ThreatModel:
  """The attack of a task: `name` in TASK_ATTACKS, with its radius and steps."""

  name: str
  eps: float
  num_steps: int = 10
  norm: str = "linf"

  @property
  def step_size(self) -> float:
    """2.5 eps / steps (Madry et al.'s rule), so the attack can cross the ball."""
    return 2.5 * self.eps / max(self.num_steps, 1)

  def key(self) -> str:
    """A short stable name, e.g. 'pgd10-linf-0.03137'."""
    steps = "" if self.name in ("clean", "fgsm") else str(self.num_steps)
    return f"{self.name}{steps}-{self.norm}-{self.eps:.4g}"


@dataclasses.dataclass(frozen=True)
class Task:
  """What the agent compresses for: a dataset, a threat model, a teacher and a MAC budget."""

  dataset: str
  attack: ThreatModel
  teacher: str
  budget_macs: int

  def key(self) -> str:
    """A stable string key for caches and reports."""
    return f"{self.dataset}|{self.attack.key()}|{self.teacher}|{self.budget_macs}"


def run_attack(threat: ThreatModel, logits_fn, images, labels, key, unroll: bool = True):
  """Adversarial images of `threat` against `logits_fn` (eval mode)."""
  return attacks.attack(threat.name, logits_fn, images, labels, key, eps=threat.eps,
                        step_size=threat.step_size, num_steps=threat.num_steps,
                        norm=threat.norm, unroll=unroll)


@functools.partial(jax.jit, static_argnames=("threat", "model", "num_iters", "unroll"))
def probe_statistics(variables: dict, images: jax.Array, labels: jax.Array, key: jax.Array, *,
                     threat: ThreatModel, model, num_iters: int = 20,
                     unroll: bool = True) -> dict:
  """LIPS (mean Jacobian spectral norm at attacked probe points) and the teacher's error there."""
  logits_fn = models.logits_fn(model, variables)
  attack_key, power_key = jax.random.split(key)
  adversarial = run_attack(threat, logits_fn, images, labels, attack_key, unroll)
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
      task=jnp.asarray(task_features(task, probe, teacher_macs, num_classes, image_shape)))


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
