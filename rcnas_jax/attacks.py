"""White-box attacks on any `logits_fn(images) -> logits` over images in [0, 1].

An attack is a composition: a per-example loss (`LOSSES`), a random start, a steepest-ascent
step for the norm, and a projection onto the eps-ball intersected with [0, 1]. Everything is
pure and jittable; `unroll=True` writes the step loop out (2-4x faster on XLA:CPU), `False`
uses `lax.fori_loop` (compiles faster, the better choice on GPU/TPU). Restarts run under
`vmap` and are combined point-wise: each example keeps its worst case.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
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


LOSSES = {"ce": cross_entropy, "margin": margin, "kl": kl_divergence}


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
  if eps < 0:
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


def attack(name: str, logits_fn: LogitsFn, images, labels, key, *, eps, step_size, num_steps,
           norm="linf", restarts=1, unroll=True) -> jax.Array:
  """A named attack: 'clean', 'fgsm', 'pgd' (CE) or 'cw' (margin loss)."""
  if name == "clean":
    return images
  if name == "fgsm":
    return fgsm(logits_fn, images, labels, key, eps=eps, norm=norm)
  if name in ("pgd", "cw"):
    return pgd(logits_fn, images, labels, key, eps=eps, step_size=step_size,
               num_steps=num_steps, loss="ce" if name == "pgd" else "margin", norm=norm,
               restarts=restarts, unroll=unroll)
  raise ValueError(f"attack {name!r} is not one of {', '.join(ATTACKS)}")


ATTACKS = ("clean", "fgsm", "pgd", "cw")
