"""The environment: an episode turns a task and an action into a student and a reward (METHOD §5).

action -> student spec (invalid: reward -1, never trained) -> the proxy evaluation
(`proxy.evaluate_student`) -> R = acc * (MACs / budget)^w, w = 0 within budget and -beta over
it; a student that cannot be built, or whose training diverges, scores -1. Every evaluation is
appended to a JSONL cache keyed by the task, the student, the teacher's weights and exactly
the settings its proxy training uses (`artifacts.evaluation`), so repeated students and
resumed searches cost nothing and no other setting's result is ever reused. The uncached
students of one update are evaluated concurrently, one per candidate slice of the mesh.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rcnas_jax import data
from rcnas_jax.nets import arch, models, space
from rcnas_jax.rl import proxy, tasks
from rcnas_jax.rl.policy import Observation
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust import training
from rcnas_jax.runtime import artifacts, parallel, store


@dataclasses.dataclass
class Environment:
  """What episodes need: the config, datasets, trained teachers, the mesh and the caches."""

  config: ml_collections.ConfigDict
  datasets: dict[str, data.Dataset]
  teachers: dict[tuple[str, str], dict]  # (dataset, teacher name) -> trained variables
  mesh: Mesh
  cache: "EvaluationCache"
  probes: tasks.ProbeCache
  slices: list[Mesh] | None = None  # Where concurrent proxy evaluations run; default [mesh].
  teacher_weights: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)

  def observe(self, task: Task) -> Observation:
    """The policy's observation of `task` (`observe`)."""
    return observe(self, task)

  def episodes(self, task: Task, actions: list, *, phase: str, iteration: int) -> list["Episode"]:
    """The scored students of one update (`episodes`)."""
    return episodes(self, task, actions, phase=phase, iteration=iteration)

  def __post_init__(self):
    if self.slices is None:
      self.slices = [self.mesh]
    # Teachers live on the host: each slice's thread copies them to its own devices, and
    # concurrent copies of one device array to different meshes race inside jax.device_put.
    self.teachers = {pair: parallel.to_host(v) for pair, v in self.teachers.items()}
    # What cached evaluations and probes of a teacher are keyed by: its weights themselves.
    self.teacher_weights = {pair: artifacts.weights_digest(v) for pair, v in self.teachers.items()}


class EvaluationCache:
  """Finished evaluations as JSONL lines; loaded whole at start, appended to after each one."""

  def __init__(self, path: str | None):
    self.path = path
    self.entries: dict[str, dict] = {r["key"]: r for r in store.read_jsonl(path)} if path else {}

  def get(self, key: str) -> dict | None:
    return self.entries.get(key)

  def put(self, key: str, record: dict) -> None:
    """Stores `record` under `key`, durably before returning."""
    record = {"key": key, **record}
    if self.path:
      store.append_jsonl(self.path, [record])
    self.entries[key] = record


@dataclasses.dataclass(frozen=True)
class Episode:
  """One student of one update: where it was sampled, what it is, and what it scored."""

  phase: str
  iteration: int
  student: int  # Its index among the update's M students.
  task: str  # Task.key().
  reward: float
  valid: bool  # False: it could not be built, or its proxy training diverged (reward -1).
  reason: str = ""  # Why it is invalid.
  robust_accuracy: float = 0.0  # On the reward's validation sample, under the task's attack.
  # On the selection set (disjoint from the reward's sample); None when there is none.
  selection_accuracy: float | None = None
  macs: int = 0
  params: int = 0
  spec: dict | None = None  # arch.NetworkSpec.to_dict(); None when it could not be built.
  cached: bool = False  # Its evaluation was already in the cache.
  attack: str = ""  # The validation attack's settings ('' when never trained).
  # What the sampler chose, per stage [depth ratio, width ratio, downsample, robust], so that a
  # population method can mutate it.
  actions: list | None = None

  def __post_init__(self):
    for name in ("spec", "actions"):  # As JSON has them (lists), so a logged one is equal.
      if getattr(self, name) is not None:
        object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Episode":
    """An Episode from `to_dict`'s output (fields missing from older logs take defaults)."""
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def reward(robust_accuracy: float, macs: int, budget_macs: int, beta: float) -> float:
  """MnasNet-style: accuracy, times (MACs / budget)^-beta when over budget."""
  if macs <= budget_macs:
    return robust_accuracy
  return robust_accuracy * (macs / budget_macs) ** -beta


def _prepare(env: Environment, task: Task, actions) -> dict:
  """The student an action asks for, with its size and cache key, or why it is invalid."""
  search = env.config.search
  info = env.datasets[task.dataset].info
  try:
    spec = space.compress(arch.teacher(task.teacher), actions, image_size=info.image_shape[0],
                          width_multiple=search.width_multiple)
  except space.InvalidStudentError as error:
    return {"spec": None, "reason": str(error)}
  return {"spec": spec, "reason": "",
          "macs": arch.count_macs(spec, info.image_shape[0], info.num_classes,
                                  info.image_shape[-1]),
          "params": arch.count_params(spec, info.num_classes, info.image_shape[-1]),
          "key": artifacts.evaluation(env.config, task.key(), spec.to_dict(),
                                      env.teacher_weights[(task.dataset, task.teacher)])}


def episodes(env: Environment, task: Task, actions: list, *, phase: str,
             iteration: int) -> list[Episode]:
  """Evaluates the actions of one update, the uncached students concurrently over the slices.

  Invalid students score -1 and are never trained. A student asked for twice trains once.
  """
  prepared = [_prepare(env, task, a) for a in actions]
  new = list(dict.fromkeys(p["key"] for p in prepared
                           if p["spec"] is not None and env.cache.get(p["key"]) is None))
  specs = {p["key"]: p["spec"] for p in prepared if p["spec"] is not None}
  dataset = env.datasets[task.dataset]
  teacher = env.teachers[(task.dataset, task.teacher)]
  records = parallel.on_slices(env.slices, [
      lambda mesh, key=key: proxy.evaluate_student(env.config, dataset, teacher, task,
                                                   specs[key], mesh)
      for key in new])
  for key, record in zip(new, records):  # In order, so the cache file is deterministic.
    env.cache.put(key, record)
  proxy.release_programs(env.config)
  return [Episode(phase, iteration, i, task.key(), actions=chosen(a),
                  **_scored(env, task, p, fresh=p.get("key") in new))
          for i, (a, p) in enumerate(zip(actions, prepared))]


def chosen(actions) -> list:
  """StageActions as JSON: per stage [depth ratio, width ratio, downsample, robust]."""
  return [[float(a.depth_ratio), float(a.width_ratio), int(a.downsample), int(a.robust)]
          for a in actions]


def _scored(env: Environment, task: Task, prepared: dict, fresh: bool) -> dict:
  """An episode's outcome: the reward of METHOD §5 from the cached evaluation."""
  if prepared["spec"] is None:
    return {"reward": -1.0, "valid": False, "reason": prepared["reason"]}
  evaluation = env.cache.get(prepared["key"])
  sizes = {"macs": prepared["macs"], "params": prepared["params"],
           "spec": prepared["spec"].to_dict(), "cached": not fresh, "attack": evaluation["attack"]}
  if "failed" in evaluation:  # Trained, but diverged: a failed evaluation, scored as invalid.
    return {"reward": -1.0, "valid": False, "reason": evaluation["failed"], **sizes}
  return {"reward": reward(evaluation["robust_accuracy"], prepared["macs"], task.budget_macs,
                           env.config.search.beta),
          "valid": True, "robust_accuracy": evaluation["robust_accuracy"],
          "selection_accuracy": evaluation.get("selection_accuracy"), **sizes}


def within_budget(episode: Episode, budget_macs: int) -> bool:
  """A valid student that fits the budget: the only kind a method may deliver."""
  return episode.valid and episode.macs <= budget_macs


def observe(env: Environment, task: Task) -> Observation:
  """The policy's observation of `task`; the probe statistics come from the cache when known."""
  dataset = env.datasets[task.dataset]
  info, s = dataset.info, env.config.search
  model = models.build(arch.teacher(task.teacher), info.num_classes, info.mean, info.std)
  probe = data.sample(dataset.validation, s.probe_size)

  def compute() -> dict:
    return tasks.probe_statistics_on_mesh(
        env.mesh, env.teachers[(task.dataset, task.teacher)],
        probe.images.astype(np.float32) / 255, probe.labels, jax.random.key(env.config.seed),
        threat=task.attack, model=model, num_iters=s.lipschitz_iterations,
        unroll=training.unroll_attack_loops(env.config.attack.loop))

  key = artifacts.probe(env.config, task.key(), env.teacher_weights[(task.dataset, task.teacher)])
  return tasks.observe(task, env.probes.get(key, compute), info.num_classes, info.image_shape)
