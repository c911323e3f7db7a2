"""Tests of rcnas_jax.nets.space: actions carve the specified students out of a teacher."""

import pytest

from rcnas_jax.nets import arch, space


def test_compress_rounds_depth_and_width_as_specified():
  teacher = arch.wide_resnet(28, 10)  # D = 4, channels (160, 320, 640).
  actions = (space.StageAction(0.3, 0.26, False, False), space.StageAction(0.01, 1.0, True, True),
             space.StageAction(0.9, 0.001, True, False))
  student = space.compress(teacher, actions, image_size=32)
  assert student.depths == (1, 1, 4)  # round(1.2), max(1, round(0.04)), round(3.6)
  assert student.widths == (40, 320, 8)  # round(41.6 / 8) * 8, 320, at least 8
  assert [s.stride for s in student.stages] == [1, 2, 2]
  assert [s.block for s in student.stages] == ["basic", "robust", "basic"]
  assert space.compress(teacher, space.identity_actions(teacher), image_size=32) == teacher


def test_compress_rejects_feature_maps_below_2x2():
  teacher = arch.TEACHERS["tiny-8"]
  all_down = tuple(space.StageAction(1.0, 1.0, True, False) for _ in range(3))
  with pytest.raises(space.InvalidStudentError, match="8x8 image to 1x1"):
    space.compress(teacher, all_down, image_size=8)
  assert arch.spatial_sizes(space.compress(teacher, all_down, image_size=16), 16)[-1] == 2


def test_robust_students_keep_at_least_16_channels():
  teacher = arch.TEACHERS["tiny-8"]
  actions = tuple(space.StageAction(1.0, 0.1, s.stride == 2, True) for s in teacher.stages)
  assert space.compress(teacher, actions, image_size=8).widths == (16, 16, 16)
