"""The search space: residual network specs, the teacher zoo, and analytic size counting.

A network is a stem convolution, a few stages of pre-activation residual blocks and a
classifier head (METHOD §1). Specs are frozen dataclasses: hashable, so they key the compile
cache and the evaluation cache. `count_params` and `count_macs` walk a spec analytically
and reproduce the published sizes in `rcnas_jax/reference/architectures.json`.
"""

from __future__ import annotations

import dataclasses
import math

BLOCK_TYPES = ("basic", "robust")
ACTIVATIONS = ("relu", "silu", "gelu", "softplus")

# RobustResBlock hyper-parameters (Huang et al., CVPR 2023). The public YAML configs omit
# them and the code defaults give a network 7x too large, so they are fixed here.
ROBUST_EXPANSION = 4
ROBUST_SCALES = 8
ROBUST_BASE_WIDTH = 10
ROBUST_CARDINALITY = 4
ROBUST_SE_REDUCTION = 64


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage: `depth` blocks of `block` type, the first with stride `stride`.

  `channels` is the stage's base width ("planes"): a basic block outputs `channels`
  channels, a robust block `ROBUST_EXPANSION * channels`.
  """

  depth: int
  channels: int
  stride: int = 1
  block: str = "basic"

  @property
  def out_channels(self) -> int:
    """Channels leaving the stage."""
    return self.channels * (ROBUST_EXPANSION if self.block == "robust" else 1)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  """A pre-activation residual network: stem, stages, head."""

  stages: tuple[StageSpec, ...]
  stem_channels: int = 16
  stem_stride: int = 1
  activation: str = "relu"

  def __post_init__(self):
    problems = validate(self)
    if problems:
      raise ValueError(problems[0])

  @property
  def depths(self) -> tuple[int, ...]:
    """Blocks per stage."""
    return tuple(s.depth for s in self.stages)

  @property
  def widths(self) -> tuple[int, ...]:
    """Base channels per stage."""
    return tuple(s.channels for s in self.stages)

  def to_dict(self) -> dict:
    """A JSON-ready description (inverse of `spec_from_dict`)."""
    return dataclasses.asdict(self)


def spec_from_dict(d: dict) -> NetworkSpec:
  """Rebuilds a spec from `NetworkSpec.to_dict` output."""
  stages = tuple(StageSpec(**s) for s in d["stages"])
  return NetworkSpec(**{**d, "stages": stages})


def robust_inner_width(channels: int) -> int:
  """Width of each Res2Net split of a robust block with `channels` base planes."""
  return math.floor(channels * ROBUST_BASE_WIDTH / 160) * ROBUST_CARDINALITY


def validate(spec: NetworkSpec) -> list[str]:
  """Reasons the spec cannot be built (empty when it can)."""
  problems = []
  if not spec.stages:
    problems.append("a network needs at least one stage")
  if spec.activation not in ACTIVATIONS:
    problems.append(f"activation={spec.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
  if spec.stem_stride not in (1, 2) or spec.stem_channels < 1:
    problems.append(f"stem_stride={spec.stem_stride}, stem_channels={spec.stem_channels}: "
                    "expected stride 1 or 2 and at least one channel")
  for i, stage in enumerate(spec.stages):
    if stage.block not in BLOCK_TYPES:
      problems.append(f"stage {i} block={stage.block!r}: expected one of {', '.join(BLOCK_TYPES)}")
    if stage.depth < 1 or stage.channels < 1 or stage.stride not in (1, 2):
      problems.append(f"stage {i} depth={stage.depth}, channels={stage.channels}, "
                      f"stride={stage.stride}: expected depth >= 1, channels >= 1, stride 1 or 2")
    if stage.block == "robust" and robust_inner_width(stage.channels) == 0:
      problems.append(f"stage {i} channels={stage.channels}: a robust block needs at least 16 "
                      "base channels (its split width is floor(channels/16) * 4)")
  return problems


# ---------------------------------------------------------------------------------------------
# The zoo.
# ---------------------------------------------------------------------------------------------


def residual_network(depths, widen_factors, block="basic", strides=(1, 2, 2), stem_stride=1,
                     activation="relu") -> NetworkSpec:
  """A RobustResNet-style network: stage i has 16 * 2**i * widen_factors[i] base channels."""
  stages = tuple(
      StageSpec(depth=d, channels=16 * 2**i * w, stride=s, block=block)
      for i, (d, w, s) in enumerate(zip(depths, widen_factors, strides)))
  return NetworkSpec(stages=stages, stem_stride=stem_stride, activation=activation)


def wide_resnet(depth: int, widen_factor: int, block: str = "basic") -> NetworkSpec:
  """WRN-depth-k: (depth - 4) / 6 blocks per stage, channels (16k, 32k, 64k)."""
  if (depth - 4) % 6:
    raise ValueError(f"WRN depth={depth}: expected 6n + 4")
  n = (depth - 4) // 6
  return residual_network((n, n, n), (widen_factor,) * 3, block=block)


TEACHERS: dict[str, NetworkSpec] = {
    "WRN-28-10": wide_resnet(28, 10),
    "WRN-34-10": wide_resnet(34, 10),
    "WRN-34-12": wide_resnet(34, 12),
    "WRN-46-14": wide_resnet(46, 14),
    "WRN-70-16": wide_resnet(70, 16),
    "WRN-A1": residual_network((14, 14, 7), (5, 7, 3)),
    "WRN-A2": residual_network((17, 17, 8), (7, 9, 4)),
    "WRN-A3": residual_network((22, 22, 11), (8, 11, 5)),
    "WRN-A4": residual_network((27, 28, 13), (10, 14, 6)),
    "RRN-A1": residual_network((14, 14, 7), (5, 7, 3), block="robust"),
    "RRN-A2": residual_network((17, 17, 8), (7, 9, 4), block="robust"),
    "RRN-A3": residual_network((22, 22, 11), (8, 11, 5), block="robust"),
    "RRN-A4": residual_network((27, 28, 13), (10, 14, 6), block="robust"),
    # Tiny teachers sized for CPU runs and tests.
    "WRN-10-2": wide_resnet(10, 2),
    "WRN-16-2": wide_resnet(16, 2),
    "WRN-16-4": wide_resnet(16, 4),
    "tiny-8": NetworkSpec(stages=(StageSpec(2, 8, 1), StageSpec(2, 16, 2), StageSpec(2, 32, 2))),
}


def teacher(name: str) -> NetworkSpec:
  """The zoo entry `name`, or a one-line error listing the names."""
  if name not in TEACHERS:
    raise ValueError(f"teacher {name!r} is not one of {', '.join(TEACHERS)}")
  return TEACHERS[name]


# ---------------------------------------------------------------------------------------------
# Analytic counting (METHOD §1: params include BN; MACs count conv and dense layers only).
# ---------------------------------------------------------------------------------------------


def _downsample(size: int, stride: int) -> int:
  """Spatial size after a stride-`stride` conv with 'same'-style padding."""
  return -(-size // stride)


def _basic_block_counts(in_ch: int, stage: StageSpec, stride: int, size: int):
  """(params, MACs, output size) of one pre-activation basic block."""
  out = stage.channels
  out_size = _downsample(size, stride)
  pixels = out_size * out_size
  conv_weights = 9 * in_ch * out + 9 * out * out
  has_projection = stride != 1 or in_ch != out
  if has_projection:
    conv_weights += in_ch * out
  params = 2 * in_ch + 2 * out + conv_weights
  return params, conv_weights * pixels, out_size


def _robust_block_counts(in_ch: int, stage: StageSpec, stride: int, size: int):
  """(params, MACs, output size) of one RobustResBlock."""
  width = robust_inner_width(stage.channels)
  hidden = width * ROBUST_SCALES
  out = stage.out_channels
  out_size = _downsample(size, stride)
  in_pixels, out_pixels = size * size, out_size * out_size
  split_conv = 9 * (width // ROBUST_CARDINALITY) * width
  squeeze = out // ROBUST_SE_REDUCTION
  conv1, conv3 = in_ch * hidden, hidden * out
  projection = in_ch * out if (stride != 1 or in_ch != out) else 0
  se = 2 * out * squeeze
  params = (2 * in_ch + conv1 + 2 * hidden + (ROBUST_SCALES - 1) * (split_conv + 2 * width)
            + conv3 + 2 * out + se + projection)
  macs = (conv1 * in_pixels + (ROBUST_SCALES - 1) * split_conv * out_pixels
          + (conv3 + projection) * out_pixels + se)
  return params, macs, out_size


def _counts(spec: NetworkSpec, image_size: int, num_classes: int, in_channels: int):
  """(params, MACs) of the whole network."""
  size = _downsample(image_size, spec.stem_stride)
  params = 9 * in_channels * spec.stem_channels
  macs = params * size * size
  channels = spec.stem_channels
  for stage in spec.stages:
    block_counts = _robust_block_counts if stage.block == "robust" else _basic_block_counts
    for j in range(stage.depth):
      p, m, size = block_counts(channels, stage, stage.stride if j == 0 else 1, size)
      params, macs, channels = params + p, macs + m, stage.out_channels
  head = channels * num_classes
  return params + 2 * channels + head + num_classes, macs + head


def count_params(spec: NetworkSpec, num_classes: int = 10, in_channels: int = 3) -> int:
  """Trainable parameters (BN scale and bias included)."""
  return _counts(spec, 32, num_classes, in_channels)[0]


def count_macs(spec: NetworkSpec, image_size: int = 32, num_classes: int = 10,
               in_channels: int = 3) -> int:
  """Multiply-accumulates of the conv and dense layers for one image."""
  return _counts(spec, image_size, num_classes, in_channels)[1]


def spatial_sizes(spec: NetworkSpec, image_size: int) -> tuple[int, ...]:
  """Feature-map side length after each stage."""
  size = _downsample(image_size, spec.stem_stride)
  sizes = []
  for stage in spec.stages:
    size = _downsample(size, stage.stride)
    sizes.append(size)
  return tuple(sizes)


def max_downsamples(spec: NetworkSpec, image_size: int) -> int:
  """How many of `spec`'s stages may have stride 2 before the last feature map falls below 2x2.

  Each stride-2 stage halves the map (rounding up) wherever it sits, so only the count matters.
  """
  for count in range(len(spec.stages), -1, -1):
    stages = tuple(dataclasses.replace(s, stride=2 if i < count else 1)
                   for i, s in enumerate(spec.stages))
    if spatial_sizes(dataclasses.replace(spec, stages=stages), image_size)[-1] >= 2:
      return count
  return 0


# ---------------------------------------------------------------------------------------------
# The hand-scaled baseline.
# ---------------------------------------------------------------------------------------------


def compound_scaled(budget_macs: int, image_size: int = 32, num_classes: int = 10,
                    in_channels: int = 3, width_multiple: int = 8) -> NetworkSpec:
  """The RobustResNet-style hand-scaled network that best fills a MAC budget.

  Depths 2d:2d:d and widening factors 2a:2.5a:a with robust blocks (Huang et al.'s compound
  scaling): the largest d for which a = 0.45 d fits (the ratio of RRN-A1..A4), then the widest
  a on a 1/8 grid that still fits. Robust stages keep at least 16 channels, so a tiny budget
  may be exceeded by the smallest such network.
  """
  def build(d: int, a: float) -> NetworkSpec:
    stages = tuple(
        StageSpec(depth, max(16, round(16 * 2**i * w / width_multiple) * width_multiple),
                  stride, "robust")
        for i, (depth, w, stride) in enumerate(zip((2 * d, 2 * d, d), (2 * a, 2.5 * a, a),
                                                   (1, 2, 2))))
    return NetworkSpec(stages=stages)

  fits = lambda s: count_macs(s, image_size, num_classes, in_channels) <= budget_macs
  d = 1
  while fits(build(d + 1, 0.45 * (d + 1))):
    d += 1
  a = 0.45 * d
  while a > 0.125 and not fits(build(d, a)):
    a -= 0.125
  while a < 64 and fits(build(d, a + 0.125)):
    a += 0.125
  return build(d, a)
