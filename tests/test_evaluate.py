"""Evaluation: exact clean accuracy, padding and masking, eval-mode BN, labelled settings, the
AutoAttack suite with its composites on the points still robust, run-time sanity checks, and
resuming from the progress file (keyed by each attack's version)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
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
  c.update(eps=0.1, apgd_steps=5, apgd_targets=2, fab_steps=5, fab_targets=2, square_queries=20,
           attacks=("clean", "apgd-ce", "autoattack", "aa-lite"))
  return c


def test_suite_labels_and_defaults():
  c = config_lib.base_config().evaluation
  assert [a.name for a in evaluate.attacks_from_config(c)] == [
      "clean", "fgsm", "pgd", "cw", "apgd-ce", "apgd-t"]
  composites = evaluate.composites_from_config(c)
  assert list(composites) == ["autoattack"]
  assert [a.name for a in composites["autoattack"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  apgd_t, fab_t, square = composites["autoattack"][1:]
  assert apgd_t.describe() == (
      "APGD-T-100 (targeted DLR, 9 targets, L-inf eps=0.03137 (8/255), 1 restart)")
  assert fab_t.describe() == ("FAB-T-100 (9 targets, L-inf eps=0.03137 (8/255), alpha_max=0.1, "
                              "eta=1.05, beta=0.9, 1 restart)")
  assert square.describe() == ("Square (5000 queries, standard p schedule, margin, p_init=0.8, "
                               "L-inf eps=0.03137 (8/255), 1 restart)")
  assert evaluate.is_standard(composites["autoattack"], 10)
  assert evaluate.composite_label("autoattack", composites["autoattack"], 10).startswith(
      "AutoAttack (standard version): point-wise worst case of APGD-CE-100")
  # With 4 classes AutoAttack attacks the 3 others: 9 targets is still the standard setting.
  assert evaluate.is_standard(composites["autoattack"], 4)
  cheap = evaluate.composites_from_config(_suite_config())
  assert not evaluate.is_standard(cheap["autoattack"], 10)
  assert "NOT the standard settings" in evaluate.composite_label("autoattack",
                                                                 cheap["autoattack"], 10)
  assert evaluate.composite_label("aa-lite", cheap["aa-lite"], 10).startswith(
      "AA-lite (AutoAttack without FAB-T: an upper bound on AutoAttack's robust accuracy)")
  c.attacks = ("clean",)
  assert evaluate.composites_from_config(c) == {}


def test_composites_are_worst_cases_on_still_robust_points_and_resume(trained, tmp_path):
  model, variables, split = trained
  c = _suite_config()
  mesh = parallel.data_mesh()
  progress = tmp_path / "evaluation.jsonl"
  run = lambda: evaluate.evaluate(model, variables, split, evaluate.attacks_from_config(c),
                                  jax.random.key(0), mesh, batch_size=16,
                                  composites=evaluate.composites_from_config(c),
                                  progress_path=str(progress))
  results = run()
  assert list(results) == ["clean", "apgd-ce", "autoattack", "aa-lite"]
  full, lite = results["autoattack"]["after"], results["aa-lite"]["after"]
  assert list(full) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert list(lite) == ["apgd-ce", "apgd-t", "square"]
  # APGD-CE's flags are reused; then each attack only lowers the robust accuracy.
  assert full["apgd-ce"] == results["apgd-ce"]["accuracy"] <= results["clean"]["accuracy"]
  assert full["apgd-ce"] >= full["apgd-t"] >= full["fab-t"] >= full["square"]
  assert lite["apgd-t"] == full["apgd-t"] and lite["apgd-t"] >= lite["square"]
  assert results["autoattack"]["accuracy"] == full["square"]
  assert results["aa-lite"]["accuracy"] == lite["square"]
  assert not results["autoattack"]["standard"]
  records = [json.loads(line) for line in progress.read_text().splitlines()]
  attacked = lambda *parts: [len(r["correct"]) for r in records if r["tag"].startswith(
      "composite|") and all(part in r["tag"] for part in parts)]
  # Each attack ran only on the points the previous one left robust; the shared prefix
  # (APGD-CE, APGD-T) ran once for both composites.
  n = len(split)
  assert attacked("APGD-CE") == []
  # Targeted attacks run target by target, each on the points the last left robust.
  assert sum(attacked("APGD-T", "target=2|")) == round(full["apgd-ce"] * n) > 0
  assert sum(attacked("APGD-T", "target=3|")) <= round(full["apgd-ce"] * n)
  assert sum(attacked("FAB-T", "target=2|")) == round(full["apgd-t"] * n) > 0
  # Square runs on what FAB-T left, and on what APGD-T left: once if FAB-T broke nothing.
  squares = {round(full["fab-t"] * n), round(lite["apgd-t"] * n)}
  assert sorted(attacked("Square")) == sorted(squares)
  # A rerun computes nothing; a run killed mid-file (a cut line too) recomputes the rest.
  assert run() == results and len(progress.read_text().splitlines()) == len(records)
  lines = progress.read_text().splitlines(keepends=True)
  progress.write_text("".join(lines[:3]) + lines[3][:10])
  resumed = run()
  assert {k: r["accuracy"] for k, r in resumed.items()} == {
      k: r["accuracy"] for k, r in results.items()}
  assert [json.loads(line) for line in progress.read_text().splitlines()]  # Every line whole,
  assert len(progress.read_text().splitlines()) == len(records)  # so a second resume reads it.


def test_target_by_target_equals_all_targets_at_once(trained):
  model, variables, split = trained
  # FAB-T with one restart has no randomness: the sequential run must equal the vmapped one.
  threat = attacks.ThreatModel("fab-t", eps=0.1, num_steps=10, num_targets=4)
  flags, _ = evaluate.correct_flags(model, variables, split, threat, jax.random.key(0),
                                    parallel.data_mesh(), batch_size=16)
  logits_fn = models.logits_fn(model, variables)
  x = split.images.astype(np.float32) / 255
  adversarial = attacks.fab_targeted(logits_fn, x, split.labels, jax.random.key(0), eps=0.1,
                                     num_steps=10, num_targets=4)
  clean = np.argmax(logits_fn(x), 1) == split.labels
  expected = clean & (np.argmax(logits_fn(adversarial), 1) == split.labels)
  np.testing.assert_array_equal(flags, expected)
  assert 0 < expected.mean() < clean.mean()


def test_a_point_misclassified_clean_is_never_robust():
  # A linear model that is wrong at the clean point and right at the "adversarial" one: the
  # clean point lies in the threat ball, so the point is not robust (AutoAttack's rule).
  logits_fn = lambda x: jnp.stack([x[:, 0], 1.0 - x[:, 0]], axis=1)
  clean = jnp.array([[0.2], [0.2], [0.7], [0.7]])
  attacked = jnp.array([[0.6], [0.3], [0.8], [0.1]])
  labels = jnp.array([0, 1, 0, 0])
  # Clean: predicted 1, 1, 0, 0; attacked: 0, 1, 0, 1.
  np.testing.assert_array_equal(evaluate.robust_flags(logits_fn, attacked, clean, labels),
                                [False, True, True, False])


@pytest.mark.parametrize("threat", [
    attacks.ThreatModel("apgd-ce", eps=0.1, num_steps=12, restarts=2),
    attacks.ThreatModel("apgd-t", eps=0.1, num_steps=12, num_targets=3),
    attacks.ThreatModel("fab-t", eps=0.1, num_steps=12, num_targets=3)],
    ids=["apgd-ce", "apgd-t", "fab-t"])
def test_stepped_from_the_host_is_the_one_program_attack(trained, threat):
  """One program per step (the CPU default) computes what one rolled program computes."""
  model, variables, split = trained
  images, labels = split.images[:32], split.labels[:32]
  key = jax.random.key(3)
  for rank in (None, jnp.int32(3)) if threat.name != "apgd-ce" else (None,):
    stepped = evaluate._correct_stepped(variables, images, labels, key, rank, model=model,
                                        attack=threat)
    rolled = evaluate._correct(variables, images, labels, key, rank, model=model,
                               attack=threat, unroll=False)
    np.testing.assert_array_equal(stepped[0], rolled[0])
    np.testing.assert_allclose(stepped[1], rolled[1], atol=1e-6)
  clean = np.mean(np.argmax(models.logits_fn(model, variables)(images.astype(np.float32) / 255), 1)
                 == labels)
  assert float(np.mean(stepped[0])) < clean  # The attack did something.


def test_a_new_attack_version_is_never_served_stale_progress(trained, tmp_path, monkeypatch):
  model, variables, split = trained
  progress = tmp_path / "evaluation.jsonl"
  attack = attacks.ThreatModel("square", eps=0.1, num_steps=10)
  run = lambda: evaluate.robust_accuracy(model, variables, split, attack, jax.random.key(0),
                                         parallel.data_mesh(), batch_size=16,
                                         progress=evaluate.Progress(str(progress)))
  run()
  tags = {json.loads(line)["tag"] for line in progress.read_text().splitlines()}
  assert len(tags) == 1 and f"|v{attacks.VERSIONS['square']}|" in tags.pop()
  monkeypatch.setitem(attacks.VERSIONS, "square", attacks.VERSIONS["square"] + 1)
  run()
  assert len({json.loads(line)["tag"] for line in progress.read_text().splitlines()}) == 2


@pytest.mark.parametrize("violations,needle", [
    ((0.1, 0.0, 1.0), "NaN in the adversarial images"),
    ((0.1, 0.01, 0.0), "adversarial values leave [0, 1] by 0.01"),
    ((0.1001, 0.0, 0.0), "a perturbation of linf norm 0.1001 exceeds eps=0.1"),
])
def test_an_invalid_adversarial_batch_stops_the_evaluation(violations, needle):
  attack = attacks.ThreatModel("pgd", eps=0.1, num_steps=3)
  with pytest.raises(evaluate.EvaluationError) as error:
    evaluate.check_batch(np.array(violations), attack, 2)
  assert str(error.value) == f"evaluation stopped: {attack.describe()}, batch 2: {needle}"
  evaluate.check_batch(np.array((0.1 + 1e-7, 1e-7, 0.0)), attack, 2)  # Rounding passes.


def test_violations_measure_the_batch():
  images = np.full((2, 2, 2, 1), 0.5, np.float32)
  adversarial = images.copy()
  adversarial[1, 0, 0, 0] = 0.7
  assert np.allclose(evaluate._violations(adversarial, images, "linf"), (0.2, 0.0, 0.0))
  adversarial[0, 1, 1, 0] = 1.25
  adversarial[0, 0, 0, 0] = 1.25
  assert np.allclose(evaluate._violations(adversarial, images, "l2"),
                     (np.sqrt(2) * 0.75, 0.25, 0.0))
  adversarial[1, 1, 0, 0] = np.nan
  assert evaluate._violations(adversarial, images, "linf")[2] == 1.0


def test_an_attack_that_leaves_the_ball_is_caught(trained, monkeypatch):
  model, variables, split = trained
  monkeypatch.setattr(attacks, "run",
                      lambda threat, f, x, *_: jnp.clip(x + 2 * threat.eps, 0, 1))
  with pytest.raises(evaluate.EvaluationError, match="exceeds eps=0.1"):
    evaluate.robust_accuracy(model, variables, split, attacks.ThreatModel("fgsm", eps=0.1),
                             jax.random.key(0), parallel.data_mesh(), batch_size=16)


def test_progress_keys_on_the_settings(tmp_path):
  progress = evaluate.Progress(str(tmp_path / "p.jsonl"))
  progress.put("a", 0, np.array([True, False]), 1.5)
  again = evaluate.Progress(str(tmp_path / "p.jsonl"))
  assert again.get("a", 0)["correct"] == "10" and again.get("a", 1) is None
  assert again.get("b", 0) is None


class _Linear(nn.Module):
  """A linear classifier in evaluate's model interface."""

  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    return nn.Dense(self.num_classes)(images.reshape(images.shape[0], -1))


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
def test_standard_autoattack_is_the_exact_robust_accuracy_of_a_linear_model(norm, eps):
  rng = np.random.default_rng(0)
  n, side, classes = 320, 6, 4
  weights = rng.normal(size=(side * side, classes)).astype(np.float32) * 0.2
  bias = rng.normal(size=classes).astype(np.float32) * 0.1
  # uint8 pixels in [64, 191]: the [0, 1] box never binds, so the closed form is exact.
  images = rng.integers(64, 192, size=(n, side, side, 1), dtype=np.uint8)
  x = images.reshape(n, -1).astype(np.float32) / 255
  logits = x @ weights + bias
  labels = np.argmax(logits, 1)
  labels[:32] = (labels[:32] + 1) % classes  # Some misclassified from the start.
  gaps = logits[np.arange(n), labels][:, None] - logits
  dual = np.linalg.norm(weights[:, labels].T[:, :, None] - weights[None],
                        ord=1 if norm == "linf" else 2, axis=1)
  own = np.arange(classes) == labels[:, None]
  exact = float(np.mean(np.where(own, np.inf, gaps / np.where(own, 1, dual)).min(1) > eps))
  assert 0.2 < exact < 0.7
  c = config_lib.base_config().evaluation
  c.update(eps=eps, norm=norm)
  model = _Linear(classes)
  variables = {"params": {"Dense_0": {"kernel": weights, "bias": bias}}}
  results = evaluate.evaluate(model, variables, data.Split(images, labels),
                              (attacks.ThreatModel("clean"),), jax.random.key(0),
                              parallel.data_mesh(), batch_size=n, unroll=False,
                              composites=evaluate.composites_from_config(c, ("autoattack",)))
  assert results["autoattack"]["standard"]
  assert exact - 1e-6 <= results["autoattack"]["accuracy"] <= exact + 0.01
