"""Weight inheritance: identity students, exact channel selection, fresh init elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax.nets import arch, inherit, models, space

IMAGE = (8, 8, 3)


def _randomised_teacher(spec, seed=0):
  """A teacher whose weights and BN statistics are random, so channel choices matter."""
  model = models.build(spec, 5)
  variables = models.init(model, jax.random.key(seed), IMAGE)
  leaves, treedef = jax.tree.flatten_with_path(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    noise = jax.random.normal(k, leaf.shape) * 0.2
    out.append(jnp.abs(noise) + 0.5 if "var" in jax.tree_util.keystr(path) else leaf + noise)
  return model, jax.tree.unflatten(treedef, out)


def _student(teacher_spec, teacher_variables, actions, seed=3):
  student_spec = space.compress(teacher_spec, actions, image_size=IMAGE[0])
  model = models.build(student_spec, 5)
  fresh = models.host_init(model, IMAGE, seed)
  inherited = inherit.inherited(teacher_variables, seed, model=model, teacher_spec=teacher_spec,
                                student_spec=student_spec, image_shape=IMAGE)
  return student_spec, model, fresh, inherited


TEACHERS = [
    arch.NetworkSpec(stages=(arch.StageSpec(2, 16, 1), arch.StageSpec(2, 24, 2))),
    arch.NetworkSpec(stages=(arch.StageSpec(2, 16, 1, "robust"),
                             arch.StageSpec(1, 32, 2, "robust"))),
]


@pytest.mark.parametrize("teacher_spec", TEACHERS, ids=["basic", "robust"])
def test_a_student_equal_to_the_teacher_gives_identical_logits(teacher_spec):
  teacher, variables = _randomised_teacher(teacher_spec)
  spec, student, _, inherited = _student(teacher_spec, variables,
                                         space.identity_actions(teacher_spec))
  assert spec == teacher_spec
  x = jax.random.uniform(jax.random.key(9), (4, *IMAGE))
  np.testing.assert_array_equal(student.apply(inherited, x), teacher.apply(variables, x))


def test_sliced_basic_student_keeps_exactly_the_largest_l1_channels():
  teacher_spec = TEACHERS[0]
  _, variables = _randomised_teacher(teacher_spec)
  actions = (space.StageAction(0.5, 0.5, False, False), space.StageAction(1.0, 0.34, True, False))
  spec, _, _, inherited = _student(teacher_spec, variables, actions)
  assert spec.depths == (1, 2) and spec.widths == (8, 8)
  t, s = variables["params"], inherited["params"]
  # Stage 0's stream: the 8 channels most written to by its blocks' conv2 (and shortcuts).
  writes = sum(np.abs(np.asarray(t[f"stage0_block{j}"]["conv2"]["kernel"])).sum((0, 1, 2))
               for j in range(2))
  stream = np.sort(np.argsort(-writes)[:8])
  inner = np.sort(np.argsort(-np.abs(np.asarray(t["stage0_block0"]["conv1"]["kernel"])).sum(
      (0, 1, 2)))[:8])
  stem = np.sort(np.argsort(-np.abs(np.asarray(t["stem"]["kernel"])).sum((0, 1, 2)))[:16])
  np.testing.assert_array_equal(stem, np.arange(16))  # The student keeps all 16 stem channels.
  expected = np.asarray(t["stage0_block0"]["conv2"]["kernel"])[:, :, inner][..., stream]
  np.testing.assert_array_equal(s["stage0_block0"]["conv2"]["kernel"], expected)
  np.testing.assert_array_equal(s["stage0_block0"]["norm2"]["scale"],
                                np.asarray(t["stage0_block0"]["norm2"]["scale"])[inner])
  mean = variables["batch_stats"]["stage0_block0"]["norm2"]["mean"]
  np.testing.assert_array_equal(inherited["batch_stats"]["stage0_block0"]["norm2"]["mean"],
                                np.asarray(mean)[inner])
  # Stage 1's first block reads stage 0's chosen stream.
  np.testing.assert_array_equal(s["stage1_block0"]["norm1"]["bias"],
                                np.asarray(t["stage1_block0"]["norm1"]["bias"])[stream])


def test_new_layers_keep_their_fresh_initialisation():
  teacher_spec = TEACHERS[0]
  _, variables = _randomised_teacher(teacher_spec)
  # Stage 0 gains a stride (a projection shortcut appears) and stage 1 switches to robust.
  actions = (space.StageAction(1.0, 1.0, True, False), space.StageAction(1.0, 1.0, False, True))
  spec, _, fresh, inherited = _student(teacher_spec, variables, actions)
  assert spec.stages[1].block == "robust" and spec.stages[0].stride == 2
  f, s, t = fresh["params"], inherited["params"], variables["params"]
  np.testing.assert_array_equal(s["stage0_block0"]["shortcut"]["kernel"],
                                f["stage0_block0"]["shortcut"]["kernel"])
  np.testing.assert_array_equal(s["stage0_block0"]["conv1"]["kernel"],
                                t["stage0_block0"]["conv1"]["kernel"])
  new_block = zip(jax.tree.leaves(s["stage1_block0"]), jax.tree.leaves(f["stage1_block0"]))
  for leaf_s, leaf_f in new_block:
    np.testing.assert_array_equal(leaf_s, leaf_f)


def test_sliced_robust_student_keeps_groups_aligned():
  teacher_spec = TEACHERS[1]
  teacher, variables = _randomised_teacher(teacher_spec)
  actions = (space.StageAction(1.0, 1.0, False, True), space.StageAction(1.0, 0.5, True, True))
  spec, _, _, inherited = _student(teacher_spec, variables, actions)
  assert spec.widths == (16, 16)
  t = variables["params"]["stage1_block0"]
  s = inherited["params"]["stage1_block0"]
  width = t["split_conv0"]["kernel"].shape[-1]  # 8 for 32 planes, 4 for 16.
  assert (width, s["split_conv0"]["kernel"].shape[-1]) == (8, 4)
  norms = sum(np.abs(np.asarray(t[f"split_conv{k}"]["kernel"])).sum((0, 1, 2)) for k in range(7))
  local = np.sort(np.argsort(-norms.reshape(4, 2).sum(0))[:1])
  split = np.concatenate([g * 2 + local for g in range(4)])
  # One choice for every split: each split conv keeps the chosen input channel of every group
  # and the chosen output channels, and its BN keeps the statistics of those channels.
  for k in range(7):
    kernel = np.asarray(t[f"split_conv{k}"]["kernel"])
    np.testing.assert_array_equal(s[f"split_conv{k}"]["kernel"], kernel[:, :, local][..., split])
    for name in ("scale", "bias"):
      np.testing.assert_array_equal(s[f"split_norm{k}"][name],
                                    np.asarray(t[f"split_norm{k}"][name])[split])
    stats_s = inherited["batch_stats"]["stage1_block0"][f"split_norm{k}"]
    stats_t = variables["batch_stats"]["stage1_block0"][f"split_norm{k}"]
    for name in ("mean", "var"):
      np.testing.assert_array_equal(stats_s[name], np.asarray(stats_t[name])[split])
  # conv1 writes the eight splits side by side: the same choice within each.
  conv1_out = np.concatenate([scale * width + split for scale in range(8)])
  np.testing.assert_array_equal(s["conv1"]["kernel"],
                                np.asarray(t["conv1"]["kernel"])[..., conv1_out])
