"""Flax Linen pre-activation ResNets built from a `NetworkSpec` (METHOD §1).

Images come in as floats in [0, 1], NHWC; normalisation by the dataset's mean and std happens
inside the model, so attacks work in pixel space. Layer names are stable
(`stem`, `stage{i}_block{j}`, `head_norm`, `head`): weight inheritance relies on them.
Padding is explicit and symmetric, as in the PyTorch reference, so weights convert 1:1.
Mixed precision: `dtype='bfloat16'` computes in bfloat16 while parameters and BN statistics stay
float32 (and BN reductions run in float32); logits are returned as float32.

`masked=True` builds a *family* network (`nets/masked.py`): the largest shape of a family, whose
students are carved out by 0/1 masks held in a `masks` collection (channel masks after every
normalisation and at every block output, a gate on every block after a stage's first). The
masks are inputs of the program, so every student of the family runs one compiled program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rcnas_jax.nets import arch

# Reference initialisation: conv kernels ~ N(0, sqrt(2 / (k * k * C_out))).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, "softplus": nn.softplus}


def masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`x` with its channels outside `mask` set to zero (unchanged when there is no mask)."""
  return x if mask is None else x * mask.astype(x.dtype)


def mask_variable(module: nn.Module, name: str, shape: tuple[int, ...]) -> jax.Array | None:
  """The 0/1 mask `name` of a masked module (all ones at init), or None when unmasked."""
  if not module.masked:
    return None
  return module.variable("masks", name, lambda: jnp.ones(shape, jnp.float32)).value


def gated(residual: jax.Array, gate: jax.Array | None) -> jax.Array:
  """A block's residual branch times its gate: a gate of 0 skips the block exactly."""
  return residual if gate is None else residual * gate.astype(residual.dtype)


def _fit(x: jax.Array, channels: int) -> jax.Array:
  """`x` cut or zero-padded to `channels` channels, keeping its leading ones."""
  extra = channels - x.shape[-1]
  return x[..., :channels] if extra <= 0 else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))


def shortcut(block: nn.Module, x: jax.Array, pre: jax.Array, channels: int,
             stream_out: jax.Array | None) -> jax.Array:
  """A block's shortcut: a 1x1 projection of its pre-activation `pre` where the stride or width
  changes, else `x` itself.

  The first block of a masked family's stride-1 stage holds both, switched by its `projection`
  mask: some of its students change width there and some do not.
  """
  switch = block.masked and not block.gate and block.stride == 1
  if not switch and block.stride == 1 and x.shape[-1] == channels:
    return x
  projected = masked(conv(channels, 1, block.stride, name="shortcut", dtype=block.dtype)(pre),
                     stream_out)
  if not switch:
    return projected
  p = mask_variable(block, "projection", ()).astype(x.dtype)
  return p * projected + (1 - p) * _fit(x, channels)


def conv(features: int, kernel: int = 3, stride: int = 1, groups: int = 1, name=None,
         dtype: Any = jnp.float32) -> nn.Conv:
  """A bias-free conv with PyTorch-style symmetric padding k // 2, computing in `dtype`."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=False, kernel_init=conv_init, name=name,
                 dtype=dtype)


class BasicBlock(nn.Module):
  """Pre-activation WRN block: act(BN(x)) -> conv3x3(stride) -> act(BN) -> conv3x3 + shortcut."""

  channels: int
  stride: int
  activation: str
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  masked: bool = False
  gate: bool = False  # Masked blocks after a stage's first can be skipped.

  @nn.compact
  def __call__(self, x: jax.Array, stream_in: jax.Array | None = None,
               stream_out: jax.Array | None = None) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    inner = mask_variable(self, "inner", (self.channels,))
    gate = mask_variable(self, "gate", ()) if self.gate else None
    out = masked(act(self.norm(name="norm1")(x)), stream_in)
    identity = shortcut(self, x, out, self.channels, stream_out)
    out = conv(self.channels, 3, self.stride, name="conv1", dtype=self.dtype)(out)
    out = masked(act(self.norm(name="norm2")(out)), inner)
    out = masked(conv(self.channels, 3, 1, name="conv2", dtype=self.dtype)(out), stream_out)
    return gated(out, gate) + identity


class SqueezeExcitation(nn.Module):
  """z * sigmoid(W2 relu(W1 avgpool(z))) with bias-free W1 (C -> C / reduction) and W2."""

  reduction: int
  dtype: Any = jnp.float32
  masked: bool = False

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    channels = z.shape[-1]
    squeeze = mask_variable(self, "hidden", (channels // self.reduction,))
    s = jnp.mean(z, axis=(1, 2))
    s = masked(nn.relu(nn.Dense(channels // self.reduction, use_bias=False,
                                kernel_init=dense_init, dtype=self.dtype, name="squeeze")(s)),
               squeeze)
    s = nn.sigmoid(nn.Dense(channels, use_bias=False, kernel_init=dense_init, dtype=self.dtype,
                            name="excite")(s))
    return z * s[:, None, None, :]


class RobustBlock(nn.Module):
  """RobustResBlock (Huang et al., CVPR 2023): Res2Net bottleneck with SE, as the reference code."""

  channels: int
  stride: int
  activation: str
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  masked: bool = False
  gate: bool = False  # Masked blocks after a stage's first can be skipped.

  @nn.compact
  def __call__(self, x: jax.Array, stream_in: jax.Array | None = None,
               stream_out: jax.Array | None = None) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    width = arch.robust_inner_width(self.channels)
    out_channels = self.channels * arch.ROBUST_EXPANSION
    # Masks of the 8 splits (`hidden`) and of one split (`split`), aligned to the 4 groups.
    hidden = mask_variable(self, "hidden", (width * arch.ROBUST_SCALES,))
    split = mask_variable(self, "split", (width,))
    gate = mask_variable(self, "gate", ()) if self.gate else None
    # The pre-activation feeds only a projection shortcut; conv1 takes the raw input. Without
    # a projection norm1 is unused, but a trainable layer of the reference block.
    pre = masked(act(self.norm(name="norm1")(x)), stream_in)
    identity = shortcut(self, x, pre, out_channels, stream_out)
    out = masked(act(self.norm(name="norm2")(conv(width * arch.ROBUST_SCALES, 1, name="conv1",
                                                  dtype=self.dtype)(x))), hidden)
    splits = jnp.split(out, arch.ROBUST_SCALES, axis=-1)
    outputs = []
    for s in range(arch.ROBUST_SCALES - 1):
      inp = splits[s] if (s == 0 or self.stride > 1) else splits[s] + outputs[-1]
      y = conv(width, 3, self.stride, groups=arch.ROBUST_CARDINALITY, name=f"split_conv{s}",
               dtype=self.dtype)(inp)
      outputs.append(masked(act(self.norm(name=f"split_norm{s}")(y)), split))
    last = splits[-1]
    if self.stride > 1:
      last = nn.avg_pool(last, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)),
                         count_include_pad=True)
    out = masked(conv(out_channels, 1, name="conv3", dtype=self.dtype)(
        jnp.concatenate(outputs + [last], axis=-1)), stream_out)
    se = SqueezeExcitation(arch.ROBUST_SE_REDUCTION, self.dtype, self.masked, name="se")(
        masked(self.norm(name="se_norm")(out), stream_out))
    return gated(out, gate) + identity + gated(se, gate)


BLOCKS = {"basic": BasicBlock, "robust": RobustBlock}


class ResNet(nn.Module):
  """A pre-activation residual network for images in [0, 1]."""

  spec: arch.NetworkSpec
  num_classes: int
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  dtype: Any = jnp.float32  # Compute dtype; parameters and BN statistics are always float32.
  masked: bool = False  # A family network whose students are set by its `masks` collection.

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    x = (images - jnp.asarray(self.mean, images.dtype)) / jnp.asarray(self.std, images.dtype)
    x = conv(self.spec.stem_channels, 3, self.spec.stem_stride, name="stem", dtype=self.dtype)(x)
    stream = None  # The live channels of the residual stream (the stem's are all live).
    for i, stage in enumerate(self.spec.stages):
      stream_in, stream = stream, mask_variable(self, f"stream{i}", (stage.out_channels,))
      for j in range(stage.depth):
        x = BLOCKS[stage.block](stage.channels, stage.stride if j == 0 else 1,
                                self.spec.activation, norm, self.dtype, self.masked, j > 0,
                                name=f"stage{i}_block{j}")(x, stream_in if j == 0 else stream,
                                                           stream)
    x = masked(ACTIVATIONS[self.spec.activation](norm(name="head_norm")(x)), stream)
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=dense_init, bias_init=nn.initializers.zeros,
                      dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)  # Losses and attack margins in full precision.


def build(spec: arch.NetworkSpec, num_classes: int, mean: Sequence[float] = (0.0,),
          std: Sequence[float] = (1.0,), dtype: str = "float32", masked: bool = False) -> ResNet:
  """The Flax module for `spec`, computing in `dtype` ('float32' or 'bfloat16')."""
  return ResNet(spec=spec, num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                dtype=jnp.dtype(dtype), masked=masked)


def init(model: ResNet, key: jax.Array, image_shape: Sequence[int]) -> dict:
  """Initial variables {'params', 'batch_stats'} for images of shape (H, W, C)."""
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


@functools.lru_cache(maxsize=None)
def shapes(model: ResNet, image_shape: tuple[int, ...]) -> dict:
  """The shapes and dtypes of `model`'s variables, traced without computing or compiling."""
  return jax.eval_shape(lambda: init(model, jax.random.key(0), image_shape))


def _host_leaf(rng: np.random.Generator, path: tuple[str, ...],
               leaf: jax.ShapeDtypeStruct) -> np.ndarray:
  """One variable's fresh value, drawn on the host from the distribution `init` draws it from."""
  collection, name, shape = path[0], path[-1], leaf.shape
  if name == "kernel" and len(shape) in (2, 4):  # Fans as jax.nn.initializers computes them.
    fan_in, fan_out = np.prod(shape[:-1]), np.prod(shape[:-2]) * shape[-1]
    if len(shape) == 4:  # conv_init: N(0, 2 / fan_out).
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)
    else:  # dense_init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
      value = rng.uniform(-1.0, 1.0, shape) / np.sqrt(fan_in)
  elif (collection, name) in (("params", "bias"), ("batch_stats", "mean")):
    value = np.zeros(shape)
  elif (collection, name) in (("params", "scale"), ("batch_stats", "var")) or collection == "masks":
    value = np.ones(shape)
  else:
    raise ValueError(f"host_init: no rule for variable {'/'.join(path)} of shape {shape}; "
                     "add it beside conv_init and dense_init")
  return value.astype(leaf.dtype)


def host_init(model: ResNet, image_shape: Sequence[int], seed: int) -> dict:
  """Fresh variables like `init`'s, drawn with NumPy: nothing compiles, whatever the shape.

  Same distributions as `init` (conv_init, dense_init, BN at identity), other random values.
  A search meets a new student shape with nearly every evaluation, and compiling `init`
  for it (threefry bits for every layer) cost seconds on CPU (docs/PERFORMANCE.md).
  """
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(shapes(model, tuple(image_shape)))
  return flax.traverse_util.unflatten_dict(
      {path: _host_leaf(rng, path, leaf) for path, leaf in sorted(flat.items())})


def logits_fn(model: ResNet, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """images -> logits in eval mode (BN running statistics): what every attack sees."""
  return lambda images: model.apply(variables, images, train=False)
