"""Evaluation: exact clean accuracy, padding and masking, eval-mode BN, labelled settings."""

import jax
import numpy as np
import pytest

from rcnas_jax import arch, config as config_lib, data, evaluate, models, parallel

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2)))


@pytest.fixture(scope="module")
def setup():
  digits = data.load("digits")
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  variables = models.init(model, jax.random.key(0), (8, 8, 1))
  # Non-trivial running statistics, so eval and train mode differ.
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])}
  split = data.Split(digits.test.images[:37], digits.test.labels[:37])  # Not a batch multiple.
  return model, variables, split


def test_clean_accuracy_equals_a_direct_computation_with_padding(setup):
  model, variables, split = setup
  logits = model.apply(variables, split.images.astype(np.float32) / 255)
  expected = float(np.mean(np.argmax(logits, 1) == split.labels))
  for devices, batch in [(1, 16), (8, 16), (8, 64)]:
    result = evaluate.robust_accuracy(model, variables, split, evaluate.AttackSettings("clean"),
                                      jax.random.key(0),
                                      parallel.data_mesh(jax.devices()[:devices]),
                                      batch_size=batch)
    assert result["accuracy"] == pytest.approx(expected)
    assert result["n_examples"] == 37


def test_attacks_only_lower_accuracy_and_are_labelled(setup):
  model, variables, split = setup
  c = config_lib.base_config().evaluation
  c.eps, c.pgd_steps, c.cw_steps = 0.1, 5, 5
  results = evaluate.evaluate(model, variables, split, evaluate.attacks_from_config(c),
                              jax.random.key(0), parallel.data_mesh(), batch_size=16)
  assert list(results) == ["clean", "fgsm", "pgd", "cw"]
  for name in ("fgsm", "pgd", "cw"):
    assert results[name]["accuracy"] <= results["clean"]["accuracy"]
  assert results["pgd"]["attack"] == (
      "PGD-5 (CE, L-inf eps=0.1 (25.5/255), step=0.003137 (0.8/255), random start, 1 restart)")
  assert results["fgsm"]["attack"] == "FGSM (CE, L-inf eps=0.1 (25.5/255))"
  table = evaluate.format_table(results)
  assert "| cw |" in table and "CW-5 (CW margin" in table


def test_paper_settings_are_the_default():
  attacks = evaluate.attacks_from_config(config_lib.base_config().evaluation)
  pgd, cw = attacks[2], attacks[3]
  assert (pgd.num_steps, cw.num_steps) == (20, 40)
  assert pgd.eps == cw.eps == pytest.approx(8 / 255)
  assert pgd.step_size == pytest.approx(0.8 / 255)
