"""Evaluation: exact clean accuracy, padding and masking, eval-mode BN, labelled settings, the
AutoAttack suite with AA-lite on the points still robust, resuming from the progress file."""

import json

import jax
import numpy as np
import pytest

import helpers
from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import arch, models
from rcnas_jax.robust import attacks, evaluate
from rcnas_jax.runtime import parallel

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
    result = evaluate.robust_accuracy(model, variables, split, attacks.ThreatModel("clean"),
                                      jax.random.key(0),
                                      parallel.data_mesh(jax.devices()[:devices]),
                                      batch_size=batch)
    assert result["accuracy"] == pytest.approx(expected)
    assert result["n_examples"] == 37


def test_attacks_only_lower_accuracy_and_are_labelled(setup):
  model, variables, split = setup
  c = config_lib.base_config().evaluation
  c.eps, c.pgd_steps, c.cw_steps = 0.1, 5, 5
  c.attacks = ("clean", "fgsm", "pgd", "cw")
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


@pytest.fixture(scope="module")
def trained(setup):
  """The setup's network after 60 Adam steps on the digits (~90% test accuracy)."""
  model, variables, split = setup
  return model, helpers.fit(model, variables, data.load("digits").train, 60), split


def _suite_config():
  c = config_lib.base_config().evaluation
  c.update(eps=0.1, apgd_steps=5, apgd_targets=2, square_queries=20,
           attacks=("clean", "apgd-ce", "aa-lite"))
  return c


def test_suite_labels_and_defaults():
  c = config_lib.base_config().evaluation
  assert [a.name for a in evaluate.attacks_from_config(c)] == [
      "clean", "fgsm", "pgd", "cw", "apgd-ce", "apgd-t"]
  assert [a.name for a in evaluate.aa_lite_from_config(c)] == ["apgd-ce", "apgd-t", "square"]
  apgd_t, square = evaluate.aa_lite_from_config(c)[1:]
  assert apgd_t.describe() == (
      "APGD-T-100 (targeted DLR, 9 targets, L-inf eps=0.03137 (8/255), 1 restart)")
  assert square.describe() == (
      "Square (5000 queries, margin, p_init=0.8, L-inf eps=0.03137 (8/255), 1 restart)")
  c.attacks = ("clean",)
  assert evaluate.aa_lite_from_config(c) == ()


def test_aa_lite_is_the_worst_case_on_still_robust_points_and_resumes(trained, tmp_path):
  model, variables, split = trained
  c = _suite_config()
  mesh = parallel.data_mesh()
  progress = tmp_path / "evaluation.jsonl"
  run = lambda: evaluate.evaluate(model, variables, split, evaluate.attacks_from_config(c),
                                  jax.random.key(0), mesh, batch_size=16,
                                  aa_lite_attacks=evaluate.aa_lite_from_config(c),
                                  progress_path=str(progress))
  results = run()
  assert list(results) == ["clean", "apgd-ce", "aa-lite"]
  after = results["aa-lite"]["after"]
  assert list(after) == ["apgd-ce", "apgd-t", "square"]
  # APGD-CE's flags are reused; then each attack only lowers the robust accuracy.
  assert after["apgd-ce"] == results["apgd-ce"]["accuracy"] <= results["clean"]["accuracy"]
  assert after["apgd-ce"] >= after["apgd-t"] >= after["square"]
  assert results["aa-lite"]["accuracy"] == after["square"]
  records = [json.loads(line) for line in progress.read_text().splitlines()]
  # APGD-T ran only on the points APGD-CE left robust, Square on those APGD-T left.
  attacked = lambda prefix: sum(len(r["correct"]) for r in records
                                if r["tag"].startswith("aa-lite|" + prefix))
  assert attacked("APGD-CE") == 0
  assert attacked("APGD-T") == round(after["apgd-ce"] * len(split)) > 0
  assert attacked("Square") == round(after["apgd-t"] * len(split)) > 0
  # A rerun computes nothing; a run killed mid-file (a cut line too) recomputes the rest.
  assert run() == results and len(progress.read_text().splitlines()) == len(records)
  lines = progress.read_text().splitlines(keepends=True)
  progress.write_text("".join(lines[:3]) + lines[3][:10])
  resumed = run()
  assert {k: r["accuracy"] for k, r in resumed.items()} == {
      k: r["accuracy"] for k, r in results.items()}
  assert [json.loads(line) for line in progress.read_text().splitlines()]  # Every line whole,
  assert len(progress.read_text().splitlines()) == len(records)  # so a second resume reads it.


def test_progress_keys_on_the_settings(tmp_path):
  progress = evaluate.Progress(str(tmp_path / "p.jsonl"))
  progress.put("a", 0, np.array([True, False]), 1.5)
  again = evaluate.Progress(str(tmp_path / "p.jsonl"))
  assert again.get("a", 0)["correct"] == "10" and again.get("a", 1) is None
  assert again.get("b", 0) is None
