"""Local and layer-wise Lipschitz estimates: the LIPS attack level of the state encoder (METHOD §3).

LIPS is the spectral norm of the per-example input Jacobian J = d logits / d x at (attacked)
inputs. J is never formed: power iteration on J^T J needs only J v (forward mode, `jax.linearize`,
i.e. `jax.jvp` with the primal pass done once) and J^T u (`jax.vjp`), so the cost per iteration
is about two forward passes whatever the input size. Examples are independent in eval mode, so
the iteration is written for one example and `vmap`ped; it runs in a `lax.fori_loop` and is
jittable with `logits_fn` closed over. Power iteration approaches the top singular value from
below (||J v|| <= sigma_max for unit v, non-decreasing over iterations); 20 iterations are a few
percent low, and `power_iteration` returns its vectors so a caller can continue later.

`layer_lipschitz_bound` is the global, input-independent counterpart: the spectral norm of every
conv/dense operator as a linear map on its actual input feature-map shape (stride, padding and
groups included, not the reshaped kernel matrix), found by the same power iteration.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rcnas_jax import models

LogitsFn = Callable[[jax.Array], jax.Array]

# Affine layers whose linear part is a spectral-norm factor of the layer-wise bound.
LINEAR_LAYERS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Dense, nn.DenseGeneral)


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


# ---------------------------------------------------------------------------------------------
# Layer-wise bound.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
  """One affine or BatchNorm layer met in a forward pass."""

  path: str
  module: nn.Module  # Unbound clone: the layer's static configuration.
  variables: dict
  input_shape: tuple[int, ...]


def _eval_apply(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
  """model in eval mode: `train=False` where its __call__ takes it."""
  if "train" in inspect.signature(type(model).__call__).parameters:
    return model.apply(variables, images, train=False)
  return model.apply(variables, images)


def find_layers(model: nn.Module, variables: dict, image_shape: Sequence[int]) -> list[Layer]:
  """The affine and BatchNorm layers of one eval-mode forward pass, in call order."""
  found = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, LINEAR_LAYERS + (nn.BatchNorm,)):
      found.append(Layer("/".join(module.path), module.clone(parent=None, name=None),
                          jax.tree.map(jnp.asarray, dict(module.variables)),
                          tuple(args[0].shape)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    _eval_apply(model, variables, jnp.zeros((1, *image_shape), jnp.float32))
  return found


@jax.jit(static_argnums=(0, 2, 4))
def _operator_norm(module: nn.Module, variables: dict, input_shape: tuple[int, ...],
                   key: jax.Array, num_iters: int) -> jax.Array:
  """Spectral norm of the linear part of an affine module on inputs of `input_shape`."""
  fn = lambda x: module.apply(variables, x)
  start = jax.random.normal(key, input_shape)
  return _power_single(fn, jnp.zeros(input_shape), start, num_iters)[0]


def operator_norm(layer: Layer, key: jax.Array, num_iters: int = 20) -> float:
  """Spectral norm of one layer as a linear map on its input shape (BN: max |scale / std|).

  Conv/dense: power iteration on the layer's linear part (the bias drops out of J v and J^T u),
  so stride, padding and feature groups are those of the real operator. BatchNorm in eval mode
  is the per-channel map x -> (x - mean) * scale / sqrt(var + eps) + bias: its factor is the
  largest |scale / sqrt(var + eps)|, in closed form.
  """
  if isinstance(layer.module, nn.BatchNorm):
    factor = jax.lax.rsqrt(layer.variables["batch_stats"]["var"] + layer.module.epsilon)
    if layer.module.use_scale:
      factor = factor * layer.variables["params"]["scale"]
    return float(jnp.max(jnp.abs(factor)))
  return float(_operator_norm(layer.module, layer.variables, layer.input_shape, key, num_iters))


def _activation_lipschitz(name: str) -> float:
  """max |f'(t)| of a scalar activation, on a fine grid (relu/softplus 1, silu 1.10, gelu 1.13)."""
  t = jnp.linspace(-20.0, 20.0, 400_001)
  return float(jnp.max(jnp.abs(jax.vmap(jax.grad(models.ACTIVATIONS[name]))(t))))


def _residual_bound(model: nn.Module, norms: dict[str, float], pool_pixels: int) -> float | None:
  """A true upper bound for a basic-block `models.ResNet`, following its residual structure.

  Block x + F(x) is (1 + Lip F)-Lipschitz; with a projection shortcut P(act(BN1 x)) and branch
  F(act(BN1 x)) it is Lip(BN1) a (Lip P + Lip F), `a` the activation's constant. The global mean
  pool contributes 1 / sqrt(H W). None for other models (robust blocks gate with SE, which is
  not globally Lipschitz).
  """
  if not isinstance(model, models.ResNet) or any(s.block != "basic" for s in model.spec.stages):
    return None
  a = _activation_lipschitz(model.spec.activation)
  bound = norms.get("input_normalisation", 1.0) * norms["stem"]
  for i, stage in enumerate(model.spec.stages):
    for j in range(stage.depth):
      n = {k: norms[f"stage{i}_block{j}/{k}"] for k in ("norm1", "conv1", "norm2", "conv2")}
      branch = n["conv1"] * n["norm2"] * a * n["conv2"]
      shortcut = norms.get(f"stage{i}_block{j}/shortcut")
      if shortcut is None:
        bound *= 1.0 + n["norm1"] * a * branch
      else:
        bound *= n["norm1"] * a * (shortcut + branch)
  return bound * norms["head_norm"] * a / math.sqrt(pool_pixels) * norms["head"]


def layer_lipschitz_bound(model: nn.Module, variables: dict, image_shape: Sequence[int],
                          key: jax.Array, num_iters: int = 20) -> dict:
  """Layer-wise Lipschitz estimates of an eval-mode network on images of shape (H, W, C).

  Returns {'layers': {path: spectral norm}, 'product': float, 'residual': float | None}.
  'layers' holds every conv/dense operator (power iteration on the operator at its input
  shape), every BatchNorm's max |scale / sqrt(var + eps)|, and 'input_normalisation' =
  1 / min(std) for models that normalise their input. 'product' multiplies them all: the
  classic loose estimate, an upper bound for a plain chain of these layers and 1-Lipschitz
  activations, but NOT guaranteed for a residual net (a block x + F(x) can exceed Lip F; the
  product ignores activations above 1 and the SE gates). 'residual' is a guaranteed bound for a
  basic-block `models.ResNet` (see `_residual_bound`), else None. Each norm comes from power
  iteration, which is a little low (about 2% at 20 iterations), so both are bounds up to that.
  """
  found = find_layers(model, variables, image_shape)
  keys = jax.random.split(key, len(found))
  norms = {layer.path: operator_norm(layer, k, num_iters) for layer, k in zip(found, keys)}
  std = getattr(model, "std", None)
  if std is not None:
    norms["input_normalisation"] = 1.0 / min(abs(s) for s in std)
  pool = [layer.input_shape for layer in found if layer.path == "head_norm"]
  pool_pixels = pool[0][1] * pool[0][2] if pool and len(pool[0]) == 4 else 1
  return {"layers": norms, "product": math.prod(norms.values()),
          "residual": _residual_bound(model, norms, pool_pixels)}
