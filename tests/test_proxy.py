"""The proxy evaluation: its config, its training and its validation attack, on real digits."""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import arch, models
from rcnas_jax.rl import proxy
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust.attacks import ThreatModel
from rcnas_jax.runtime import parallel

STUDENT = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 8, 2),
                                   arch.StageSpec(1, 16, 2)))


def _config():
  c = config_lib.base_config()
  c.attack.update(eps=0.1, step_size=0.05, num_steps=2)
  c.search.proxy.update(epochs=3, train_examples=256, validation_examples=64, batch_size=32,
                        attack_steps=3, learning_rate=0.1, method="standard")
  return c


def test_proxy_config_replaces_only_the_training_schedule():
  c = _config()
  c.training.method, c.search.proxy.method = "pgd_at", ""  # '' = training.method.
  p = proxy.proxy_config(c)
  assert (p.training.method, p.training.epochs, p.training.batch_size) == ("pgd_at", 3, 32)
  assert (p.training.schedule, p.training.warmup_epochs, p.training.ema_decay) == ("cosine", 0, 0)
  assert p.attack.num_steps == 3 and p.attack.step_size == pytest.approx(2.5 * 0.1 / 3)
  assert p.training.weight_decay == c.training.weight_decay and p.search == c.search
  c.search.proxy.method = "standard"
  assert proxy.proxy_config(c).training.method == "standard"
  assert c.training.epochs == 100  # The config itself is left alone.


@pytest.fixture(scope="module")
def trained():
  c = _config()
  digits = data.load("digits")
  teacher = models.build(arch.TEACHERS["tiny-8"], 10, digits.info.mean, digits.info.std)
  teacher_variables = models.init(teacher, jax.random.key(0), (8, 8, 1))
  mesh = parallel.data_mesh(jax.devices()[:2])
  task = Task("digits", ThreatModel("clean", eps=0.1), "tiny-8", 10**6)
  train_split, _, _ = proxy.splits(c, digits)
  variables, losses = proxy.train(c, digits.info, train_split, teacher_variables, task, STUDENT,
                                  mesh)
  return c, digits, teacher_variables, mesh, variables, losses


def test_proxy_training_runs_its_steps_and_lowers_the_loss(trained):
  _, digits, _, _, _, losses = trained
  assert len(losses) == 3 * 256 // 32  # Three epochs of the 256-image subset, batches of 32.
  assert float(losses[-1]) < float(losses[0])


def test_xla_cpu_optimisation_level_changes_only_rounding(trained):
  c, digits, teacher_variables, mesh, variables, losses = trained
  assert c.search.proxy.cpu_optimization_level == 1
  c = copy.deepcopy(c)
  c.search.proxy.cpu_optimization_level = 2  # XLA's default.
  if mesh.devices.flat[0].platform == "cpu":  # Other backends ignore the level.
    assert proxy._programs(c, mesh) is not proxy._programs(trained[0], mesh)
  task = Task("digits", ThreatModel("clean", eps=0.1), "tiny-8", 10**6)
  train_split, _, _ = proxy.splits(c, digits)
  default_variables, default_losses = proxy.train(c, digits.info, train_split, teacher_variables,
                                                  task, STUDENT, mesh)
  np.testing.assert_allclose(np.array(default_losses), np.array(losses), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(default_variables), jax.tree.leaves(variables)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_clean_validation_accuracy_is_the_plain_accuracy_of_the_trained_student(trained):
  c, digits, _, mesh, variables, _ = trained
  task = Task("digits", ThreatModel("clean", eps=0.1), "tiny-8", 10**6)
  validation = data.sample(digits.validation, 64)
  model = models.build(STUDENT, 10, digits.info.mean, digits.info.std)
  logits = model.apply(variables, jnp.asarray(validation.images, jnp.float32) / 255, train=False)
  expected = np.mean(np.argmax(np.asarray(logits), -1) == validation.labels)
  np.testing.assert_array_equal(proxy.splits(c, digits)[1].labels, validation.labels)
  assert proxy.robust_accuracy(c, digits.info, validation, task, STUDENT, variables,
                               mesh) == pytest.approx(expected, abs=1e-6)


def test_an_attack_can_only_lower_the_validation_accuracy(trained):
  c, digits, _, mesh, variables, _ = trained
  _, validation, _ = proxy.splits(c, digits)
  accuracy = lambda threat: proxy.robust_accuracy(
      c, digits.info, validation, Task("digits", threat, "tiny-8", 10**6), STUDENT, variables,
      mesh)
  clean = accuracy(ThreatModel("clean", eps=0.1))
  fgsm = accuracy(ThreatModel("fgsm", eps=0.1))
  pgd = accuracy(ThreatModel("pgd", eps=0.1, num_steps=5))
  assert clean > 0.3 and pgd <= fgsm + 1 / 64 and fgsm < clean


def test_the_selection_set_is_disjoint_from_the_reward_sample_and_chunks_exactly(trained):
  c, digits, _, mesh, variables, _ = trained
  c.search.selection.examples = 0  # All the rest of the 144 validation digits.
  _, reward, selection = proxy.splits(c, digits)
  assert len(reward) == 64 and len(selection) == 144 - 64
  seen = lambda split: {image.tobytes() for image in split.images}
  assert not seen(reward) & seen(selection)
  assert seen(reward) | seen(selection) <= seen(digits.validation)
  task = Task("digits", ThreatModel("clean", eps=0.1), "tiny-8", 10**6)
  model = models.build(STUDENT, 10, digits.info.mean, digits.info.std)
  logits = model.apply(variables, jnp.asarray(selection.images, jnp.float32) / 255, train=False)
  expected = np.mean(np.argmax(np.asarray(logits), -1) == selection.labels)
  # Two chunks of the reward's 64 images, the second padded by wrapping around: same number.
  assert proxy.robust_accuracy(c, digits.info, selection, task, STUDENT, variables, mesh,
                               chunk=64) == pytest.approx(expected, abs=1e-6)


def test_a_student_on_its_family_network_trains_and_scores_as_on_its_own(trained):
  """search.proxy.programs='family': the same losses, weights and robust accuracy."""
  c, digits, teacher_variables, mesh, variables, losses = trained
  family = ml_collections.ConfigDict(c.to_dict())
  family.search.proxy.programs = "family"
  task = Task("digits", ThreatModel("fgsm", eps=0.1), "tiny-8", 10**6)
  train_split, validation, _ = proxy.splits(family, digits)
  family_variables, family_losses = proxy.train(family, digits.info, train_split,
                                                teacher_variables, task, STUDENT, mesh)
  np.testing.assert_allclose(jax.device_get(family_losses), jax.device_get(losses), rtol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3),
               jax.device_get(family_variables), jax.device_get(variables))
  scores = [proxy.robust_accuracy(config, digits.info, validation, task, STUDENT, v, mesh)
            for config, v in ((c, variables), (family, family_variables))]
  assert abs(scores[0] - scores[1]) <= 1 / 64
