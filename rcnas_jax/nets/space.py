"""The action space: one StageAction per teacher stage carves a student out of it (METHOD §4)."""

from __future__ import annotations

import dataclasses

import numpy as np

from rcnas_jax.nets import arch


class InvalidStudentError(ValueError):
  """An action that gives no buildable student; the message says why."""


@dataclasses.dataclass(frozen=True)
class StageAction:
  """What the policy chose for one stage."""

  depth_ratio: float  # In (0, 1]: fraction of the teacher's blocks kept.
  width_ratio: float  # In (0, 1]: fraction of the teacher's channels kept.
  downsample: bool  # The stage's first block has stride 2.
  robust: bool  # The stage uses RobustResBlocks.


def compress(teacher_spec: arch.NetworkSpec, actions, *, image_size: int,
             width_multiple: int = 8) -> arch.NetworkSpec:
  """The student that `actions` (one StageAction per stage) carve out of the teacher.

  D_i = max(1, round(r_D * D_i)); channels round(r_W * C_i) to a multiple of `width_multiple`,
  at least one multiple; robust stages keep at least 16 base channels (a RobustResBlock's
  split width is floor(channels / 16) * 4). Raises InvalidStudentError when a feature map
  would fall below 2x2.
  """
  if len(actions) != len(teacher_spec.stages):
    raise InvalidStudentError(f"{len(actions)} stage actions for a teacher with "
                              f"{len(teacher_spec.stages)} stages")
  stages = []
  for stage, action in zip(teacher_spec.stages, actions):
    depth = max(1, round(float(action.depth_ratio) * stage.depth))
    block = "robust" if action.robust else "basic"
    channels = stage_channels(stage.channels, action.width_ratio, block, width_multiple)
    stages.append(arch.StageSpec(depth, channels, 2 if action.downsample else 1, block))
  student = dataclasses.replace(teacher_spec, stages=tuple(stages))
  smallest = arch.spatial_sizes(student, image_size)[-1]
  if smallest < 2:
    raise InvalidStudentError(f"strides {tuple(s.stride for s in stages)} shrink a "
                              f"{image_size}x{image_size} image to {smallest}x{smallest}")
  return student


def stage_channels(teacher_channels: int, width_ratio: float, block: str,
                   width_multiple: int = 8) -> int:
  """A student stage's base channels: the ratio of the teacher's, rounded to the multiple."""
  channels = max(1, round(float(width_ratio) * teacher_channels / width_multiple)) * width_multiple
  return max(channels, 16) if block == "robust" else channels


def identity_actions(teacher_spec: arch.NetworkSpec) -> tuple[StageAction, ...]:
  """The actions that give back the teacher itself."""
  return tuple(StageAction(1.0, 1.0, s.stride == 2, s.block == "robust")
               for s in teacher_spec.stages)


def stage_actions(depth_ratio, width_ratio, downsample, robust) -> tuple[StageAction, ...]:
  """Per-stage StageActions from four per-stage arrays (host values)."""
  return tuple(StageAction(float(d), float(w), bool(s), bool(r)) for d, w, s, r in zip(
      np.asarray(depth_ratio), np.asarray(width_ratio), np.asarray(downsample),
      np.asarray(robust)))
