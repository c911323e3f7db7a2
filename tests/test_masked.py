"""Masked families: a student run as its family network with masks computes the student."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rcnas_jax.nets import arch, masked, models, space
from rcnas_jax.robust import attacks, training

IMAGE = (8, 8, 1)
TEACHER = arch.NetworkSpec(stages=(arch.StageSpec(2, 24, 1), arch.StageSpec(3, 32, 2),
                                   arch.StageSpec(2, 40, 2)))
# A basic stage at half depth whose first block needs no projection (16 stem channels in, 16
# out) where its family's does (24 out), a robust stage (split width 4 of the family's 8, so
# the groups move), and a one-block basic stage of the last stage's three.
STUDENT = arch.NetworkSpec(stages=(arch.StageSpec(1, 16, 1), arch.StageSpec(2, 16, 2, "robust"),
                                   arch.StageSpec(1, 24, 1)))


def _students():
  yield STUDENT
  yield dataclasses.replace(STUDENT, activation="softplus")  # softplus(0) != 0: masks must hold.


def _networks(spec):
  """(student model, its variables, family model, the embedded variables)."""
  model = models.build(spec, 10, (0.4,), (0.3,))
  variables = models.init(model, jax.random.key(1), IMAGE)
  # Non-trivial BN statistics and scales, so that misplaced channels would show.
  variables = jax.tree.map(lambda x: x + 0.1 * jax.random.uniform(jax.random.key(2), x.shape),
                           variables)
  family_spec = masked.family(spec, TEACHER)
  family_model = models.build(family_spec, 10, (0.4,), (0.3,), masked=True)
  return model, variables, family_model, masked.embed(variables, spec, family_model, IMAGE)


def _images(n=16):
  return jax.random.uniform(jax.random.key(3), (n, *IMAGE))


def _close(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_the_family_is_the_teachers_depth_and_widest_width_with_the_students_layout():
  family_spec = masked.family(STUDENT, TEACHER)
  assert family_spec.depths == (2, 3, 2) and family_spec.widths == (24, 32, 40)
  assert [s.stride for s in family_spec.stages] == [1, 2, 1]
  assert [s.block for s in family_spec.stages] == ["basic", "robust", "basic"]
  # Every student the action space carves out of the teacher fits its family.
  rng = np.random.default_rng(0)
  for _ in range(50):
    actions = space.stage_actions(rng.uniform(0.01, 1, 3), rng.uniform(0.01, 1, 3),
                                  np.zeros(3), rng.integers(0, 2, 3))
    student = space.compress(TEACHER, actions, image_size=8)
    assert masked.family(student, TEACHER).depths == TEACHER.depths
  with pytest.raises(ValueError, match="stage 1 .* larger than its family"):
    masked.family(dataclasses.replace(STUDENT, stages=(
        STUDENT.stages[0], arch.StageSpec(4, 16, 2, "robust"), STUDENT.stages[2])), TEACHER)


def test_masks_have_the_family_networks_mask_collection_layout():
  _, _, family_model, embedded = _networks(STUDENT)
  initial = models.init(family_model, jax.random.key(0), IMAGE)["masks"]
  assert jax.tree.structure(initial) == jax.tree.structure(embedded["masks"])
  assert [np.shape(x) for x in jax.tree.leaves(initial)] == [
      np.shape(x) for x in jax.tree.leaves(embedded["masks"])]
  m = embedded["masks"]
  assert m["stream1"].sum() == 64 and m["stream2"].sum() == 24  # 4 x 16 robust, 24 basic.
  assert m["stage1_block0"]["hidden"].sum() == 8 * 4  # 8 splits of 4 of the family's 8.
  np.testing.assert_array_equal(np.flatnonzero(m["stage1_block0"]["split"]), [0, 2, 4, 6])
  assert [float(m[f"stage1_block{j}"].get("gate", 1)) for j in range(3)] == [1, 1, 0]
  assert float(m["stage2_block1"]["gate"]) == 0
  # Stride-1 first blocks switch between the identity and the projection shortcut.
  assert (float(m["stage0_block0"]["projection"]), float(m["stage2_block0"]["projection"])) == (
      0, 1)
  assert "projection" not in m["stage1_block0"]  # Stride 2: always a projection.


@pytest.mark.parametrize("spec", list(_students()), ids=["relu", "softplus"])
def test_extract_inverts_embed_and_the_rest_is_zero(spec):
  model, variables, family_model, embedded = _networks(spec)
  back = masked.extract(embedded, spec, family_model.spec, model, IMAGE)
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))
  total = sum(np.abs(x).sum() for x in jax.tree.leaves(variables))
  np.testing.assert_allclose(sum(np.abs(x).sum() for c in ("params", "batch_stats")
                                 for x in jax.tree.leaves(embedded[c])), total, rtol=1e-6)


@pytest.mark.parametrize("spec", list(_students()), ids=["relu", "softplus"])
def test_masked_logits_and_batch_statistics_equal_the_students(spec):
  model, variables, family_model, embedded = _networks(spec)
  x = _images()
  _close(family_model.apply(embedded, x), model.apply(variables, x))
  logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  family_logits, family_updated = family_model.apply(embedded, x, train=True,
                                                     mutable=["batch_stats"])
  _close(family_logits, logits)
  _close(masked.extract({**embedded, **family_updated}, spec, family_model.spec, model,
                        IMAGE)["batch_stats"], updated["batch_stats"])


@pytest.mark.parametrize("spec", list(_students()), ids=["relu", "softplus"])
def test_masked_gradients_equal_the_students_and_are_zero_on_the_padding(spec):
  model, variables, family_model, embedded = _networks(spec)
  x, labels = _images(), jnp.arange(16) % 10

  def loss(params, net, v):
    logits, _ = net.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(variables["params"], model, variables)
  family_grads = jax.grad(loss)(embedded["params"], family_model, embedded)
  student = masked.extract({**embedded, "params": family_grads}, spec, family_model.spec, model,
                           IMAGE)["params"]
  _close(student, grads, tol=1e-4)
  assert float(optax.tree.norm(family_grads)) == pytest.approx(float(optax.tree.norm(grads)),
                                                                rel=1e-5)


def test_masked_pgd_training_steps_equal_the_students():
  """Five PGD-AT steps with SGD momentum, weight decay and clipping: the same student.

  The softplus student only: its padding is non-zero before the masks (softplus(0) != 0), so it
  is the stricter case, and each student's two train steps take ~35 s to compile here.
  """
  spec = list(_students())[1]
  model, variables, family_model, embedded = _networks(spec)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(5e-4),
                   optax.sgd(0.05, momentum=0.9))
  settings = training.TrainSettings(
      method="pgd_at", attack=attacks.ThreatModel("pgd", eps=0.1, step_size=0.05, num_steps=2))
  images = (np.asarray(jax.random.uniform(jax.random.key(4), (5, 16, *IMAGE))) * 255)
  images, labels = images.astype(np.uint8), np.arange(80).reshape(5, 16) % 10
  results = []
  for net, v in ((model, variables), (family_model, embedded)):
    step = jax.jit(training.train_step, static_argnames=("model", "tx", "settings", "teacher"))
    state = training.create_state(net, tx, jax.random.key(0), IMAGE, v)
    for i in range(5):
      state, _ = step(state, images[i], labels[i], jax.random.key(5), None, model=net, tx=tx,
                      settings=settings)
    results.append(training.eval_variables(state, False))
  student, family_trained = results
  _close(masked.extract(family_trained, spec, family_model.spec, model, IMAGE), student,
         tol=1e-4)
  # The padding never moved: zero weights with zero gradients stay zero under weight decay.
  re_embedded = masked.embed(masked.extract(family_trained, spec, family_model.spec, model,
                                            IMAGE), spec, family_model, IMAGE)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(family_trained["params"]),
               re_embedded["params"])
