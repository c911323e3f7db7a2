"""The environment: one episode turns a task and an action into a student and a reward (METHOD §5).

action -> student spec (invalid: reward -1, never trained) -> weights inherited from the
teacher -> proxy adversarial training on a training subset -> robust accuracy on the
*validation* split under the task's attack -> R = acc * (MACs / budget)^w, w = 0 within budget
and -beta over it; a student that cannot be built, or whose training diverges, scores -1.
Every evaluation is appended to a JSONL cache keyed by the task, the student, the teacher's
weights and exactly the settings its proxy training uses (`artifacts.evaluation`), so repeated
students and resumed searches cost nothing and no other setting's result is ever reused.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from rcnas_jax import (arch, artifacts, data, evaluate, inherit, models, parallel, preemption,
                       store, training)
from rcnas_jax import state as state_lib
from rcnas_jax.policy import Observation
from rcnas_jax.state import Task


@dataclasses.dataclass
class Environment:
  """What episodes need: the config, datasets, trained teachers, the mesh and the caches."""

  config: ml_collections.ConfigDict
  datasets: dict[str, data.Dataset]
  teachers: dict[tuple[str, str], dict]  # (dataset, teacher name) -> trained variables
  mesh: Mesh
  cache: "EvaluationCache"
  probes: state_lib.ProbeCache
  slices: list[Mesh] | None = None  # Where concurrent proxy evaluations run; default [mesh].
  teacher_weights: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)

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


@functools.partial(jax.jit, static_argnames=("model", "teacher_spec", "student_spec",
                                             "image_shape"))
def inherited(teacher_variables, key, *, model, teacher_spec, student_spec, image_shape):
  """A student's initial variables: fresh, then the teacher's weights wherever shapes allow.

  One program: run eagerly, the initialisation alone compiled ~100 tiny programs per student.
  """
  fresh = models.init(model, key, image_shape)
  return inherit.inherit(teacher_variables, fresh, teacher_spec, student_spec)


def train_student(env: Environment, task: Task, spec: arch.NetworkSpec, config, split,
                  workdir: str | None = None, progress: bool = False, mesh: Mesh | None = None):
  """Full adversarial training of `spec` from the task's teacher, on `mesh` (default: env's).

  Returns (model, variables).
  """
  dataset = env.datasets[task.dataset]
  info = dataset.info
  teacher_spec = arch.teacher(task.teacher)
  teacher_variables = env.teachers[(task.dataset, task.teacher)]
  model = models.build(spec, info.num_classes, info.mean, info.std, config.model.dtype)
  initial = inherited(teacher_variables, jax.random.key(config.seed), model=model,
                      teacher_spec=teacher_spec, student_spec=spec,
                      image_shape=tuple(info.image_shape))
  teacher = None
  if config.training.distill_weight:
    teacher = (models.build(teacher_spec, info.num_classes, info.mean, info.std,
                            config.model.dtype),
               teacher_variables)
  state = training.train(model, split, info.image_shape, config, workdir, mesh or env.mesh,
                         init_variables=initial, teacher=teacher, progress=progress)
  return model, training.eval_variables(state, config.training.ema_decay > 0)


@functools.partial(jax.jit, static_argnames=("model", "tx", "teacher_spec", "student_spec",
                                             "image_shape"))
def _proxy_start(teacher_variables, key, *, model, tx, teacher_spec, student_spec, image_shape):
  """The student's train state, its weights inherited from the teacher."""
  variables = inherited(teacher_variables, key, model=model, teacher_spec=teacher_spec,
                        student_spec=student_spec, image_shape=image_shape)
  return training.create_state(model, tx, key, image_shape, variables)


_proxy_step = jax.jit(training.train_step, static_argnames=("model", "tx", "settings", "teacher"),
                      donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("model", "threat", "unroll"))
def _robust_accuracy(variables, images, labels, key, *, model, threat, unroll):
  """Accuracy on uint8 `images` under the task's attack, BN in eval mode."""
  logits_fn = models.logits_fn(model, variables)
  images = images.astype(jnp.float32) / 255.0
  adversarial = state_lib.run_attack(threat, logits_fn, images, labels, key, unroll)
  return jnp.mean(jnp.argmax(logits_fn(adversarial), -1) == labels)


@functools.lru_cache(maxsize=None)
def _proxy_optimizer(learning_rate: float, momentum: float, weight_decay: float,
                     grad_clip: float, steps: int) -> optax.GradientTransformation:
  """One optimiser object per setting, so students of the same shape share compiled programs."""
  t = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, momentum=momentum, nesterov=False, weight_decay=weight_decay,
      grad_clip=grad_clip, schedule="cosine", warmup_epochs=0.0, epochs=1, decay_points=()))
  return training.optimizer(t, steps)


def proxy_episode(env: Environment, task: Task, spec: arch.NetworkSpec, mesh: Mesh) -> dict:
  """Proxy training and validation attack of `spec` on `mesh` (METHOD §5.3-5.4): the cache record.

  Each step is its own jitted call; a `lax.scan` over the steps would be one compile fewer, but
  XLA:CPU runs convolution gradients inside loops with a slow naive emitter (~35x slower here).
  A student whose loss stops being finite is recorded as a failed evaluation, never scored.
  """
  started = time.perf_counter()
  config = proxy_config(env.config)
  t, proxy = config.training, env.config.search.proxy
  dataset = env.datasets[task.dataset]
  info = dataset.info
  train_split = subset(dataset.train, proxy.train_examples)
  validation = subset(dataset.validation, proxy.validation_examples)
  steps = t.epochs * data.steps_per_epoch(train_split, t.batch_size)
  tx = _proxy_optimizer(t.learning_rate, t.momentum, t.weight_decay, t.grad_clip, steps)
  model = models.build(spec, info.num_classes, info.mean, info.std, config.model.dtype)
  teacher_spec = arch.teacher(task.teacher)
  teacher = None
  if t.distill_weight:
    teacher = models.build(teacher_spec, info.num_classes, info.mean, info.std, config.model.dtype)
  teacher_variables = parallel.replicate(mesh, env.teachers[(task.dataset, task.teacher)])
  key = parallel.replicate(mesh, jax.random.key(config.seed))
  init_key, train_key, attack_key = jax.random.split(key, 3)
  state = _proxy_start(teacher_variables, init_key, model=model, tx=tx,
                       teacher_spec=teacher_spec, student_spec=spec,
                       image_shape=info.image_shape)
  settings = training.settings_from_config(config)
  losses = []
  for step in range(steps):
    preemption.check("the search (unfinished proxy evaluations are redone)")
    images, labels = parallel.shard_batch(
        mesh, *data.batch_at(train_split, t.batch_size, seed=config.seed, step=step))
    state, step_metrics = _proxy_step(state, images, labels, train_key, teacher_variables,
                                      model=model, tx=tx, settings=settings, teacher=teacher)
    losses.append(step_metrics["loss"])
  record = {"n_examples": len(validation), "attack": threat_settings(task).describe()}
  diverged = training.first_nonfinite(losses, 1)
  if diverged is not None:
    return {**record, "failed": f"proxy training diverged: non-finite loss at step {diverged}",
            "seconds": time.perf_counter() - started}
  images, labels = parallel.shard_or_replicate(mesh, validation.images, validation.labels)
  float32 = models.build(spec, info.num_classes, info.mean, info.std)  # Attacks in full precision.
  accuracy = _robust_accuracy(
      training.eval_variables(state, False), images, labels, attack_key, model=float32,
      threat=task.attack, unroll=training.unroll_attack_loops(config.evaluation.loop))
  return {**record, "robust_accuracy": float(accuracy), "final_loss": float(losses[-1]),
          "seconds": time.perf_counter() - started}


def release_proxy_programs() -> None:
  """Frees the compiled proxy programs of finished students.

  A repeated student is served by the evaluation cache, so these programs are rarely reused,
  and each one holds executable memory maps: on Linux a long search would otherwise reach
  vm.max_map_count (65,530 here), where LLVM fails with "Cannot allocate memory" and the
  process dies.
  """
  for program in (_proxy_start, _proxy_step, _robust_accuracy):
    program.clear_cache()


def _prepare(env: Environment, task: Task, actions) -> dict:
  """The student an action asks for, with its size and cache key, or why it is invalid."""
  search = env.config.search
  info = env.datasets[task.dataset].info
  try:
    spec = arch.compress(arch.teacher(task.teacher), actions, image_size=info.image_shape[0],
                         width_multiple=search.width_multiple)
  except arch.InvalidStudentError as error:
    return {"spec": None, "reason": str(error)}
  return {"spec": spec, "reason": "",
          "macs": arch.count_macs(spec, info.image_shape[0], info.num_classes,
                                  info.image_shape[-1]),
          "params": arch.count_params(spec, info.num_classes, info.image_shape[-1]),
          "key": artifacts.evaluation(env.config, task.key(), spec.to_dict(),
                                      env.teacher_weights[(task.dataset, task.teacher)])}


def episodes(env: Environment, task: Task, actions: list) -> list[dict]:
  """Evaluates several actions on one task, the uncached students concurrently over the slices.

  Each result is {reward, robust_accuracy, macs, params, spec, valid, reason, cached, ...};
  invalid students score -1 and are never trained. A student asked for twice trains once.
  """
  prepared = [_prepare(env, task, a) for a in actions]
  new = list(dict.fromkeys(p["key"] for p in prepared
                           if p["spec"] is not None and env.cache.get(p["key"]) is None))
  specs = {p["key"]: p["spec"] for p in prepared if p["spec"] is not None}
  records = parallel.on_slices(env.slices, [
      lambda mesh, key=key: proxy_episode(env, task, specs[key], mesh)
      for key in new])
  for key, record in zip(new, records):  # In order, so the cache file is deterministic.
    env.cache.put(key, record)
  release_proxy_programs()
  return [_result(env, task, p, fresh=p.get("key") in new) for p in prepared]


def _result(env: Environment, task: Task, prepared: dict, fresh: bool) -> dict:
  """One episode's record: the reward of METHOD §5 from the cached evaluation."""
  if prepared["spec"] is None:
    return {"reward": -1.0, "valid": False, "reason": prepared["reason"],
            "robust_accuracy": 0.0, "macs": 0, "params": 0, "spec": None, "cached": False}
  evaluation = env.cache.get(prepared["key"])
  sizes = {"macs": prepared["macs"], "params": prepared["params"],
           "spec": prepared["spec"].to_dict(), "cached": not fresh, "attack": evaluation["attack"]}
  if "failed" in evaluation:  # Trained, but diverged: a failed evaluation, scored as invalid.
    return {"reward": -1.0, "valid": False, "reason": evaluation["failed"],
            "robust_accuracy": 0.0, **sizes}
  return {"reward": reward(evaluation["robust_accuracy"], prepared["macs"], task.budget_macs,
                           env.config.search.beta),
          "valid": True, "reason": "", "robust_accuracy": evaluation["robust_accuracy"], **sizes}


def episode(env: Environment, task: Task, actions) -> dict:
  """Evaluates one action on one task (see `episodes`)."""
  return episodes(env, task, [actions])[0]


def observe(env: Environment, task: Task) -> Observation:
  """The policy's observation of `task`; the probe statistics come from the cache when known."""
  dataset = env.datasets[task.dataset]
  info, s = dataset.info, env.config.search
  model = models.build(arch.teacher(task.teacher), info.num_classes, info.mean, info.std)
  probe = subset(dataset.validation, s.probe_size)

  def compute() -> dict:
    return state_lib.probe_statistics_on_mesh(
        env.mesh, env.teachers[(task.dataset, task.teacher)],
        probe.images.astype(np.float32) / 255, probe.labels, jax.random.key(env.config.seed),
        threat=task.attack, model=model, num_iters=s.lipschitz_iterations,
        unroll=training.unroll_attack_loops(env.config.attack.loop))

  key = artifacts.probe(env.config, task.key(), env.teacher_weights[(task.dataset, task.teacher)])
  return state_lib.observe(task, env.probes.get(key, compute), info.num_classes, info.image_shape)


def actions_from_policy(depth_ratio, width_ratio, downsample, robust) -> tuple:
  """Per-stage StageActions from the policy's arrays (host values)."""
  return tuple(arch.StageAction(float(d), float(w), bool(s), bool(r)) for d, w, s, r in zip(
      np.asarray(depth_ratio), np.asarray(width_ratio), np.asarray(downsample),
      np.asarray(robust)))
