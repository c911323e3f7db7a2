"""Attacks on any `logits_fn(images) -> logits` over images in [0, 1].

An attack is a composition: a per-example loss (`LOSSES`), a random start, a steepest-ascent
step for the norm, and a projection onto the eps-ball intersected with [0, 1]. Everything is
pure and jittable; `unroll=True` writes the step loop out (faster on XLA:CPU), `False`
uses `lax.fori_loop` (compiles faster, the better choice on GPU/TPU). Restarts run under
`vmap` and are combined point-wise: each example keeps its worst case.

AutoAttack's attacks (Croce & Hein, ICML 2020) follow the reference implementation's algorithm:
APGD (`apgd`, `apgd_targeted`) with its step-size schedule, FAB-T (`fab_targeted`, minimal-norm
points by projections on the linearised boundary) and the score-based Square attack (`square`,
Andriushchenko et al., ECCV 2020; L-inf and L2) with a fixed query budget. `AUTOATTACK` lists
the standard version's attacks, which `evaluate` composes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

LogitsFn = Callable[[jax.Array], jax.Array]
NORMS = ("linf", "l2")


# ---------------------------------------------------------------------------------------------
# Losses: (logits, labels, clean_logits) -> per-example values the attacker maximises.
# ---------------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, clean_logits=None) -> jax.Array:
  """Softmax cross-entropy per example."""
  del clean_logits
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def margin(logits: jax.Array, labels: jax.Array, clean_logits=None) -> jax.Array:
  """CW margin: best other logit minus the true logit (> 0 means misclassified)."""
  del clean_logits
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return jnp.max(others, axis=1) - true_logit


def kl_divergence(logits: jax.Array, labels: jax.Array, clean_logits: jax.Array) -> jax.Array:
  """TRADES: KL(softmax(clean) || softmax(adversarial)) per example."""
  del labels
  clean = jax.nn.log_softmax(clean_logits)
  return jnp.sum(jnp.exp(clean) * (clean - jax.nn.log_softmax(logits)), axis=1)


def dlr(logits: jax.Array, labels: jax.Array, clean_logits=None) -> jax.Array:
  """Difference of logits ratio: (max_{j != y} z_j - z_y) / (z_pi1 - z_pi3), pi sorting z."""
  del clean_logits
  top = jax.lax.top_k(logits, 3)[0]
  return margin(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """APGD-T's loss: (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2), pi sorting z."""
  top = jax.lax.top_k(logits, 4)[0]
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  target_logit = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  return (target_logit - true_logit) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES = {"ce": cross_entropy, "margin": margin, "kl": kl_divergence, "dlr": dlr}


# ---------------------------------------------------------------------------------------------
# Geometry of the threat model.
# ---------------------------------------------------------------------------------------------


def _norm_per_example(x: jax.Array, norm: str) -> jax.Array:
  """Per-example norm, broadcastable against x."""
  axes = tuple(range(1, x.ndim))
  if norm == "linf":
    return jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def project(adversarial: jax.Array, images: jax.Array, eps: float, norm: str) -> jax.Array:
  """Projects onto the eps-ball around `images`, then onto [0, 1]."""
  delta = adversarial - images
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  else:
    delta = delta * jnp.minimum(1.0, eps / (_norm_per_example(delta, "l2") + 1e-12))
  return jnp.clip(images + delta, 0.0, 1.0)


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """Steepest ascent direction of unit norm: sign for L-inf, normalised gradient for L2."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / (_norm_per_example(grad, "l2") + 1e-12)


def random_start(key: jax.Array, images: jax.Array, eps: float, norm: str) -> jax.Array:
  """A uniform random point of the eps-ball (clipped to [0, 1])."""
  if norm == "linf":
    delta = jax.random.uniform(key, images.shape, minval=-eps, maxval=eps)
  else:
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, images.shape)
    direction = direction / _norm_per_example(direction, "l2")
    dims = images[0].size
    radius = jax.random.uniform(radius_key, (images.shape[0],) + (1,) * (images.ndim - 1))
    delta = eps * direction * radius ** (1.0 / dims)
  return jnp.clip(images + delta, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# PGD.
# ---------------------------------------------------------------------------------------------


def _loop(num_steps: int, body, init, unroll: bool):
  """`body` applied num_steps times, written out or as a `fori_loop`."""
  if not unroll:
    return jax.lax.fori_loop(0, num_steps, lambda _, x: body(x), init)
  for _ in range(num_steps):
    init = body(init)
  return init


def _check(eps: float, norm: str, loss: str) -> None:
  """One-line errors for bad settings, before tracing."""
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r}: expected one of {', '.join(NORMS)}")
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}: expected one of {', '.join(LOSSES)}")
  if isinstance(eps, (int, float)) and eps < 0:  # A traced eps (vmapped radii) is not checked.
    raise ValueError(f"eps={eps}: expected eps >= 0")


def _pgd_single(logits_fn: LogitsFn, images, labels, key, clean_logits, *, eps, step_size,
                num_steps, loss, norm, start, unroll):
  """One PGD run from one start; returns adversarial images."""
  loss_fn = LOSSES[loss]

  def total_loss(x):
    return jnp.sum(loss_fn(logits_fn(x), labels, clean_logits))

  def step(x):
    direction = ascent_direction(jax.grad(total_loss)(x), norm)
    return project(x + step_size * direction, images, eps, norm)

  if start == "uniform":
    x0 = random_start(key, images, eps, norm)
  elif start == "gaussian":  # TRADES: x + 0.001 * N(0, 1).
    x0 = project(images + 0.001 * jax.random.normal(key, images.shape), images, eps, norm)
  else:
    x0 = images
  return jax.lax.stop_gradient(_loop(num_steps, step, x0, unroll))


def pgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
        eps: float, step_size: float, num_steps: int, loss: str = "ce", norm: str = "linf",
        random_start: bool = True, restarts: int = 1, unroll: bool = True) -> jax.Array:
  """Projected gradient ascent of `loss` in the eps-ball; returns adversarial images.

  With several restarts, each example keeps the restart with the largest CW margin of the
  final point (a misclassified point beats any correct one). `loss="kl"` attacks the clean
  prediction (TRADES) and starts, as TRADES does, 0.001 * N(0, 1) away from the image.
  """
  _check(eps, norm, loss)
  clean_logits = jax.lax.stop_gradient(logits_fn(images)) if loss == "kl" else None
  start = ("gaussian" if loss == "kl" else "uniform") if random_start else "none"
  run = lambda k: _pgd_single(logits_fn, images, labels, k, clean_logits, eps=eps,
                              step_size=step_size, num_steps=num_steps, loss=loss, norm=norm,
                              start=start, unroll=unroll)
  if restarts == 1:
    return run(key)
  candidates = jax.vmap(run)(jax.random.split(key, restarts))
  return worst_case(logits_fn, candidates, labels)


def worst_case(logits_fn: LogitsFn, candidates: jax.Array, labels: jax.Array) -> jax.Array:
  """Per example, the candidate (leading axis) with the largest CW margin."""
  margins = jax.vmap(lambda x: margin(logits_fn(x), labels))(candidates)
  best = jnp.argmax(margins, axis=0).reshape((1, -1) + (1,) * (candidates.ndim - 2))
  return jnp.take_along_axis(candidates, best, axis=0)[0]


def fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
         eps: float, loss: str = "ce", norm: str = "linf") -> jax.Array:
  """Fast gradient sign method: one full-size step from the clean image."""
  return pgd(logits_fn, images, labels, key, eps=eps, step_size=eps, num_steps=1, loss=loss,
             norm=norm, random_start=False)


# ---------------------------------------------------------------------------------------------
# APGD (AutoAttack): momentum 0.75, step 2 eps halved at checkpoints, restart from the best point.
# ---------------------------------------------------------------------------------------------


def apgd_checkpoints(num_steps: int) -> np.ndarray:
  """Per step, the length of the window that ends there at a checkpoint (0 = no checkpoint).

  The first window is 22% of the steps; each next one is 3% shorter, down to 6% (AutoAttack).
  """
  first, shrink, shortest = (max(int(f * num_steps), 1) for f in (0.22, 0.03, 0.06))
  windows = np.zeros(num_steps, np.int32)
  window, step = first, first - 1
  while step < num_steps:
    windows[step] = window
    window = max(window - shrink, shortest)
    step += window
  return windows


def _apgd_start(key: jax.Array, images: jax.Array, eps: float, norm: str) -> jax.Array:
  """AutoAttack's start: a random direction scaled to norm eps exactly, clipped to [0, 1]."""
  if norm == "linf":
    direction = jax.random.uniform(key, images.shape, minval=-1.0, maxval=1.0)
  else:
    direction = jax.random.normal(key, images.shape)
  return jnp.clip(images + eps * direction / (_norm_per_example(direction, norm) + 1e-12), 0, 1)


class _ApgdState(NamedTuple):
  """Per-example state of one APGD run (leading axis: examples)."""

  x: jax.Array  # Current point.
  x_previous: jax.Array  # The point before the last step (momentum).
  grad: jax.Array
  step_size: jax.Array  # (N,)
  x_best: jax.Array  # Highest loss so far, and its gradient.
  grad_best: jax.Array
  loss_best: jax.Array
  x_adversarial: jax.Array  # Last misclassified point.
  fooled: jax.Array  # (N,) bool.
  loss_previous: jax.Array  # Loss after the previous step (0 before step 0, as the reference).
  increases: jax.Array  # Steps since the last checkpoint where the loss increased.
  loss_best_at_check: jax.Array
  halved_at_check: jax.Array


class Stages(NamedTuple):
  """An attack as programs a host loop can drive: start, `num_steps` steps, finish.

  Each takes `logits_fn, images, labels` first: start(..., key) -> state,
  step(..., i, state) -> state, finish(..., state) -> adversarial images. `drive` runs them as
  one program with a `fori_loop`; `evaluate` can also run every step as its own program, which
  on XLA:CPU avoids the slow path of convolution gradients inside loops.
  """

  start: Callable
  step: Callable
  finish: Callable
  num_steps: int


def drive(stages: Stages, logits_fn: LogitsFn, images, labels, key,
          unroll: bool = False) -> jax.Array:
  """The attack of `stages` in one program: its steps rolled (`fori_loop`) or written out."""
  state = stages.start(logits_fn, images, labels, key)
  step = lambda i, s: stages.step(logits_fn, images, labels, i, s)
  if unroll:
    for i in range(stages.num_steps):
      state = step(i, state)
  else:
    state = jax.lax.fori_loop(0, stages.num_steps, step, state)
  return stages.finish(logits_fn, images, labels, state)


def _apgd_loss_and_grad(logits_fn: LogitsFn, labels, targets, loss: str):
  """x -> (per-example loss, misclassified, gradient) of APGD's loss (targeted DLR when
  `targets` is given)."""
  per_example = ((lambda z: targeted_dlr(z, labels, targets)) if targets is not None
                 else (lambda z: LOSSES[loss](z, labels)))

  def loss_and_grad(x):
    def total(x):
      logits = logits_fn(x)
      values = per_example(logits)
      return jnp.sum(values), (values, logits)
    (_, (values, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return values, jnp.argmax(logits, axis=1) != labels, grad

  return loss_and_grad


def _expand(v: jax.Array, ndim: int) -> jax.Array:
  """A per-example vector shaped to broadcast against images."""
  return v.reshape((-1,) + (1,) * (ndim - 1))


def _pick(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Per example, `a` where `mask` else `b`."""
  return jnp.where(_expand(mask, a.ndim) if a.ndim > 1 else mask, a, b)


def _apgd_init(loss_and_grad, images, key, *, eps, norm) -> _ApgdState:
  """APGD's state at its random start."""
  x0 = _apgd_start(key, images, eps, norm)
  values, wrong, grad = loss_and_grad(x0)
  n = images.shape[0]
  return _ApgdState(x=x0, x_previous=x0, grad=grad, step_size=jnp.full((n,), 2.0 * eps),
                    x_best=x0, grad_best=grad, loss_best=values, x_adversarial=x0, fooled=wrong,
                    loss_previous=jnp.zeros_like(values), increases=jnp.zeros(n, jnp.int32),
                    loss_best_at_check=values, halved_at_check=jnp.ones(n, bool))


def _apgd_step(loss_and_grad, images, i, s: _ApgdState, *, eps, num_steps, norm,
               rho) -> _ApgdState:
  """APGD's step `i` (may be traced): momentum step, projection, checkpoint halving."""
  expand = lambda v: _expand(v, images.ndim)
  momentum = jnp.where(i > 0, 0.75, 1.0)
  z = project(s.x + expand(s.step_size) * ascent_direction(s.grad, norm), images, eps, norm)
  x = project(s.x + momentum * (z - s.x) + (1 - momentum) * (s.x - s.x_previous), images,
              eps, norm)
  values, wrong, grad = loss_and_grad(x)
  improved = values > s.loss_best
  x_best, grad_best = _pick(improved, x, s.x_best), _pick(improved, grad, s.grad_best)
  loss_best = jnp.where(improved, values, s.loss_best)
  increases = s.increases + (values > s.loss_previous)
  window = jnp.asarray(apgd_checkpoints(num_steps))[i]
  # Halve where the loss rose in at most rho of the window's steps, or where the best loss did
  # not improve and the step was not halved at the last checkpoint; restart from the best.
  halve = (window > 0) & ((increases <= window * rho) |
                          (~s.halved_at_check & (s.loss_best_at_check >= loss_best)))
  at_check = window > 0
  return _ApgdState(
      x=_pick(halve, x_best, x), x_previous=s.x, grad=_pick(halve, grad_best, grad),
      step_size=jnp.where(halve, s.step_size / 2, s.step_size), x_best=x_best,
      grad_best=grad_best, loss_best=loss_best,
      x_adversarial=_pick(wrong, x, s.x_adversarial), fooled=s.fooled | wrong,
      loss_previous=values, increases=jnp.where(at_check, 0, increases),
      loss_best_at_check=jnp.where(at_check, loss_best, s.loss_best_at_check),
      halved_at_check=jnp.where(at_check, halve, s.halved_at_check))


def apgd_stages(*, eps: float, num_steps: int, loss: str, norm: str, runs: int,
                targets_of: Callable | None, rho: float) -> Stages:
  """APGD's `runs` runs (restarts, or targets x restarts) as stages, under one vmap.

  `targets_of(logits_fn, images)` gives each run's target classes, (runs, N), for the targeted
  DLR loss; None runs the untargeted `loss`. Finishing keeps each example's worst case over the
  runs and the clean image.
  """
  settings = dict(eps=eps, norm=norm)

  def targets(logits_fn, images):
    if targets_of is None:
      return None
    return targets_of(jax.lax.stop_gradient(logits_fn(images)))

  def start(logits_fn, images, labels, key):
    run_targets = targets(logits_fn, images)
    init = lambda t, k: _apgd_init(_apgd_loss_and_grad(logits_fn, labels, t, loss), images, k,
                                   **settings)
    return run_targets, jax.vmap(init)(run_targets, jax.random.split(key, runs))

  def step(logits_fn, images, labels, i, carry):
    run_targets, states = carry
    one = lambda t, s: _apgd_step(_apgd_loss_and_grad(logits_fn, labels, t, loss), images, i, s,
                                  num_steps=num_steps, rho=rho, **settings)
    return run_targets, jax.vmap(one)(run_targets, states)

  def finish(logits_fn, images, labels, carry):
    s = carry[1]
    fooled = s.fooled.reshape(s.fooled.shape + (1,) * (s.x.ndim - s.fooled.ndim))
    candidates = jnp.where(fooled, s.x_adversarial, s.x_best)
    return jax.lax.stop_gradient(worst_case(logits_fn, _with_clean(images, candidates), labels))

  return Stages(start, step, finish, num_steps)


def _check_apgd(eps, norm: str, loss: str, num_classes: int, needed: int) -> None:
  """One-line errors for settings APGD cannot run with."""
  if loss not in ("ce", "dlr"):
    raise ValueError(f"loss={loss!r}: expected one of ce, dlr")
  _check(eps, norm, loss)
  if num_classes < needed:
    raise ValueError(f"{num_classes} classes: the {'targeted ' if needed == 4 else ''}DLR loss "
                     f"needs at least {needed}")


def _ranked_classes(logits: jax.Array, rank) -> jax.Array:
  """Per example, the class with the `rank`-th largest logit (rank 1 = the prediction)."""
  order = jnp.argsort(logits, axis=1)
  return jnp.take_along_axis(order, jnp.full((logits.shape[0], 1), logits.shape[1] - rank),
                             axis=1)[:, 0]


def _target_ranks(num_targets: int, restarts: int, target_rank) -> jax.Array:
  """Per run, the rank of its target class: ranks 2..num_targets + 1 (or `target_rank` alone),
  each repeated `restarts` times."""
  if target_rank is not None:
    return jnp.full((restarts,), target_rank, jnp.int32)
  return jnp.repeat(jnp.arange(2, num_targets + 2), restarts)


def _with_clean(images: jax.Array, candidates: jax.Array) -> jax.Array:
  """Candidates plus the clean images, so a misclassified clean point stays misclassified."""
  return jnp.concatenate([images[None], candidates])


def apgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
         eps: float, num_steps: int = 100, loss: str = "ce", norm: str = "linf",
         restarts: int = 1, target_class: int | None = None, rho: float = 0.75,
         unroll: bool = False) -> jax.Array:
  """Auto-PGD (APGD-CE, APGD-DLR); returns adversarial images.

  `target_class=k` attacks, with the targeted DLR loss, the class with the k-th largest clean
  logit (k >= 2, AutoAttack's convention). Restarts run under vmap; each example keeps a
  misclassified point when any restart found one (else the highest-margin point).
  """
  num_classes = jax.eval_shape(logits_fn, images).shape[1]
  _check_apgd(eps, norm, loss, num_classes,
              4 if target_class is not None else 3 if loss == "dlr" else 2)
  return drive(apgd_stages_for("apgd-ce", eps=eps, num_steps=num_steps, loss=loss, norm=norm,
                               restarts=restarts, target_class=target_class, rho=rho),
               logits_fn, images, labels, key, unroll)


def apgd_targeted(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array,
                  *, eps: float, num_steps: int = 100, num_targets: int = 9,
                  norm: str = "linf", restarts: int = 1, rho: float = 0.75,
                  unroll: bool = False, target_rank=None) -> jax.Array:
  """APGD-T: targeted DLR against each of the top `num_targets` other classes; worst case.

  Targets and restarts run under one vmap (memory grows with num_targets x restarts);
  `target_rank=k` (may be traced) runs only the class with the k-th largest clean logit.
  """
  num_classes = jax.eval_shape(logits_fn, images).shape[1]
  _check_apgd(eps, norm, "dlr", num_classes, 4)
  return drive(apgd_stages_for("apgd-t", eps=eps, num_steps=num_steps, norm=norm,
                               restarts=restarts, num_targets=min(num_targets, num_classes - 1),
                               target_rank=target_rank, rho=rho),
               logits_fn, images, labels, key, unroll)


STEPPED = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t")  # Attacks `stages` splits into programs.


def stages(threat: "ThreatModel", num_classes: int, target_rank=None) -> Stages:
  """The stages of a threat of STEPPED, its settings checked as `run` checks them;
  `target_rank` (may be traced) runs APGD-T or FAB-T against that one target rank."""
  if threat.name == "fab-t":
    _check_fab(threat.eps, threat.norm, num_classes)
    return fab_stages(eps=threat.eps, num_steps=threat.num_steps, norm=threat.norm,
                      restarts=threat.restarts,
                      num_targets=min(threat.num_targets, num_classes - 1),
                      target_rank=target_rank)
  loss = "dlr" if threat.name == "apgd-t" else threat.name.split("-")[1]
  _check_apgd(threat.eps, threat.norm, loss, num_classes,
              4 if threat.name == "apgd-t" else 3 if loss == "dlr" else 2)
  return apgd_stages_for("apgd-t" if threat.name == "apgd-t" else "apgd-ce", eps=threat.eps,
                         num_steps=threat.num_steps, norm=threat.norm, loss=loss,
                         restarts=threat.restarts,
                         num_targets=min(threat.num_targets, num_classes - 1),
                         target_rank=target_rank)


def apgd_stages_for(name: str, *, eps: float, num_steps: int, norm: str, restarts: int = 1,
                    loss: str = "dlr", target_class: int | None = None, num_targets: int = 9,
                    target_rank=None, rho: float = 0.75) -> Stages:
  """The stages of `apgd` ('apgd-ce' for any untargeted loss or one `target_class`) or of
  `apgd_targeted` ('apgd-t': every target x restart, or the one `target_rank`)."""
  if name == "apgd-t":
    ranks = _target_ranks(num_targets, restarts, target_rank)
    targets_of = lambda clean: jax.vmap(lambda r: _ranked_classes(clean, r))(ranks)
    return apgd_stages(eps=eps, num_steps=num_steps, loss="dlr", norm=norm, runs=len(ranks),
                       targets_of=targets_of, rho=rho)
  targets_of = None
  if target_class is not None:
    targets_of = lambda clean: jnp.broadcast_to(_ranked_classes(clean, target_class),
                                                (restarts, clean.shape[0]))
  return apgd_stages(eps=eps, num_steps=num_steps, loss=loss, norm=norm, runs=restarts,
                     targets_of=targets_of, rho=rho)


# ---------------------------------------------------------------------------------------------
# FAB-T (Croce & Hein, ICML 2020): minimal-norm adversarial points found by projecting onto the
# linearised decision boundary between the true class and one target class.
# ---------------------------------------------------------------------------------------------


def boundary_step(points: jax.Array, w: jax.Array, c: jax.Array, norm: str) -> jax.Array:
  """Per row, the step d of least L-inf or L2 norm with w . d = c and points + d in [0, 1].

  Rows are flattened examples. Moving coordinate i by lam * unit_i (unit 1 for L-inf, |w_i| for
  L2) in the direction that raises w . d, until its room to the box is used, makes w . d a
  concave piecewise-linear function of lam; its breakpoints, sorted, give the smallest lam that
  reaches c. Where even the whole box cannot reach c, the step ignores the box (its projection
  onto the hyperplane alone; the caller clips).
  """
  sign = jnp.where(c < 0, -1.0, 1.0)
  w, c = w * sign[:, None], jnp.abs(c)
  magnitude = jnp.abs(w)
  room = jnp.where(w > 0, 1.0 - points, points)
  unit = jnp.ones_like(w) if norm == "linf" else magnitude
  slope = magnitude * unit  # d(w . d) / d(lam) while coordinate i moves.
  breakpoint = jnp.where(unit > 0, room / jnp.maximum(unit, 1e-30), 1e30)
  order = jnp.argsort(breakpoint, axis=1)
  sorted_break = jnp.take_along_axis(breakpoint, order, axis=1)
  sorted_slope = jnp.take_along_axis(slope, order, axis=1)
  saturated = jnp.cumsum(sorted_slope * sorted_break, axis=1) - sorted_slope * sorted_break
  moving = jnp.flip(jnp.cumsum(jnp.flip(sorted_slope, 1), axis=1), 1)
  reached = saturated + sorted_break * moving  # w . d when lam is at each breakpoint.
  k = jnp.sum(reached < c[:, None], axis=1)
  feasible = k < w.shape[1]
  k = jnp.minimum(k, w.shape[1] - 1)[:, None]
  tail = jnp.take_along_axis(moving, k, axis=1)[:, 0]
  lam = jnp.where(tail > 0, (c - jnp.take_along_axis(saturated, k, axis=1)[:, 0])
                  / jnp.maximum(tail, 1e-30), 0.0)
  free = c / jnp.maximum(jnp.sum(slope, axis=1), 1e-30)  # The box-free step's lam.
  lam = jnp.where(feasible, lam, free)[:, None]
  step = jnp.where(feasible[:, None], jnp.minimum(lam * unit, room), lam * unit)
  return jnp.sign(w) * step


def _fab_distance(d: jax.Array, norm: str) -> jax.Array:
  """Per row of flat perturbations, its norm."""
  return jnp.max(jnp.abs(d), axis=1) if norm == "linf" else jnp.sqrt(jnp.sum(d * d, axis=1))


def _fab_step(logits_fn: LogitsFn, images, labels, targets, carry, *, norm, alpha_max, eta,
              beta):
  """One targeted FAB iteration on flat points: (x, best, best_norm) -> the next."""
  n = images.shape[0]
  x0 = images.reshape(n, -1)
  expand = lambda v: v[:, None]
  distance = lambda d: _fab_distance(d, norm)

  def difference(x):
    logits = logits_fn(x.reshape(images.shape))
    pick = lambda classes: jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]
    values = pick(targets) - pick(labels)  # < 0 while the true class beats the target.
    return jnp.sum(values), values

  x, best, best_norm = carry
  grad, values = jax.grad(difference, has_aux=True)(x)
  # The linearised boundary {z: values + grad . (z - x) = 0}, reached from x and from x0.
  d_from_x = boundary_step(x, grad, -values, norm)
  d_from_x0 = boundary_step(x0, grad, jnp.sum(grad * (x - x0), axis=1) - values, norm)
  a1 = jnp.maximum(distance(d_from_x), 1e-8)
  a2 = jnp.maximum(distance(d_from_x0), 1e-8)
  alpha = expand(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max))
  x = jnp.clip((x + eta * d_from_x) * (1 - alpha) + (x0 + eta * d_from_x0) * alpha, 0.0, 1.0)
  fooled = jnp.argmax(logits_fn(x.reshape(images.shape)), axis=1) != labels
  size = distance(x - x0)
  better = fooled & (size < best_norm)
  best = jnp.where(expand(better), x, best)
  best_norm = jnp.where(better, size, best_norm)
  # Back towards the image from a point that fools the model: look for a closer one.
  x = jnp.where(expand(fooled), x0 + beta * (x - x0), x)
  return x, best, best_norm


def fab_stages(*, eps: float, num_steps: int, norm: str, restarts: int, num_targets: int,
               target_rank=None, alpha_max: float = 0.1, eta: float = 1.05,
               beta: float = 0.9) -> Stages:
  """FAB-T's runs (targets x restarts, or the one `target_rank`) as stages, under one vmap."""
  ranks = _target_ranks(num_targets, restarts, target_rank)
  settings = dict(norm=norm, alpha_max=alpha_max, eta=eta, beta=beta)

  def start(logits_fn, images, labels, key):
    clean_logits = jax.lax.stop_gradient(logits_fn(images))
    targets = jax.vmap(lambda r: _ranked_classes(clean_logits, r))(ranks)
    random = jnp.tile(jnp.arange(restarts) > 0, len(ranks) // restarts)

    def first_point(k, is_random):
      direction = (jax.random.uniform(k, images.shape, minval=-1.0, maxval=1.0)
                   if norm == "linf" else jax.random.normal(k, images.shape))
      direction = direction / (_norm_per_example(direction, norm) + 1e-12)
      point = jnp.where(is_random, jnp.clip(images + 0.5 * eps * direction, 0.0, 1.0), images)
      n = images.shape[0]
      return point.reshape(n, -1), images.reshape(n, -1), jnp.full((n,), jnp.inf)

    return targets, jax.vmap(first_point)(jax.random.split(key, len(ranks)), random)

  def step(logits_fn, images, labels, i, carry):
    targets, runs = carry
    one = lambda t, c: _fab_step(logits_fn, images, labels, t, c, **settings)
    return targets, jax.vmap(one)(targets, runs)

  def finish(logits_fn, images, labels, carry):
    _, best, size = carry[1]
    best = best.reshape((-1,) + images.shape)
    within = (size <= eps).reshape(size.shape + (1,) * (images.ndim - 1))
    candidates = jnp.where(within, best, images[None])
    return jax.lax.stop_gradient(worst_case(logits_fn, _with_clean(images, candidates), labels))

  return Stages(start, step, finish, num_steps)


def _check_fab(eps: float, norm: str, num_classes: int) -> None:
  """One-line errors for settings FAB-T cannot run with."""
  _check(eps, norm, "margin")
  if num_classes < 2:
    raise ValueError(f"{num_classes} classes: FAB-T needs at least 2")


def fab_targeted(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
                 eps: float, num_steps: int = 100, num_targets: int = 9, norm: str = "linf",
                 restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, target_rank=None) -> jax.Array:
  """FAB-T (AutoAttack's 'fab-t'): per target among the top `num_targets` other classes, FAB's
  minimal-norm search; an example is broken when some target gives a point within eps.

  The first restart starts at the image (AutoAttack's standard run: one restart, so no
  randomness); later ones at a random point of norm eps / 2. Targets and restarts run under one
  vmap (`target_rank=k`, which may be traced: the k-th largest clean logit's class only);
  returns, per example, the adversarial point within eps if one was found, else the image.
  """
  num_classes = jax.eval_shape(logits_fn, images).shape[1]
  _check_fab(eps, norm, num_classes)
  stages = fab_stages(eps=eps, num_steps=num_steps, norm=norm, restarts=restarts,
                      num_targets=min(num_targets, num_classes - 1), target_rank=target_rank,
                      alpha_max=alpha_max, eta=eta, beta=beta)
  return drive(stages, logits_fn, images, labels, key)


# ---------------------------------------------------------------------------------------------
# Square attack (Andriushchenko et al., ECCV 2020; score-based): a random start, then at each
# query one random square window changed, kept when the margin improves. L-inf: stripes of
# +-eps, then squares of +-2 eps. L2: a grid of nested-rectangle patterns, then the mass of one
# window moved into another with a fresh pattern, every point at norm eps.
# ---------------------------------------------------------------------------------------------


# AutoAttack's standard Square budget; its p schedule runs unrescaled at this budget.
STANDARD_SQUARE_QUERIES = 5000


def square_rescaled(num_queries: int) -> bool:
  """Whether Square's p schedule is rescaled: only when the budget is not the standard one."""
  return num_queries != STANDARD_SQUARE_QUERIES


def square_fraction(query: int, num_queries: int, p_init: float = 0.8) -> float:
  """AutoAttack's p_selection: the fraction of pixels a square covers at this query.

  The schedule is written for 10,000 queries. At the standard 5,000 it runs as written
  (AutoAttack's standard version, `resc_schedule=False`: squares never shrink past the 4,000th
  query's); at any other budget it is rescaled to `num_queries`, as `resc_schedule=True` does.
  """
  it = int(query / num_queries * 10000) if square_rescaled(num_queries) else query
  halvings = sum(it > bound for bound in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
  return p_init / 2 ** halvings


def square_sizes(num_queries: int, height: int, width: int, p_init: float = 0.8,
                 norm: str = "linf") -> np.ndarray:
  """Side of the square at each query: round(sqrt(p * H * W)), at least 1 (L-inf) or an odd
  number at least 3 (L2, as the reference), and at most min(H, W)."""
  sizes = []
  for q in range(num_queries):
    side = int(round(np.sqrt(square_fraction(q, num_queries, p_init) * height * width)))
    if norm == "linf":
      sizes.append(max(side, 1))
    else:
      side = max(side, 3)
      sizes.append(side + 1 - side % 2)
  return np.minimum(np.asarray(sizes, np.int32), min(height, width))


def _corners(key: jax.Array, n: int, height: int, width: int, size) -> tuple[jax.Array, ...]:
  """Per example, a window's top-left corner in [0, side - size), as the reference draws it
  (the last position is never drawn)."""
  k_row, k_col = jax.random.split(key)
  top = jnp.floor(jax.random.uniform(k_row, (n,)) * (height - size)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_col, (n,)) * (width - size)).astype(jnp.int32)
  return top, left


def _window(shape, top, left, size) -> jax.Array:
  """(N, H, W, 1) mask of each example's size x size window at (top, left)."""
  rows = jnp.arange(shape[1])[None, :, None, None]
  cols = jnp.arange(shape[2])[None, None, :, None]
  top, left = top[:, None, None, None], left[:, None, None, None]
  return (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)


def _linf_start(key, images, eps):
  """Vertical stripes of +-eps, one sign per (example, column, channel)."""
  n, _, width, channels = images.shape
  stripes = jax.random.rademacher(key, (n, 1, width, channels), jnp.float32)
  return jnp.clip(images + eps * stripes, 0.0, 1.0)


def _linf_proposal(key, images, x_best, size, eps):
  """x_best with one random window set to +-2 eps per channel, projected."""
  n, height, width, channels = images.shape
  k_corner, k_sign = jax.random.split(key)
  inside = _window(images.shape, *_corners(k_corner, n, height, width, size), size)
  signs = jax.random.rademacher(k_sign, (n, 1, 1, channels), jnp.float32)
  x_new = jnp.where(inside, x_best + 2.0 * eps * signs, x_best)
  return jnp.clip(jnp.clip(x_new, images - eps, images + eps), 0.0, 1.0)


def _inverse_squares(length: int) -> jax.Array:
  """H with H[n] = sum_{k=1}^{n} 1 / k^2, for n up to `length`."""
  return jnp.concatenate([jnp.zeros(1), jnp.cumsum(1.0 / jnp.arange(1, length + 1) ** 2)])


def _rectangle(i, j, rows, cols, table):
  """The reference's L2 building block on a rows x cols rectangle, at local (i, j): nested
  rectangles around its centre, the k-th (k = 0, 1, ...) adding 1 / (k + 1)^2; 0 outside."""
  depth = jnp.maximum(jnp.abs(i - rows // 2), jnp.abs(j - cols // 2))
  count = jnp.maximum(rows // 2 + 1, cols // 2 + 1)
  inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols) & (depth < count)
  return jnp.where(inside, table[count] - table[jnp.minimum(depth, count)], 0.0)


def _pattern(i, j, size, transpose, extent: int):
  """The reference's `eta(size)` at local (i, j), transposed where `transpose`: a unit-norm
  rectangle pattern on the top half and its negative on the bottom half, in all unit norm."""
  i, j = jnp.where(transpose, j, i), jnp.where(transpose, i, j)
  table = _inverse_squares(extent + 2)
  half = size // 2
  grid_i, grid_j = jnp.arange(extent)[:, None], jnp.arange(extent)[None, :]
  norm = lambda r: jnp.sqrt(jnp.sum(_rectangle(grid_i, grid_j, r, size, table) ** 2))
  top_norm, bottom_norm = norm(half), norm(size - half)
  top = _rectangle(i, j, half, size, table) / jnp.maximum(top_norm, 1e-12)
  bottom = _rectangle(i - half, j, size - half, size, table) / jnp.maximum(bottom_norm, 1e-12)
  halves = (top_norm > 0).astype(jnp.float32) + (bottom_norm > 0)
  return (top - bottom) / jnp.sqrt(halves)


def _l2_norm(x: jax.Array, axes=(1, 2, 3)) -> jax.Array:
  """The L2 norm over `axes`, kept as size-1 axes."""
  return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def _l2_start(key, images, eps):
  """A grid of patterns of side H // 5, each with a random sign per channel, at norm eps."""
  n, height, width, channels = images.shape
  side = height // 5
  offset = (height - 5 * side) // 2
  across, down = width // side, height // side
  k_sign, k_transpose = jax.random.split(key)
  signs = jax.random.rademacher(k_sign, (n, down, across, channels), jnp.float32)
  transpose = jax.random.bernoulli(k_transpose, 0.5, (n, down, across))
  rows, cols = jnp.arange(height) - offset, jnp.arange(width) - offset
  row_cell, col_cell = jnp.clip(rows // side, 0, down - 1), jnp.clip(cols // side, 0, across - 1)
  covered = ((rows >= 0) & (rows // side < down))[:, None] & (
      (cols >= 0) & (cols // side < across))[None, :]
  flip = transpose[:, row_cell][:, :, col_cell]  # (N, H, W)
  value = _pattern((rows % side)[None, :, None], (cols % side)[None, None, :], side, flip,
                   max(height, width))
  delta = jnp.where(covered[None, :, :, None],
                    value[..., None] * signs[:, row_cell][:, :, col_cell], 0.0)
  return jnp.clip(images + eps * delta / (_l2_norm(delta) + 1e-12), 0.0, 1.0)


def _l2_proposal(key, images, x_best, size, eps):
  """x_best's perturbation with window 2 emptied and window 1 redrawn (its old direction plus a
  fresh pattern, scaled to the freed budget), rescaled to norm eps."""
  n, height, width, channels = images.shape
  k_first, k_second, k_sign, k_transpose = jax.random.split(key, 4)
  top, left = _corners(k_first, n, height, width, size)
  first = _window(images.shape, top, left, size)
  second = _window(images.shape, *_corners(k_second, n, height, width, size), size)
  delta = x_best - images
  first_norm = _l2_norm(jnp.where(first, delta, 0.0), (1, 2))  # Per (example, channel).
  image_norm = _l2_norm(delta)
  windows_norm = _l2_norm(jnp.where(first | second, delta, 0.0))
  rows = jnp.arange(height)[None, :, None] - top[:, None, None]
  cols = jnp.arange(width)[None, None, :] - left[:, None, None]
  transpose = jax.random.bernoulli(k_transpose, 0.5, (n, 1, 1))
  pattern = _pattern(rows, cols, size, transpose, max(height, width))[..., None]
  signs = jax.random.rademacher(k_sign, (n, 1, 1, channels), jnp.float32)
  new = jnp.where(first, pattern * signs + delta / (first_norm + 1e-12), 0.0)
  budget = jnp.sqrt(jnp.maximum(eps**2 - image_norm**2, 0.0) / channels + windows_norm**2)
  new = new / (_l2_norm(new, (1, 2)) + 1e-12) * budget
  delta = jnp.where(first, new, jnp.where(second, 0.0, delta))
  return jnp.clip(images + eps * delta / (_l2_norm(delta) + 1e-12), 0.0, 1.0)


def _square_single(logits_fn: LogitsFn, images, labels, key, *, eps, num_queries, p_init, norm):
  """One Square run (margin loss); returns the best point of each example."""
  _, height, width, _ = images.shape
  sizes = jnp.asarray(square_sizes(num_queries, height, width, p_init, norm))
  start, propose = (_linf_start, _linf_proposal) if norm == "linf" else (_l2_start,
                                                                          _l2_proposal)
  start_key, key = jax.random.split(key)
  x_best = start(start_key, images, eps)
  margin_best = margin(logits_fn(x_best), labels)
  expand = lambda v: v[:, None, None, None]

  def query(i, carry):
    x_best, margin_best = carry
    x_new = propose(jax.random.fold_in(key, i), images, x_best, sizes[i], eps)
    margin_new = margin(logits_fn(x_new), labels)
    # Only still-robust examples move: to a higher margin, or to any misclassified point.
    accept = (margin_best < 0) & ((margin_new > margin_best) | (margin_new >= 0))
    return (jnp.where(expand(accept), x_new, x_best), jnp.where(accept, margin_new, margin_best))

  return jax.lax.fori_loop(0, num_queries, query, (x_best, margin_best))[0]


def square(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
           eps: float, num_queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
           norm: str = "linf") -> jax.Array:
  """The Square attack (L-inf or L2): `num_queries` model calls per restart, no gradients.

  A fixed-length `lax.fori_loop`; an example stops changing once misclassified. Restarts run
  under vmap and are combined point-wise. L2 needs images of at least 5 x 5 pixels.
  """
  _check(eps, norm, "margin")
  if norm == "l2" and min(images.shape[1:3]) < 5:
    raise ValueError(f"images of {images.shape[1]}x{images.shape[2]}: L2 Square needs at "
                     "least 5x5")
  run = lambda k: _square_single(logits_fn, images, labels, k, eps=eps,
                                 num_queries=num_queries, p_init=p_init, norm=norm)
  candidates = jax.vmap(run)(jax.random.split(key, restarts))
  return jax.lax.stop_gradient(worst_case(logits_fn, _with_clean(images, candidates), labels))


# ---------------------------------------------------------------------------------------------
# By name.
# ---------------------------------------------------------------------------------------------

# Bumped when an attack's code changes what it computes, so stale evaluation progress (keyed by
# the version) is never reused after a fix. Square 2: the standard, unrescaled schedule at 5,000
# queries, and L2. Every attack +1: a point counts as robust only where it is also right clean.
VERSIONS = {"clean": 1, "fgsm": 2, "pgd": 2, "cw": 2, "apgd-ce": 2, "apgd-dlr": 2, "apgd-t": 2,
            "fab-t": 2, "square": 3}


@dataclasses.dataclass(frozen=True)
class AttackKind:
  """What the registry knows of one attack."""

  white_box: bool  # Follows the model's gradients (gradient masking can fool it).
  task_form: str = ""  # How a task names it ('' = evaluation only); '<steps>' is a number.


# The one list of attacks: tasks, evaluation, configs and the gradient-masking checks read it.
REGISTRY: dict[str, AttackKind] = {
    "clean": AttackKind(white_box=False, task_form="clean"),
    "fgsm": AttackKind(white_box=True, task_form="fgsm"),
    "pgd": AttackKind(white_box=True, task_form="pgd-<steps>"),
    "cw": AttackKind(white_box=True, task_form="cw-<steps>"),
    "apgd-ce": AttackKind(white_box=True, task_form="apgd-<steps>"),
    "apgd-dlr": AttackKind(white_box=True),
    "apgd-t": AttackKind(white_box=True),
    "fab-t": AttackKind(white_box=True),
    "square": AttackKind(white_box=False),
}
ATTACKS = tuple(REGISTRY)
TASK_ATTACKS = tuple(name for name, kind in REGISTRY.items() if kind.task_form)
WHITE_BOX = tuple(name for name, kind in REGISTRY.items() if kind.white_box)
# Composite attacks: the point-wise worst case of their components, each run on the points
# still robust, in this order. 'autoattack' is AutoAttack's standard version; 'aa-lite' omits
# FAB-T, so its robust accuracy is an upper bound on AutoAttack's.
AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
AA_LITE = ("apgd-ce", "apgd-t", "square")
COMPOSITES = {"autoattack": AUTOATTACK, "aa-lite": AA_LITE}
EVALUATION_ATTACKS = ATTACKS + tuple(COMPOSITES)
TARGETED = ("apgd-t", "fab-t")  # Attacks that run once per target class.
TASK_ATTACK_FORMS = ", ".join(REGISTRY[n].task_form for n in TASK_ATTACKS[:-1]) + (
    f" or {REGISTRY[TASK_ATTACKS[-1]].task_form}")


def madry_step_size(eps: float, num_steps: int) -> float:
  """2.5 eps / steps (Madry et al.'s rule), so the attack can cross the ball."""
  return 2.5 * eps / max(num_steps, 1)


def _fraction_of_255(value: float) -> str:
  """An L-inf radius as a decimal and in 1/255 units, e.g. '0.03137 (8/255)'."""
  return f"{value:.4g} ({value * 255:.3g}/255)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThreatModel:
  """One attack with its settings: a task's attack, an evaluation attack or the training one.

  `name` is one of ATTACKS; `num_steps` counts PGD/CW/APGD/FAB iterations and Square's queries;
  without `step_size`, Madry et al.'s rule sets it. Hashable: it is a static jit argument.
  """

  name: str = dataclasses.field(kw_only=False)
  eps: float = 8 / 255
  num_steps: int = 1
  step_size: float | None = None
  norm: str = "linf"
  restarts: int = 1
  num_targets: int = 9  # APGD-T and FAB-T.

  def __post_init__(self):
    if self.name not in REGISTRY:
      raise ValueError(f"attack {self.name!r} is not one of {', '.join(ATTACKS)}")
    if self.step_size is None:
      object.__setattr__(self, "step_size", madry_step_size(self.eps, self.num_steps))

  @property
  def version(self) -> int:
    """The version of the attack's code (VERSIONS), part of every evaluation progress key."""
    return VERSIONS[self.name]

  def key(self) -> str:
    """A short stable name, e.g. 'pgd10-linf-0.03137' (part of a task's key)."""
    steps = "" if self.name in ("clean", "fgsm") else str(self.num_steps)
    return f"{self.name}{steps}-{self.norm}-{self.eps:.4g}"

  def describe(self) -> str:
    """A human-readable label, e.g. 'PGD-20 (CE, L-inf eps=0.03137 (8/255), ...)'."""
    if self.name == "clean":
      return "clean"
    norm = "L-inf" if self.norm == "linf" else "L2"
    eps = _fraction_of_255(self.eps) if self.norm == "linf" else f"{self.eps:g}"
    restarts = f"{self.restarts} restart{'s' if self.restarts > 1 else ''}"
    if self.name == "fgsm":
      return f"FGSM (CE, {norm} eps={eps})"
    if self.name.startswith("apgd"):
      loss = {"apgd-ce": "CE", "apgd-dlr": "DLR"}.get(self.name, f"targeted DLR, "
                                                                 f"{self.num_targets} targets")
      return (f"APGD-{self.name[5:].upper()}-{self.num_steps} ({loss}, {norm} eps={eps}, "
              f"{restarts})")
    if self.name == "fab-t":
      return (f"FAB-T-{self.num_steps} ({self.num_targets} targets, {norm} eps={eps}, "
              f"alpha_max=0.1, eta=1.05, beta=0.9, {restarts})")
    if self.name == "square":
      schedule = ("p schedule rescaled to the budget" if square_rescaled(self.num_steps)
                  else "standard p schedule")
      return (f"Square ({self.num_steps} queries, {schedule}, margin, p_init=0.8, {norm} "
              f"eps={eps}, {restarts})")
    loss = "CE" if self.name == "pgd" else "CW margin"
    step = _fraction_of_255(self.step_size) if self.norm == "linf" else f"{self.step_size:g}"
    return (f"{'PGD' if self.name == 'pgd' else 'CW'}-{self.num_steps} ({loss}, {norm} "
            f"eps={eps}, step={step}, random start, {restarts})")


def parse_task_attack(name: str, eps: float, norm: str = "linf") -> ThreatModel:
  """A task's attack from its form in TASK_ATTACK_FORMS, e.g. 'pgd-10' or 'apgd-100' (APGD-CE).

  Raises ValueError naming the allowed forms.
  """
  forms = {REGISTRY[n].task_form.partition("-")[0]: n for n in TASK_ATTACKS}
  kind, _, steps = name.partition("-") if isinstance(name, str) else ("", "", "")
  stepped = kind in forms and REGISTRY[forms[kind]].task_form.endswith("<steps>")
  if kind not in forms or stepped != (steps.isdigit() and int(steps) > 0) or (
      not stepped and steps):
    raise ValueError(f"attack {name!r}: expected {TASK_ATTACK_FORMS}")
  return ThreatModel(forms[kind], eps=eps, num_steps=int(steps) if stepped else 1, norm=norm)


def attack(name: str, logits_fn: LogitsFn, images, labels, key, *, eps, step_size=0.0,
           num_steps=1, norm="linf", restarts=1, num_targets=9, unroll=True,
           target_rank=None) -> jax.Array:
  """A named attack of ATTACKS. `num_steps` counts APGD and FAB iterations and Square's queries."""
  if name == "clean":
    return images
  if name == "fgsm":
    return fgsm(logits_fn, images, labels, key, eps=eps, norm=norm)
  if name in ("pgd", "cw"):
    return pgd(logits_fn, images, labels, key, eps=eps, step_size=step_size,
               num_steps=num_steps, loss="ce" if name == "pgd" else "margin", norm=norm,
               restarts=restarts, unroll=unroll)
  if name in ("apgd-ce", "apgd-dlr"):
    return apgd(logits_fn, images, labels, key, eps=eps, num_steps=num_steps,
                loss=name.split("-")[1], norm=norm, restarts=restarts, unroll=unroll)
  if name == "apgd-t":
    return apgd_targeted(logits_fn, images, labels, key, eps=eps, num_steps=num_steps,
                         num_targets=num_targets, norm=norm, restarts=restarts, unroll=unroll,
                         target_rank=target_rank)
  if name == "fab-t":
    return fab_targeted(logits_fn, images, labels, key, eps=eps, num_steps=num_steps,
                        num_targets=num_targets, norm=norm, restarts=restarts,
                        target_rank=target_rank)
  if name == "square":
    return square(logits_fn, images, labels, key, eps=eps, num_queries=num_steps,
                  restarts=restarts, norm=norm)
  raise ValueError(f"attack {name!r} is not one of {', '.join(ATTACKS)}")


def run(threat: ThreatModel, logits_fn: LogitsFn, images, labels, key,
        unroll: bool = True, target_rank=None) -> jax.Array:
  """The adversarial images of `threat` against `logits_fn` (call it with eval-mode BN);
  `target_rank` runs a targeted attack (TARGETED) against that one target rank."""
  return attack(threat.name, logits_fn, images, labels, key, eps=threat.eps,
                step_size=threat.step_size, num_steps=threat.num_steps, norm=threat.norm,
                restarts=threat.restarts, num_targets=threat.num_targets, unroll=unroll,
                target_rank=target_rank)
