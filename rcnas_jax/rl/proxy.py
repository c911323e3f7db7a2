"""The proxy evaluation of one student: a short adversarial training, then the task's attack.

METHOD §5.3-5.4: weights inherited from the teacher, `config.search.proxy.epochs` of training
on a fixed stratified subset, then robust accuracy on a fixed sample of the *validation* split
under the task's attack, BN in eval mode. The student's start (fresh weights, then the
teacher's) is computed on the host with NumPy, so nothing compiles for it; three jitted
programs (train state, train step, validation attack) run from a Python loop, and
`release_programs` frees them between updates.

With `search.proxy.programs` = 'family' a student trains and is attacked as
its family's masked network (nets/masked.py), so every program compiles once per family
(teacher, strides, blocks), not per student. The student's
weights, losses and accuracy are the ones it has on its own network, up to float rounding.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from rcnas_jax import data
from rcnas_jax.nets import arch, inherit, masked, models
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust import attacks, evaluate, training
from rcnas_jax.runtime import parallel, preemption


def proxy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full config with training replaced by the short proxy schedule of config.search.proxy."""
  proxy = config.search.proxy
  c = ml_collections.ConfigDict(config.to_dict())
  c.training.update(method=proxy.method or config.training.method, epochs=proxy.epochs,
                    batch_size=proxy.batch_size,
                    learning_rate=proxy.learning_rate, distill_weight=proxy.distill_weight,
                    schedule="cosine", warmup_epochs=0.0, ema_decay=0.0)
  c.attack.num_steps = proxy.attack_steps
  c.attack.step_size = attacks.madry_step_size(c.attack.eps, proxy.attack_steps)
  return c


def _robust_correct(variables, images, labels, key, *, model, threat, unroll):
  """Per uint8 image, whether it is classified right clean and under the task's attack (BN
  eval)."""
  logits_fn = models.logits_fn(model, variables)
  images = images.astype(jnp.float32) / 255.0
  adversarial = attacks.run(threat, logits_fn, images, labels, key, unroll)
  return evaluate.robust_flags(logits_fn, adversarial, images, labels)


class _Programs(NamedTuple):
  """The proxy's jitted programs under one set of XLA compiler options."""
  create: Callable
  step: Callable
  robust_correct: Callable


_compiled: dict[tuple, _Programs] = {}
_compiled_lock = threading.Lock()


def _programs(config: ml_collections.ConfigDict, mesh: Mesh) -> _Programs:
  """The proxy's programs for `mesh`: on CPU at config.search.proxy.cpu_optimization_level.

  XLA:CPU at level 1 compiles a new student's programs about a quarter faster than at its
  default 2 and runs them as fast (docs/PERFORMANCE.md); other backends keep their defaults.
  """
  options = ()
  if mesh.devices.flat[0].platform == "cpu":
    options = (("xla_backend_optimization_level", config.search.proxy.cpu_optimization_level),)
  with _compiled_lock:
    if options not in _compiled:
      jit = functools.partial(jax.jit, compiler_options=dict(options) or None)
      _compiled[options] = _Programs(
          create=jit(training.create_state, static_argnames=("model", "tx", "image_shape")),
          step=jit(training.train_step, static_argnames=("model", "tx", "settings", "teacher"),
                   donate_argnums=(0,)),
          robust_correct=jit(_robust_correct, static_argnames=("model", "threat", "unroll")))
    return _compiled[options]


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, momentum: float, weight_decay: float,
               grad_clip: float, steps: int) -> optax.GradientTransformation:
  """One optimiser object per setting, so students of the same shape share compiled programs."""
  t = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, momentum=momentum, nesterov=False, weight_decay=weight_decay,
      grad_clip=grad_clip, schedule="cosine", warmup_epochs=0.0, epochs=1, decay_points=()))
  return training.optimizer(t, steps)


def family_programs(config: ml_collections.ConfigDict) -> bool:
  """Whether students run on their family's masked network (config.search.proxy.programs)."""
  # 'auto' is 'student' until a backend measures otherwise: on 2 CPU cores at the quickstart's
  # sizes the masked family network runs about as long as a student's programs compile, and
  # a search meets a new family with most new students (benchmarks/proxy_programs.py).
  return config.search.proxy.programs == "family"


# The families whose programs are compiled; `release_programs` frees them past _MAX_FAMILIES.
_families: set = set()
_families_lock = threading.Lock()
_MAX_FAMILIES = 16


def _networks(config: ml_collections.ConfigDict, info: data.DatasetInfo, task: Task,
              spec: arch.NetworkSpec, dtype: str) -> tuple[models.ResNet, models.ResNet]:
  """The student's network and the one it runs on: itself, or its masked family network."""
  model = models.build(spec, info.num_classes, info.mean, info.std, dtype)
  if not family_programs(config):
    return model, model
  family = masked.family(spec, arch.teacher(task.teacher), config.search.width_multiple)
  with _families_lock:
    _families.add((task.teacher, family))
  return model, models.build(family, info.num_classes, info.mean, info.std, dtype, masked=True)


def _keys(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[jax.Array, ...]:
  """The initialisation, training and validation-attack keys of every proxy evaluation."""
  return tuple(jax.random.split(parallel.replicate(mesh, jax.random.key(config.seed)), 3))


def splits(config: ml_collections.ConfigDict, dataset: data.Dataset) -> tuple[data.Split, ...]:
  """The proxy's fixed training subset, the reward's validation sample, and the selection set:
  validation images disjoint from the reward's (config.search.selection.examples of them, or
  all the rest), on which a method's top students are compared before one is delivered."""
  s = config.search
  reward, rest = data.partition(dataset.validation, s.proxy.validation_examples)
  return (data.sample(dataset.train, s.proxy.train_examples), reward,
          data.sample(rest, s.selection.examples))


def train(config: ml_collections.ConfigDict, info: data.DatasetInfo, train_split: data.Split,
          teacher_variables: dict, task: Task, spec: arch.NetworkSpec,
          mesh: Mesh) -> tuple[dict, list]:
  """The proxy training of `spec` on `train_split`, from the task teacher's weights, on `mesh`.

  Returns the student's variables and its loss at every step (device scalars). Each step is its
  own jitted call; a `lax.scan` over the steps would be one compile fewer, but XLA:CPU runs
  convolution gradients inside loops with a slow naive emitter (~35x slower here).
  """
  config = proxy_config(config)
  t = config.training
  steps = t.epochs * data.steps_per_epoch(train_split, t.batch_size)
  tx = _optimizer(t.learning_rate, t.momentum, t.weight_decay, t.grad_clip, steps)
  model, runner = _networks(config, info, task, spec, config.model.dtype)
  teacher_spec = arch.teacher(task.teacher)
  teacher = None
  if t.distill_weight:
    teacher = models.build(teacher_spec, info.num_classes, info.mean, info.std, config.model.dtype)
  init_key, train_key, _ = _keys(config, mesh)
  variables = inherit.inherited(teacher_variables, config.seed, model=model,
                                teacher_spec=teacher_spec, student_spec=spec,
                                image_shape=info.image_shape)
  if runner is not model:
    variables = masked.embed(variables, spec, runner, info.image_shape)
  programs = _programs(config, mesh)
  state = programs.create(runner, tx, init_key, info.image_shape,
                          parallel.replicate(mesh, variables))
  teacher_variables = parallel.replicate(mesh, teacher_variables)
  settings = training.settings_from_config(config)
  losses = []
  for step in range(steps):
    preemption.check("the search (unfinished proxy evaluations are redone)")
    images, labels = parallel.shard_batch(
        mesh, *data.batch_at(train_split, t.batch_size, seed=config.seed, step=step))
    state, step_metrics = programs.step(state, images, labels, train_key, teacher_variables,
                                        model=runner, tx=tx, settings=settings, teacher=teacher)
    losses.append(step_metrics["loss"])
  variables = training.eval_variables(state, False)
  if runner is not model:
    variables = masked.extract(jax.device_get(variables), spec, runner.spec, model,
                               info.image_shape)
  return variables, losses


def robust_accuracy(config: ml_collections.ConfigDict, info: data.DatasetInfo,
                    validation: data.Split, task: Task, spec: arch.NetworkSpec, variables: dict,
                    mesh: Mesh, chunk: int | None = None) -> float:
  """The student's accuracy on `validation` under the task's attack, in float32.

  It runs in chunks of `chunk` images (default: all at once), the last one padded by wrapping
  around, so that splits of any size share one compiled attack program.
  """
  chunk = chunk or len(validation)
  model, float32 = _networks(config, info, task, spec, "float32")
  if float32 is not model:
    variables = masked.embed(jax.device_get(variables), spec, float32, info.image_shape)
  variables = parallel.replicate(mesh, variables)
  robust_correct, correct = _programs(config, mesh).robust_correct, []
  for start in range(0, len(validation), chunk):
    idx = np.arange(start, start + chunk) % len(validation)
    images, labels = parallel.shard_or_replicate(mesh, validation.images[idx],
                                                 validation.labels[idx])
    correct.append(np.asarray(robust_correct(
        variables, images, labels, _keys(config, mesh)[2], model=float32, threat=task.attack,
        unroll=training.unroll_attack_loops(config.evaluation.loop)))[:len(validation) - start])
  return float(np.concatenate(correct).mean())


def evaluate_student(config: ml_collections.ConfigDict, dataset: data.Dataset,
                     teacher_variables: dict, task: Task, spec: arch.NetworkSpec,
                     mesh: Mesh) -> dict:
  """Proxy training and validation attack of `spec` on `mesh`: the evaluation cache's record.

  A student whose loss stops being finite is recorded as a failed evaluation, never scored.
  """
  started = time.perf_counter()
  train_split, validation, selection = splits(config, dataset)
  variables, losses = train(config, dataset.info, train_split, teacher_variables, task, spec,
                            mesh)
  record = {"n_examples": len(validation), "n_selection": len(selection),
            "attack": task.attack.describe()}
  diverged = training.first_nonfinite(losses, 1)
  if diverged is not None:
    return {**record, "failed": f"proxy training diverged: non-finite loss at step {diverged}",
            "seconds": time.perf_counter() - started}
  accuracy = robust_accuracy(config, dataset.info, validation, task, spec, variables, mesh)
  if len(selection):  # In chunks of the reward's size: the same compiled attack.
    record["selection_accuracy"] = robust_accuracy(config, dataset.info, selection, task, spec,
                                                   variables, mesh, chunk=len(validation))
  return {**record, "robust_accuracy": accuracy, "final_loss": float(losses[-1]),
          "seconds": time.perf_counter() - started}


def release_programs(config: ml_collections.ConfigDict) -> None:
  """Frees the compiled proxy programs of finished students, and of families past a bound.

  A repeated student is served by the evaluation cache, so its own programs are rarely reused,
  and each one holds executable memory maps: on Linux a long search would otherwise reach
  vm.max_map_count (65,530 here), where LLVM fails with "Cannot allocate memory" and the
  process dies. A family's programs are kept for its next students, up to _MAX_FAMILIES
  families.
  """
  with _families_lock:
    if not family_programs(config) or len(_families) > _MAX_FAMILIES:
      with _compiled_lock:
        for programs in _compiled.values():
          for program in programs:
            program.clear_cache()
      _families.clear()
