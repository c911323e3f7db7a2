"""Flax Linen pre-activation ResNets built from a `NetworkSpec` (METHOD §1).

Images come in as floats in [0, 1], NHWC; normalisation by the dataset's mean and std happens
inside the model, so attacks work in pixel space. Layer names are stable
(`stem`, `stage{i}_block{j}`, `head_norm`, `head`): weight inheritance relies on them.
Padding is explicit and symmetric, as in the PyTorch reference, so weights convert 1:1.
Mixed precision: `dtype='bfloat16'` computes in bfloat16 while parameters and BN statistics stay
float32 (and BN reductions run in float32); logits are returned as float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rcnas_jax.nets import arch

# Reference initialisation: conv kernels ~ N(0, sqrt(2 / (k * k * C_out))).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, "softplus": nn.softplus}


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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    out = act(self.norm(name="norm1")(x))
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = conv(self.channels, 1, self.stride, name="shortcut", dtype=self.dtype)(out)
    else:
      shortcut = x
    out = conv(self.channels, 3, self.stride, name="conv1", dtype=self.dtype)(out)
    out = act(self.norm(name="norm2")(out))
    out = conv(self.channels, 3, 1, name="conv2", dtype=self.dtype)(out)
    return out + shortcut


class SqueezeExcitation(nn.Module):
  """z * sigmoid(W2 relu(W1 avgpool(z))) with bias-free W1 (C -> C / reduction) and W2."""

  reduction: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    channels = z.shape[-1]
    s = jnp.mean(z, axis=(1, 2))
    s = nn.relu(nn.Dense(channels // self.reduction, use_bias=False, kernel_init=dense_init,
                         dtype=self.dtype, name="squeeze")(s))
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    width = arch.robust_inner_width(self.channels)
    out_channels = self.channels * arch.ROBUST_EXPANSION
    # The pre-activation feeds only the projection shortcut; conv1 takes the raw input.
    if self.stride != 1 or x.shape[-1] != out_channels:
      pre = act(self.norm(name="norm1")(x))
      shortcut = conv(out_channels, 1, self.stride, name="shortcut", dtype=self.dtype)(pre)
    else:
      self.norm(name="norm1")(x)  # Unused, but a trainable layer of the reference block.
      shortcut = x
    out = act(self.norm(name="norm2")(conv(width * arch.ROBUST_SCALES, 1, name="conv1",
                                           dtype=self.dtype)(x)))
    splits = jnp.split(out, arch.ROBUST_SCALES, axis=-1)
    outputs = []
    for s in range(arch.ROBUST_SCALES - 1):
      inp = splits[s] if (s == 0 or self.stride > 1) else splits[s] + outputs[-1]
      y = conv(width, 3, self.stride, groups=arch.ROBUST_CARDINALITY, name=f"split_conv{s}",
               dtype=self.dtype)(inp)
      outputs.append(act(self.norm(name=f"split_norm{s}")(y)))
    last = splits[-1]
    if self.stride > 1:
      last = nn.avg_pool(last, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)),
                         count_include_pad=True)
    out = conv(out_channels, 1, name="conv3", dtype=self.dtype)(
        jnp.concatenate(outputs + [last], axis=-1))
    se = SqueezeExcitation(arch.ROBUST_SE_REDUCTION, self.dtype, name="se")(
        self.norm(name="se_norm")(out))
    return out + shortcut + se


BLOCKS = {"basic": BasicBlock, "robust": RobustBlock}


class ResNet(nn.Module):
  """A pre-activation residual network for images in [0, 1]."""

  spec: arch.NetworkSpec
  num_classes: int
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  dtype: Any = jnp.float32  # Compute dtype; parameters and BN statistics are always float32.

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    x = (images - jnp.asarray(self.mean, images.dtype)) / jnp.asarray(self.std, images.dtype)
    x = conv(self.spec.stem_channels, 3, self.spec.stem_stride, name="stem", dtype=self.dtype)(x)
    for i, stage in enumerate(self.spec.stages):
      for j in range(stage.depth):
        x = BLOCKS[stage.block](stage.channels, stage.stride if j == 0 else 1,
                                self.spec.activation, norm, self.dtype,
                                name=f"stage{i}_block{j}")(x)
    x = ACTIVATIONS[self.spec.activation](norm(name="head_norm")(x))
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=dense_init, bias_init=nn.initializers.zeros,
                      dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)  # Losses and attack margins in full precision.


def build(spec: arch.NetworkSpec, num_classes: int, mean: Sequence[float] = (0.0,),
          std: Sequence[float] = (1.0,), dtype: str = "float32") -> ResNet:
  """The Flax module for `spec`, computing in `dtype` ('float32' or 'bfloat16')."""
  return ResNet(spec=spec, num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                dtype=jnp.dtype(dtype))


def init(model: ResNet, key: jax.Array, image_shape: Sequence[int]) -> dict:
  """Initial variables {'params', 'batch_stats'} for images of shape (H, W, C)."""
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def logits_fn(model: ResNet, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """images -> logits in eval mode (BN running statistics): what every attack sees."""
  return lambda images: model.apply(variables, images, train=False)
