"""Families of students: every student carved out of one family shape runs one masked program.

A student's program changes with its strides and block types; its depths and widths only
change array sizes. So a *family* is (teacher, strides, block types), and its network
(`family`) has every stage at the teacher's depth and at the widest width a student may take.
A student runs as that network with `models.build(..., masked=True)` and 0/1 masks (`masks`):
its variables sit at fixed positions of the family's arrays and everything else is zero
(`embed`; `extract` is the inverse). Masked channels and gated-off blocks then contribute
exact zeros and receive exact zero gradients, so the masked student computes what the student
computes, and its padding stays zero under SGD with weight decay (tests/test_masked.py).

Positions are leading (the student's first channels) everywhere except inside robust blocks,
whose 8 splits and 4 groups keep their layout: a student's group g of a split sits at the
start of the family's group g.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax
import numpy as np

from rcnas_jax.nets import arch, models, space

Variables = dict  # {'params', 'batch_stats'} (a student) or also {'masks'} (a masked family).


def family(spec: arch.NetworkSpec, teacher_spec: arch.NetworkSpec,
           width_multiple: int = 8) -> arch.NetworkSpec:
  """The family network of a student of `teacher_spec`: its strides and blocks, at full size."""
  stages = []
  for i, (stage, teacher_stage) in enumerate(zip(spec.stages, teacher_spec.stages, strict=True)):
    widest = space.stage_channels(teacher_stage.channels, 1.0, stage.block, width_multiple)
    if stage.depth > teacher_stage.depth or stage.channels > widest:
      raise ValueError(f"stage {i} (depth {stage.depth}, {stage.channels} channels) is larger "
                       f"than its family (depth {teacher_stage.depth}, {widest} channels)")
    stages.append(dataclasses.replace(stage, depth=teacher_stage.depth, channels=widest))
  return dataclasses.replace(spec, stages=tuple(stages))


def _split_positions(channels: int, family_channels: int) -> np.ndarray:
  """Where a robust block's split channels sit in the family's split: group-aligned."""
  group = arch.robust_inner_width(channels) // arch.ROBUST_CARDINALITY
  family_group = arch.robust_inner_width(family_channels) // arch.ROBUST_CARDINALITY
  return np.concatenate([g * family_group + np.arange(group)
                         for g in range(arch.ROBUST_CARDINALITY)])


def _hidden_positions(channels: int, family_channels: int) -> np.ndarray:
  """Where a robust block's 8 splits sit in the family's (conv1's outputs, conv3's inputs)."""
  split = _split_positions(channels, family_channels)
  width = arch.robust_inner_width(family_channels)
  return np.concatenate([s * width + split for s in range(arch.ROBUST_SCALES)])


# Robust-block layers with a split-laid-out axis: {layer (prefix): (kind, axis of a kernel)}.
_ROBUST_AXES = {"conv1": ("hidden", 3), "norm2": ("hidden", 0), "conv3": ("hidden", 2),
                "split_conv": ("split", 3), "split_norm": ("split", 0)}


def _positions(spec: arch.NetworkSpec, family_spec: arch.NetworkSpec, path: tuple[str, ...],
               shape: Sequence[int]) -> tuple[np.ndarray, ...]:
  """Per axis, where the student's variable at `path` (of `shape`) sits in the family's."""
  axes = [np.arange(n) for n in shape]
  block = re.fullmatch(r"stage(\d+)_block\d+", path[0])
  if block and len(path) > 2:
    i = int(block[1])
    stage, family_stage = spec.stages[i], family_spec.stages[i]
    layer = re.sub(r"\d+$", "", path[1]) if path[1].startswith("split_") else path[1]
    if stage.block == "robust" and layer in _ROBUST_AXES:
      kind, axis = _ROBUST_AXES[layer]
      rule = _hidden_positions if kind == "hidden" else _split_positions
      axes[axis if len(shape) == 4 else 0] = rule(stage.channels, family_stage.channels)
  return tuple(axes)


def masks(spec: arch.NetworkSpec, family_spec: arch.NetworkSpec) -> dict:
  """The `masks` collection that makes the family network compute the student `spec`."""
  ones = lambda positions, size: np.isin(np.arange(size), positions).astype(np.float32)
  leading = lambda n, size: ones(np.arange(n), size)
  tree, in_channels = {}, spec.stem_channels
  for i, (stage, family_stage) in enumerate(zip(spec.stages, family_spec.stages)):
    tree[f"stream{i}"] = leading(stage.out_channels, family_stage.out_channels)
    for j in range(family_stage.depth):
      block = {}
      if j == 0 and stage.stride == 1:  # Whether this student's first block projects.
        block["projection"] = np.float32(in_channels != stage.out_channels)
      if stage.block == "robust":
        width = arch.robust_inner_width(family_stage.channels)
        block["hidden"] = ones(_hidden_positions(stage.channels, family_stage.channels),
                               width * arch.ROBUST_SCALES)
        block["split"] = ones(_split_positions(stage.channels, family_stage.channels), width)
        block["se"] = {"hidden": leading(stage.out_channels // arch.ROBUST_SE_REDUCTION,
                                          family_stage.out_channels // arch.ROBUST_SE_REDUCTION)}
      else:
        block["inner"] = leading(stage.channels, family_stage.channels)
      if j:
        block["gate"] = np.float32(j < stage.depth)
      tree[f"stage{i}_block{j}"] = block
    in_channels = stage.out_channels
  return tree


def embed(variables: Variables, spec: arch.NetworkSpec, family_model: models.ResNet,
          image_shape: tuple[int, ...]) -> Variables:
  """The student's variables placed in its family's arrays (zero elsewhere), with its masks."""
  family_shapes = models.shapes(family_model, tuple(image_shape))
  out = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(family_shapes[collection])
    filled = {path: np.zeros(s.shape, s.dtype) for path, s in flat.items()}
    for path, leaf in flax.traverse_util.flatten_dict(variables[collection]).items():
      leaf = np.asarray(leaf)
      filled[path][np.ix_(*_positions(spec, family_model.spec, path, leaf.shape))] = leaf
    out[collection] = flax.traverse_util.unflatten_dict(filled)
  out["masks"] = masks(spec, family_model.spec)
  return out


def extract(family_variables: Variables, spec: arch.NetworkSpec, family_spec: arch.NetworkSpec,
            model: models.ResNet, image_shape: tuple[int, ...]) -> Variables:
  """The student's own variables (for `model`, its network) out of its family's arrays."""
  student_shapes = models.shapes(model, tuple(image_shape))
  out = {}
  for collection in ("params", "batch_stats"):
    source = flax.traverse_util.flatten_dict(family_variables[collection])
    out[collection] = flax.traverse_util.unflatten_dict({
        path: np.asarray(source[path])[np.ix_(*_positions(spec, family_spec, path, s.shape))]
        for path, s in flax.traverse_util.flatten_dict(student_shapes[collection]).items()})
  return out
