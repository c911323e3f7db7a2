"""A layer-wise Lipschitz upper bound of a network: the tests' check on the local estimate LIPS.

The spectral norm of every conv/dense operator as a linear map on its actual input feature-map
shape (stride, padding and groups included, not the reshaped kernel matrix), found by the power
iteration of `lipschitz`, times the BatchNorm factors, combined along the residual structure.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rcnas_jax.nets import models
from rcnas_jax.robust import lipschitz

# Affine layers whose linear part is a spectral-norm factor of the layer-wise bound.
LINEAR_LAYERS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Dense, nn.DenseGeneral)


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
  return lipschitz._power_single(fn, jnp.zeros(input_shape), start, num_iters)[0]


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
