"""The environment: one episode turns a task and an action into a student and a reward (SPEC §5).

action -> student spec (invalid: reward -1, never trained) -> weights inherited from the
teacher -> proxy adversarial training on a training subset -> robust accuracy on the
*validation* split under the task's attack -> R = acc * (MACs / budget)^w, w = 0 within budget
and -beta over it. Every evaluation is appended to a JSONL cache keyed by (task, student,
proxy settings), so repeated students and resumed searches cost nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from rcnas_jax import arch, data, evaluate, inherit, models, training
from rcnas_jax import state as state_lib
from rcnas_jax.policy import Observation
from rcnas_jax.state import Task


@dataclasses.dataclass
class Environment:
  """What episodes need: the config, datasets, trained teachers, the mesh and the cache."""

  config: ml_collections.ConfigDict
  datasets: dict[str, data.Dataset]
  teachers: dict[tuple[str, str], dict]  # (dataset, teacher name) -> trained variables
  mesh: Mesh
  cache: "EvaluationCache"
  probes: state_lib.ProbeCache


class EvaluationCache:
  """Finished evaluations as JSONL lines; loaded whole at start, appended to after each one."""

  def __init__(self, path: str | None):
    self.path = path
    self.entries: dict[str, dict] = {}
    if path and os.path.exists(path):
      with open(path) as f:
        for line in f:
          if line.strip():
            record = json.loads(line)
            self.entries[record["key"]] = record

  def get(self, key: str) -> dict | None:
    return self.entries.get(key)

  def put(self, key: str, record: dict) -> None:
    """Stores `record` under `key`, durably before returning."""
    record = {"key": key, **record}
    self.entries[key] = record
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reward(robust_accuracy: float, macs: int, budget_macs: int, beta: float) -> float:
  """MnasNet-style: accuracy, times (MACs / budget)^-beta when over budget."""
  if macs <= budget_macs:
    return robust_accuracy
  return robust_accuracy * (macs / budget_macs) ** -beta


def proxy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full config with training replaced by the short proxy schedule of config.search.proxy."""
  proxy = config.search.proxy
  c = ml_collections.ConfigDict(config.to_dict())
  c.training.update(method=proxy.method or config.training.method, epochs=proxy.epochs,
                    batch_size=proxy.batch_size,
                    learning_rate=proxy.learning_rate, distill_weight=proxy.distill_weight,
                    schedule="cosine", warmup_epochs=0.0, ema_decay=0.0)
  c.attack.num_steps = proxy.attack_steps
  c.attack.step_size = state_lib.ThreatModel("pgd", c.attack.eps, proxy.attack_steps).step_size
  return c


def subset(split: data.Split, n: int) -> data.Split:
  """A fixed stratified sample of n examples (all when n is 0)."""
  return data.sample(split, n)


def threat_settings(task: Task) -> evaluate.AttackSettings:
  """The task's attack as evaluation settings."""
  a = task.attack
  return evaluate.AttackSettings(a.name, a.eps, a.step_size, a.num_steps, a.norm)


_inherit = jax.jit(inherit.inherit, static_argnums=(2, 3))  # One wrapper, one compile cache.


def train_student(env: Environment, task: Task, spec: arch.NetworkSpec, config, split,
                  workdir: str | None = None, progress: bool = False):
  """Full adversarial training of `spec` from the task's teacher; returns (model, variables)."""
  dataset = env.datasets[task.dataset]
  info = dataset.info
  teacher_spec = arch.teacher(task.teacher)
  teacher_variables = env.teachers[(task.dataset, task.teacher)]
  model = models.build(spec, info.num_classes, info.mean, info.std)
  fresh = models.init(model, jax.random.key(config.seed), info.image_shape)
  initial = _inherit(teacher_variables, fresh, teacher_spec, spec)
  teacher = None
  if config.training.distill_weight:
    teacher = (models.build(teacher_spec, info.num_classes, info.mean, info.std),
               teacher_variables)
  state = training.train(model, split, info.image_shape, config, workdir, env.mesh,
                         init_variables=initial, teacher=teacher, progress=progress)
  return model, training.eval_variables(state, config.training.ema_decay > 0)


@functools.partial(jax.jit, static_argnames=(
    "model", "teacher", "teacher_spec", "student_spec", "tx", "settings", "threat", "unroll"))
def proxy_robust_accuracy(teacher_variables, train_images, train_labels, batch_indices,
                          validation_images, validation_labels, key, *, model, teacher,
                          teacher_spec, student_spec, tx, settings, threat, unroll):
  """Inherit, proxy-train and attack one student, all in one program (one compile per shape).

  On CPU a search is dominated by compiling each new student; fusing initialisation,
  inheritance, the training steps (a scan) and the evaluation attack halves that cost.
  """
  init_key, train_key, attack_key = jax.random.split(key, 3)
  image_shape = train_images.shape[1:]
  fresh = models.init(model, init_key, image_shape)
  variables = inherit.inherit(teacher_variables, fresh, teacher_spec, student_spec)
  state = training.create_state(model, tx, init_key, image_shape, variables)

  def step(state, indices):
    state, step_metrics = training.train_step(
        state, train_images[indices], train_labels[indices], train_key, teacher_variables,
        model=model, tx=tx, settings=settings, teacher=teacher)
    return state, step_metrics["loss"]

  state, losses = jax.lax.scan(step, state, batch_indices)
  logits_fn = models.logits_fn(model, training.eval_variables(state, False))
  images = validation_images.astype(jnp.float32) / 255.0
  adversarial = state_lib.run_attack(threat, logits_fn, images, validation_labels, attack_key,
                                     unroll)
  correct = jnp.argmax(logits_fn(adversarial), -1) == validation_labels
  return jnp.mean(correct), losses


@functools.lru_cache(maxsize=None)
def _proxy_optimizer(learning_rate: float, momentum: float, weight_decay: float,
                     grad_clip: float, steps: int) -> optax.GradientTransformation:
  """One optimiser object per setting, so students of the same shape share a compiled program."""
  t = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, momentum=momentum, nesterov=False, weight_decay=weight_decay,
      grad_clip=grad_clip, schedule="cosine", warmup_epochs=0.0, epochs=1, decay_points=()))
  return training.optimizer(t, steps)


def proxy_episode(env: Environment, task: Task, spec: arch.NetworkSpec) -> dict:
  """Robust validation accuracy of `spec` after proxy training (SPEC §5.3-5.4)."""
  config = proxy_config(env.config)
  proxy = env.config.search.proxy
  dataset = env.datasets[task.dataset]
  info = dataset.info
  train_split = subset(dataset.train, proxy.train_examples)
  validation = subset(dataset.validation, proxy.validation_examples)
  t = config.training
  steps = t.epochs * data.steps_per_epoch(train_split, t.batch_size)
  batch_indices = np.stack([data.batch_indices(len(train_split), t.batch_size, seed=config.seed,
                                               step=s) for s in range(steps)])
  teacher_spec = arch.teacher(task.teacher)
  teacher = None
  if t.distill_weight:
    teacher = models.build(teacher_spec, info.num_classes, info.mean, info.std)
  accuracy, losses = proxy_robust_accuracy(
      env.teachers[(task.dataset, task.teacher)], train_split.images, train_split.labels,
      batch_indices, validation.images, validation.labels, jax.random.key(config.seed),
      model=models.build(spec, info.num_classes, info.mean, info.std), teacher=teacher,
      teacher_spec=teacher_spec, student_spec=spec, tx=_proxy_optimizer(
          t.learning_rate, t.momentum, t.weight_decay, t.grad_clip, steps),
      settings=training.settings_from_config(config), threat=task.attack,
      unroll=training.unroll_attack_loops(config.evaluation.loop))
  return {"robust_accuracy": float(accuracy), "n_examples": len(validation),
          "attack": threat_settings(task).describe(), "final_loss": float(losses[-1])}


def episode(env: Environment, task: Task, actions) -> dict:
  """Evaluates one action on one task: {reward, robust_accuracy, macs, params, spec, ...}."""
  search = env.config.search
  dataset = env.datasets[task.dataset]
  info = dataset.info
  teacher_spec = arch.teacher(task.teacher)
  try:
    spec = arch.compress(teacher_spec, actions, image_size=info.image_shape[0],
                         width_multiple=search.width_multiple)
  except arch.InvalidStudentError as error:
    return {"reward": -1.0, "valid": False, "reason": str(error), "robust_accuracy": 0.0,
            "macs": 0, "params": 0, "spec": None, "cached": False}
  macs = arch.count_macs(spec, info.image_shape[0], info.num_classes, info.image_shape[-1])
  params = arch.count_params(spec, info.num_classes, info.image_shape[-1])
  key = json.dumps([task.key(), spec.to_dict(), search.proxy.to_dict(), env.config.seed],
                   sort_keys=True)
  cached = env.cache.get(key)
  if cached is None:
    started = time.perf_counter()
    cached = {**proxy_episode(env, task, spec), "seconds": time.perf_counter() - started}
    env.cache.put(key, cached)
    cached = {**cached, "cached": False}
  else:
    cached = {**cached, "cached": True}
  return {"reward": reward(cached["robust_accuracy"], macs, task.budget_macs, search.beta),
          "valid": True, "reason": "", "robust_accuracy": cached["robust_accuracy"],
          "macs": macs, "params": params, "spec": spec.to_dict(), "cached": cached["cached"],
          "attack": cached["attack"]}


def observe(env: Environment, task: Task) -> Observation:
  """The policy's observation of `task`; the probe statistics come from the cache when known."""
  dataset = env.datasets[task.dataset]
  info, s = dataset.info, env.config.search
  model = models.build(arch.teacher(task.teacher), info.num_classes, info.mean, info.std)
  probe = subset(dataset.validation, s.probe_size)

  def compute() -> dict:
    stats = state_lib.probe_statistics(
        env.teachers[(task.dataset, task.teacher)], probe.images.astype(np.float32) / 255,
        probe.labels, jax.random.key(env.config.seed), threat=task.attack, model=model,
        num_iters=s.lipschitz_iterations,
        unroll=training.unroll_attack_loops(env.config.attack.loop))
    return {k: float(v) for k, v in stats.items()}

  return state_lib.observe(task, env.probes.get(task, compute), info.num_classes, info.image_shape)


def actions_from_policy(depth_ratio, width_ratio, downsample, robust) -> tuple:
  """Per-stage StageActions from the policy's arrays (host values)."""
  return tuple(arch.StageAction(float(d), float(w), bool(s), bool(r)) for d, w, s, r in zip(
      np.asarray(depth_ratio), np.asarray(width_ratio), np.asarray(downsample),
      np.asarray(robust)))
