"""Local Lipschitz estimates: LIPS, the attack level of the state encoder (METHOD §3).

LIPS is the spectral norm of the per-example input Jacobian J = d logits / d x at (attacked)
inputs. J is never formed: power iteration on J^T J needs only J v (forward mode, `jax.linearize`,
i.e. `jax.jvp` with the primal pass done once) and J^T u (`jax.vjp`), so the cost per iteration
is about two forward passes whatever the input size. Examples are independent in eval mode, so
the iteration is written for one example and `vmap`ped; it runs in a `lax.fori_loop` and is
jittable with `logits_fn` closed over. Power iteration approaches the top singular value from
below (||J v|| <= sigma_max for unit v, non-decreasing over iterations); 20 iterations are a few
percent low, and `power_iteration` returns its vectors so a caller can continue later.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Power iteration on the Jacobian of a function at one point.
# ---------------------------------------------------------------------------------------------


def _unit(v: jax.Array, fallback: jax.Array) -> jax.Array:
  """v / ||v||, or `fallback` where v is zero (a zero Jacobian must not give NaN)."""
  norm = jnp.sqrt(jnp.sum(v * v))
  return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), fallback)


def _power_single(fn: Callable[[jax.Array], jax.Array], x: jax.Array, v: jax.Array,
                  num_iters: int) -> tuple[jax.Array, jax.Array]:
  """(||J v||, v) after `num_iters` steps v <- J^T J v / ||.||, J the Jacobian of fn at x."""
  _, jvp_fn = jax.linearize(fn, x)
  _, vjp_fn = jax.vjp(fn, x)
  v = _unit(v, jnp.full_like(x, 1.0 / math.sqrt(x.size)))

  def step(_, v):
    (w,) = vjp_fn(jvp_fn(v))
    return _unit(w, v)  # A zero J^T J v keeps the previous (unit) vector.

  v = jax.lax.fori_loop(0, num_iters, step, v)
  return jnp.sqrt(jnp.sum(jnp.square(jvp_fn(v)))), v


def power_iteration(logits_fn: LogitsFn, images: jax.Array, vectors: jax.Array,
                    num_iters: int) -> tuple[jax.Array, jax.Array]:
  """Per-example (sigma (N,), unit vectors like images) after num_iters steps from `vectors`.

  sigma_n = ||J_n v_n|| for the returned unit v_n: a lower bound on the top singular value of
  J_n = d logits_fn(x_n) / d x_n that power iteration raises monotonically. Passing the returned
  vectors back continues the iteration exactly; a zero start vector is replaced by a constant
  one, and a zero Jacobian gives sigma = 0.
  """
  single = lambda x: logits_fn(x[None])[0]
  return jax.vmap(lambda x, v: _power_single(single, x, v, num_iters))(images, vectors)


def jacobian_spectral_norm(logits_fn: LogitsFn, images: jax.Array, key: jax.Array,
                           num_iters: int = 20) -> jax.Array:
  """Per-example top singular value (N,) of d logits / d x: power iteration, random start."""
  vectors = jax.random.normal(key, images.shape, images.dtype)
  return power_iteration(logits_fn, images, vectors, num_iters)[0]
