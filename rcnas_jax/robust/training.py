"""Adversarial training: PGD-AT and TRADES, optional distillation, one jitted data-parallel step.

The train state is a dict pytree {step, params, batch_stats, opt_state, ema_params,
ema_batch_stats}, plus the constant `masks` of a student run on its masked family network.
The step's randomness is `fold_in(key, step)` and the batch of step s is a pure function of
(seed, s), so a run killed at any point resumes bit-identically from its last checkpoint. Every attack sees the model in eval mode (BN running statistics).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from rcnas_jax import data
from rcnas_jax.nets import models
from rcnas_jax.robust import attacks
from rcnas_jax.runtime import checkpoint, metrics, parallel, preemption

State = dict


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What one train step does; hashable, so it is a static argument of the jitted step."""

  method: str = "trades"  # 'standard', 'pgd_at' or 'trades'.
  # The inner maximisation: PGD on the cross-entropy (PGD-AT) or on the KL to the clean
  # prediction (TRADES).
  attack: attacks.ThreatModel = attacks.ThreatModel("pgd", eps=8 / 255, step_size=2 / 255,
                                                    num_steps=10)
  unroll: bool = True
  trades_beta: float = 6.0
  crop_padding: int = 0
  flip: bool = False
  ema_decay: float = 0.0
  distill_weight: float = 0.0
  distill_temperature: float = 1.0


def unroll_attack_loops(loop: str) -> bool:
  """Resolves config.attack.loop: 'auto' unrolls on CPU, where rolled loops run slower."""
  return loop == "unrolled" or (loop == "auto" and jax.default_backend() == "cpu")


def settings_from_config(config: ml_collections.ConfigDict) -> TrainSettings:
  """The train-step settings of a full config."""
  t, a = config.training, config.attack
  return TrainSettings(
      method=t.method, attack=attacks.ThreatModel("pgd", eps=a.eps, step_size=a.step_size,
                                                  num_steps=a.num_steps, norm=a.norm),
      unroll=unroll_attack_loops(a.loop), trades_beta=t.trades_beta,
      crop_padding=config.dataset.crop_padding, flip=config.dataset.flip,
      ema_decay=t.ema_decay, distill_weight=t.distill_weight,
      distill_temperature=t.distill_temperature)


# ---------------------------------------------------------------------------------------------
# Optimiser.
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(t: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Step decay (x0.1 at each decay point), cosine or constant, after an optional warmup."""
  warmup = int(t.warmup_epochs * total_steps / t.epochs)
  if t.schedule == "step":
    boundaries = {int(p * total_steps) - warmup: 0.1 for p in t.decay_points}
    main = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
  elif t.schedule == "cosine":
    main = optax.cosine_decay_schedule(t.learning_rate, max(total_steps - warmup, 1))
  else:
    main = optax.constant_schedule(t.learning_rate)
  if not warmup:
    return main
  ramp = optax.linear_schedule(0.0, t.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def optimizer(t: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum; clipping, then L2 weight decay on every parameter (as PyTorch's SGD)."""
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
      optax.add_decayed_weights(t.weight_decay),
      optax.sgd(learning_rate_schedule(t, total_steps), momentum=t.momentum or None,
                nesterov=t.nesterov))


# ---------------------------------------------------------------------------------------------
# State and step.
# ---------------------------------------------------------------------------------------------


def create_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                 image_shape, variables: dict | None = None) -> State:
  """A train state at step 0, from `variables` or a fresh initialisation."""
  variables = variables or models.init(model, key, image_shape)
  return {**_masks(variables),
      "step": jnp.zeros((), jnp.int32),
      "params": variables["params"],
      "batch_stats": variables["batch_stats"],
      "opt_state": tx.init(variables["params"]),
      # Copies: the step donates the state, and a buffer cannot be donated twice.
      "ema_params": jax.tree.map(jnp.copy, variables["params"]),
      "ema_batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"]),
  }


def _masks(variables: dict) -> dict:
  """{'masks': ...} of a masked family network's variables or state, else {}."""
  return {"masks": variables["masks"]} if "masks" in variables else {}


def eval_variables(state: State, use_ema: bool) -> dict:
  """The variables to evaluate: the EMA weights when EMA is on."""
  prefix = "ema_" if use_ema else ""
  return {"params": state[prefix + "params"], "batch_stats": state[prefix + "batch_stats"],
          **_masks(state)}


def augment(images: jax.Array, key: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """uint8 images -> floats in [0, 1], randomly cropped after zero padding and flipped."""
  x = images.astype(jnp.float32) / 255.0
  n, h, w, _ = x.shape
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, x.shape[-1]))
    x = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
    x = jnp.where(flips, x[:, :, ::-1, :], x)
  return x


def _kl(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Per-example KL(softmax(target) || softmax(logits))."""
  return attacks.kl_divergence(logits, None, target_logits)


def _loss(params, batch_stats, clean, adversarial, labels, teacher_logits, *, model,
          settings: TrainSettings, masks: dict | None = None):
  """The training objective; BN statistics are updated by each train-mode pass in turn.

  `masks` is {'masks': ...} for a student on its masked family network."""

  def forward(x, stats):
    logits, updated = model.apply({"params": params, "batch_stats": stats, **(masks or {})}, x,
                                  train=True, mutable=["batch_stats"])
    return logits, updated["batch_stats"]

  ce = optax.softmax_cross_entropy_with_integer_labels
  if settings.method == "trades":
    clean_logits, batch_stats = forward(clean, batch_stats)
    adversarial_logits, batch_stats = forward(adversarial, batch_stats)
    loss = jnp.mean(ce(clean_logits, labels)) + settings.trades_beta * jnp.mean(
        _kl(clean_logits, adversarial_logits))
  else:
    adversarial_logits, batch_stats = forward(adversarial, batch_stats)
    loss = jnp.mean(ce(adversarial_logits, labels))
  if settings.distill_weight:
    t = settings.distill_temperature
    distill = t * t * jnp.mean(_kl(teacher_logits / t, adversarial_logits / t))
    loss = (1 - settings.distill_weight) * loss + settings.distill_weight * distill
  accuracy = jnp.mean(jnp.argmax(adversarial_logits, -1) == labels)
  return loss, (batch_stats, {"loss": loss, "train_adversarial_accuracy": accuracy})


def train_step(state: State, images: jax.Array, labels: jax.Array, key: jax.Array,
               teacher_variables, *, model: nn.Module, tx: optax.GradientTransformation,
               settings: TrainSettings, teacher: nn.Module | None = None):
  """One optimisation step on a batch of uint8 images; returns (state, metrics)."""
  step_key = jax.random.fold_in(key, state["step"])
  augment_key, attack_key = jax.random.split(step_key)
  clean = augment(images, augment_key, settings.crop_padding, settings.flip)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"], **_masks(state)}
  if settings.method == "standard":
    adversarial = clean
  else:
    a = settings.attack
    adversarial = attacks.pgd(
        models.logits_fn(model, variables), clean, labels, attack_key, eps=a.eps,
        step_size=a.step_size, num_steps=a.num_steps,
        loss="kl" if settings.method == "trades" else "ce", norm=a.norm, unroll=settings.unroll)
  teacher_logits = None
  if settings.distill_weight:
    teacher_logits = teacher.apply(teacher_variables, clean, train=False)
  grad_fn = jax.grad(_loss, has_aux=True)
  grads, (batch_stats, step_metrics) = grad_fn(
      state["params"], state["batch_stats"], clean, adversarial, labels, teacher_logits,
      model=model, settings=settings, masks=_masks(state))
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = lambda old, new: jax.tree.map(
      lambda o, n: settings.ema_decay * o + (1 - settings.ema_decay) * n, old, new)
  new_state = {
      **_masks(state),
      "step": state["step"] + 1,
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": opt_state,
      "ema_params": ema(state["ema_params"], params),
      "ema_batch_stats": ema(state["ema_batch_stats"], batch_stats),
  }
  step_metrics["grad_norm"] = optax.tree.norm(grads)
  return new_state, step_metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, settings: TrainSettings,
                    mesh: Mesh, teacher: nn.Module | None = None) -> Callable:
  """`train_step` jitted over the mesh: batch split on `data`, state replicated and donated."""
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  step = functools.partial(train_step, model=model, tx=tx, settings=settings, teacher=teacher)
  return jax.jit(step, in_shardings=(replicated, sharded, sharded, replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def global_batch(mesh: Mesh, split: data.Split, batch_size: int, *, seed: int,
                 step: int) -> tuple[jax.Array, jax.Array]:
  """`data.batch_at(split, ...)` on the mesh; each process reads only the rows it holds."""
  rows = parallel.process_rows(mesh, batch_size)
  indices = data.batch_indices(len(split), batch_size, seed=seed, step=step)[rows]
  return parallel.shard_local_batch(mesh, batch_size, split.images[indices],
                                    split.labels[indices])


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the message names the first step where it did."""


def first_nonfinite(losses: list, first_step: int) -> int | None:
  """The global step (1-based) of the first non-finite loss in `losses`, or None."""
  if not losses:
    return None
  bad = np.flatnonzero(~np.isfinite(np.asarray(jax.device_get(losses), np.float64)))
  return first_step + int(bad[0]) if bad.size else None


def check_finite(losses: list, first_step: int, where: str) -> None:
  """Raises TrainingDiverged when a loss of steps first_step, first_step + 1, ... is not finite.

  The losses stay on the device until a check, so the loop does not wait for every step.
  """
  step = first_nonfinite(losses, first_step)
  if step is not None:
    raise TrainingDiverged(f"{where} diverged: non-finite loss at step {step}")


def train(model: nn.Module, split: data.Split, image_shape, config: ml_collections.ConfigDict,
          workdir: str | None, mesh: Mesh, *, init_variables: dict | None = None,
          teacher: tuple[nn.Module, dict] | None = None, max_steps: int | None = None,
          progress: bool = True, name: str = "training") -> State:
  """Trains `model` on `split` per `config`, resuming from `workdir`; returns the final state.

  `init_variables` replace the fresh initialisation (e.g. weights inherited from a teacher).
  Without a workdir nothing is written (short proxy runs). `max_steps` stops early after that
  global step (the schedule is unchanged), as a kill would. A non-finite loss stops the run
  with TrainingDiverged before any checkpoint holds it; a stop request (SIGTERM) saves a
  checkpoint and raises preemption.Stopped.
  """
  t = config.training
  steps_per_epoch = data.steps_per_epoch(split, t.batch_size)
  total_steps = t.epochs * steps_per_epoch
  tx = optimizer(t, total_steps)
  settings = settings_from_config(config)
  key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(key)
  state = jax.jit(lambda k, v: create_state(model, tx, k, image_shape, v))(init_key,
                                                                          init_variables)
  state = parallel.replicate(mesh, state)
  manager = checkpoint.manager(f"{workdir}/checkpoints") if workdir else None
  if manager:
    state = checkpoint.restore_latest(manager, state, parallel.replicated(mesh)) or state
  teacher_model, teacher_variables = teacher if teacher else (None, None)
  if teacher_variables is not None:  # Placed once, not copied to the devices at every step.
    teacher_variables = parallel.replicate(mesh, teacher_variables)
  step_fn = make_train_step(model, tx, settings, mesh, teacher_model)
  writer = metrics.MetricsWriter(workdir) if workdir and parallel.is_primary() else None
  stop = min(total_steps, max_steps or total_steps)
  start = int(state["step"])
  bar = metrics.progress(total=stop, initial=start, desc=name,
                         disable=not (progress and parallel.is_primary()))
  losses = []  # Of the steps since the last finiteness check.
  for step in range(start, stop):
    images, labels = global_batch(mesh, split, t.batch_size, seed=config.seed, step=step)
    state, step_metrics = step_fn(state, images, labels, step_key, teacher_variables)
    losses.append(step_metrics["loss"])
    done = step + 1
    log = done % t.log_every_steps == 0 or done == stop
    save = manager and (done % t.checkpoint_every_steps == 0 or done % steps_per_epoch == 0
                        or done == stop or preemption.requested())
    if log or save:
      check_finite(losses, done - len(losses) + 1, name)
      losses = []
    if writer and log:
      record = {k: float(v) for k, v in step_metrics.items()}
      record["epoch"] = done / steps_per_epoch
      writer.write(done, record)
      bar.set_postfix(loss=f"{record['loss']:.3f}")
    if save:
      checkpoint.save(manager, done, state)
    bar.update(1)
    if manager and preemption.requested():
      checkpoint.wait(manager)
      preemption.check(f"{name} at step {done} of {stop}")
  bar.close()
  if manager:
    checkpoint.wait(manager)
    manager.close()
  if writer:
    writer.close()
  return state
