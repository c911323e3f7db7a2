"""Attacks on any `logits_fn(images) -> logits` over images in [0, 1].

An attack is a composition: a per-example loss (`LOSSES`), a random start, a steepest-ascent
step for the norm, and a projection onto the eps-ball intersected with [0, 1]. Everything is
pure and jittable; `unroll=True` writes the step loop out (faster on XLA:CPU), `False`
uses `lax.fori_loop` (compiles faster, the better choice on GPU/TPU). Restarts run under
`vmap` and are combined point-wise: each example keeps its worst case.

AutoAttack's attacks (Croce & Hein, ICML 2020) follow the reference implementation's algorithm:
APGD (`apgd`, `apgd_targeted`) with its step-size schedule, and the score-based Square attack
(`square`, Andriushchenko et al., ECCV 2020) with a fixed query budget.
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


def _apgd_single(logits_fn: LogitsFn, images, labels, key, targets, *, eps, num_steps, loss,
                 norm, rho, unroll) -> tuple[jax.Array, jax.Array]:
  """One APGD run from one random start: (adversarial images, fooled mask)."""
  per_example = ((lambda z: targeted_dlr(z, labels, targets)) if targets is not None
                 else (lambda z: LOSSES[loss](z, labels)))

  def loss_and_grad(x):
    def total(x):
      logits = logits_fn(x)
      values = per_example(logits)
      return jnp.sum(values), (values, logits)
    (_, (values, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return values, jnp.argmax(logits, axis=1) != labels, grad

  windows = jnp.asarray(apgd_checkpoints(num_steps))
  expand = lambda v: v.reshape((-1,) + (1,) * (images.ndim - 1))
  pick = lambda mask, a, b: jnp.where(expand(mask) if a.ndim > 1 else mask, a, b)

  def step(i, s: _ApgdState) -> _ApgdState:
    momentum = jnp.where(i > 0, 0.75, 1.0)
    z = project(s.x + expand(s.step_size) * ascent_direction(s.grad, norm), images, eps, norm)
    x = project(s.x + momentum * (z - s.x) + (1 - momentum) * (s.x - s.x_previous), images,
                eps, norm)
    values, wrong, grad = loss_and_grad(x)
    improved = values > s.loss_best
    x_best, grad_best = pick(improved, x, s.x_best), pick(improved, grad, s.grad_best)
    loss_best = jnp.where(improved, values, s.loss_best)
    increases = s.increases + (values > s.loss_previous)
    window = windows[i]
    # Halve where the loss rose in at most rho of the window's steps, or where the best loss did
    # not improve and the step was not halved at the last checkpoint; restart from the best.
    halve = (window > 0) & ((increases <= window * rho) |
                            (~s.halved_at_check & (s.loss_best_at_check >= loss_best)))
    at_check = window > 0
    return _ApgdState(
        x=pick(halve, x_best, x), x_previous=s.x, grad=pick(halve, grad_best, grad),
        step_size=jnp.where(halve, s.step_size / 2, s.step_size), x_best=x_best,
        grad_best=grad_best, loss_best=loss_best,
        x_adversarial=pick(wrong, x, s.x_adversarial), fooled=s.fooled | wrong,
        loss_previous=values, increases=jnp.where(at_check, 0, increases),
        loss_best_at_check=jnp.where(at_check, loss_best, s.loss_best_at_check),
        halved_at_check=jnp.where(at_check, halve, s.halved_at_check))

  x0 = _apgd_start(key, images, eps, norm)
  values, wrong, grad = loss_and_grad(x0)
  n = images.shape[0]
  init = _ApgdState(x=x0, x_previous=x0, grad=grad, step_size=jnp.full((n,), 2.0 * eps),
                    x_best=x0, grad_best=grad, loss_best=values, x_adversarial=x0, fooled=wrong,
                    loss_previous=jnp.zeros_like(values), increases=jnp.zeros(n, jnp.int32),
                    loss_best_at_check=values, halved_at_check=jnp.ones(n, bool))
  if unroll:
    for i in range(num_steps):
      init = step(i, init)
    final = init
  else:
    final = jax.lax.fori_loop(0, num_steps, step, init)
  return pick(final.fooled, final.x_adversarial, final.x_best), final.fooled


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
  targets = None
  if target_class is not None:
    targets = _ranked_classes(jax.lax.stop_gradient(logits_fn(images)), target_class)
  run = lambda k: _apgd_single(logits_fn, images, labels, k, targets, eps=eps,
                               num_steps=num_steps, loss=loss, norm=norm, rho=rho,
                               unroll=unroll)[0]
  candidates = jax.vmap(run)(jax.random.split(key, restarts))
  return jax.lax.stop_gradient(worst_case(logits_fn, _with_clean(images, candidates), labels))


def apgd_targeted(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array,
                  *, eps: float, num_steps: int = 100, num_targets: int = 9,
                  norm: str = "linf", restarts: int = 1, rho: float = 0.75,
                  unroll: bool = False) -> jax.Array:
  """APGD-T: targeted DLR against each of the top `num_targets` other classes; worst case.

  Targets and restarts run under one vmap (memory grows with num_targets x restarts).
  """
  num_classes = jax.eval_shape(logits_fn, images).shape[1]
  _check_apgd(eps, norm, "dlr", num_classes, 4)
  num_targets = min(num_targets, num_classes - 1)
  clean_logits = jax.lax.stop_gradient(logits_fn(images))
  ranks = jnp.repeat(jnp.arange(2, num_targets + 2), restarts)

  def run(rank, k):
    return _apgd_single(logits_fn, images, labels, k, _ranked_classes(clean_logits, rank),
                        eps=eps, num_steps=num_steps, loss="dlr", norm=norm, rho=rho,
                        unroll=unroll)[0]

  candidates = jax.vmap(run)(ranks, jax.random.split(key, len(ranks)))
  return jax.lax.stop_gradient(worst_case(logits_fn, _with_clean(images, candidates), labels))


# ---------------------------------------------------------------------------------------------
# Square attack (L-inf, score-based): random vertical stripes, then random squares of +-2 eps.
# ---------------------------------------------------------------------------------------------


def square_fraction(query: int, num_queries: int, p_init: float = 0.8) -> float:
  """AutoAttack's p_selection: the fraction of pixels a square covers at this query.

  The schedule is written for 10,000 queries and rescaled to `num_queries`.
  """
  it = int(query / num_queries * 10000)
  halvings = sum(it > bound for bound in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
  return p_init / 2 ** halvings


def square_sizes(num_queries: int, height: int, width: int, p_init: float = 0.8) -> np.ndarray:
  """Side of the square at each query: round(sqrt(p * H * W)), at least 1 and at most min(H, W)."""
  sizes = [max(int(round(np.sqrt(square_fraction(q, num_queries, p_init) * height * width))), 1)
           for q in range(num_queries)]
  return np.minimum(np.asarray(sizes, np.int32), min(height, width))


def _square_single(logits_fn: LogitsFn, images, labels, key, *, eps, num_queries, p_init):
  """One Square run (L-inf, margin loss); returns the best point of each example."""
  n, height, width, channels = images.shape
  sizes = jnp.asarray(square_sizes(num_queries, height, width, p_init))
  expand = lambda v: v[:, None, None, None]
  stripes_key, key = jax.random.split(key)
  stripes = jax.random.rademacher(stripes_key, (n, 1, width, channels), jnp.float32)
  x_best = jnp.clip(images + eps * stripes, 0.0, 1.0)
  margin_best = margin(logits_fn(x_best), labels)
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]

  def query(i, carry):
    x_best, margin_best = carry
    size = sizes[i]
    k_row, k_col, k_sign = jax.random.split(jax.random.fold_in(key, i), 3)
    # Corners in [0, side - size), as the reference (the last position is never drawn).
    top = jnp.floor(jax.random.uniform(k_row, (n,)) * (height - size)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_col, (n,)) * (width - size)).astype(jnp.int32)
    inside = ((rows >= expand(top)) & (rows < expand(top) + size) &
              (cols >= expand(left)) & (cols < expand(left) + size))
    signs = jax.random.rademacher(k_sign, (n, 1, 1, channels), jnp.float32)
    x_new = jnp.where(inside, x_best + 2.0 * eps * signs, x_best)
    x_new = jnp.clip(jnp.clip(x_new, images - eps, images + eps), 0.0, 1.0)
    margin_new = margin(logits_fn(x_new), labels)
    accept = (margin_best < 0) & ((margin_new > margin_best) | (margin_new >= 0))
    return (jnp.where(expand(accept), x_new, x_best), jnp.where(accept, margin_new, margin_best))

  return jax.lax.fori_loop(0, num_queries, query, (x_best, margin_best))[0]


def square(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
           eps: float, num_queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
           norm: str = "linf") -> jax.Array:
  """The L-inf Square attack: `num_queries` model calls per restart, no gradients.

  A fixed-length `lax.fori_loop`; an example stops changing once misclassified. Restarts run
  under vmap and are combined point-wise.
  """
  if norm != "linf":
    raise ValueError(f"norm={norm!r}: the Square attack here is L-inf only")
  _check(eps, norm, "margin")
  run = lambda k: _square_single(logits_fn, images, labels, k, eps=eps,
                                 num_queries=num_queries, p_init=p_init)
  candidates = jax.vmap(run)(jax.random.split(key, restarts))
  return jax.lax.stop_gradient(worst_case(logits_fn, _with_clean(images, candidates), labels))


# ---------------------------------------------------------------------------------------------
# By name.
# ---------------------------------------------------------------------------------------------


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
    "square": AttackKind(white_box=False),
}
ATTACKS = tuple(REGISTRY)
TASK_ATTACKS = tuple(name for name, kind in REGISTRY.items() if kind.task_form)
WHITE_BOX = tuple(name for name, kind in REGISTRY.items() if kind.white_box)
AA_LITE = ("apgd-ce", "apgd-t", "square")  # AA-lite's attacks, in the order they run.
EVALUATION_ATTACKS = ATTACKS + ("aa-lite",)  # 'aa-lite': the point-wise worst case of AA_LITE.
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

  `name` is one of ATTACKS; `num_steps` counts PGD/CW/APGD iterations and Square's queries;
  without `step_size`, Madry et al.'s rule sets it. Hashable: it is a static jit argument.
  """

  name: str = dataclasses.field(kw_only=False)
  eps: float = 8 / 255
  num_steps: int = 1
  step_size: float | None = None
  norm: str = "linf"
  restarts: int = 1
  num_targets: int = 9  # APGD-T only.

  def __post_init__(self):
    if self.name not in REGISTRY:
      raise ValueError(f"attack {self.name!r} is not one of {', '.join(ATTACKS)}")
    if self.step_size is None:
      object.__setattr__(self, "step_size", madry_step_size(self.eps, self.num_steps))

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
    if self.name == "square":
      return f"Square ({self.num_steps} queries, margin, p_init=0.8, {norm} eps={eps}, {restarts})"
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
           num_steps=1, norm="linf", restarts=1, num_targets=9, unroll=True) -> jax.Array:
  """A named attack of ATTACKS. `num_steps` counts APGD iterations and Square's queries."""
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
                         num_targets=num_targets, norm=norm, restarts=restarts, unroll=unroll)
  if name == "square":
    return square(logits_fn, images, labels, key, eps=eps, num_queries=num_steps,
                  restarts=restarts, norm=norm)
  raise ValueError(f"attack {name!r} is not one of {', '.join(ATTACKS)}")


def run(threat: ThreatModel, logits_fn: LogitsFn, images, labels, key,
        unroll: bool = True) -> jax.Array:
  """The adversarial images of `threat` against `logits_fn` (call it with eval-mode BN)."""
  return attack(threat.name, logits_fn, images, labels, key, eps=threat.eps,
                step_size=threat.step_size, num_steps=threat.num_steps, norm=threat.norm,
                restarts=threat.restarts, num_targets=threat.num_targets, unroll=unroll)
