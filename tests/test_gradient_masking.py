"""Gradient-masking checks: each fires on a model built to trip it and stays quiet otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax.robust import gradient_masking

DIM, CLASSES = 16, 4


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(DIM, CLASSES)), jnp.float32)
  images = jnp.asarray(rng.uniform(0.3, 0.7, size=(64, 4, 4, 1)), jnp.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights
  labels = jnp.argmax(logits_fn(images), axis=1)
  return logits_fn, images, labels


def test_randomness(problem):
  logits_fn, images, labels = problem
  assert gradient_masking.randomness(logits_fn, images, labels) is None
  rng = np.random.default_rng(1)
  noisy = lambda x: logits_fn(x) + rng.normal(size=(len(x), CLASSES)).astype(np.float32)
  assert "change between identical calls" in gradient_masking.randomness(noisy, images, labels)


def test_softmax_output(problem):
  logits_fn, images, _ = problem
  assert gradient_masking.softmax_output(logits_fn(images)) is None
  assert "probability distribution" in gradient_masking.softmax_output(
      jax.nn.softmax(logits_fn(images)))


def test_zero_and_vanishing_gradients(problem):
  logits_fn, images, labels = problem
  assert gradient_masking.input_gradients(logits_fn, images, labels) is None
  quantised = lambda x: logits_fn(jnp.round(x * 4) / 4)  # round() has a zero gradient.
  assert gradient_masking.input_gradients(quantised, images, labels).startswith(
      "64 of 64 points have a zero")
  # Huge logits saturate the softmax: CE gradients of confident points underflow.
  saturated = gradient_masking.input_gradients(lambda x: 1e4 * logits_fn(x), images, labels)
  assert saturated is not None and "of 64 points" in saturated


def test_black_box_beats_white_box():
  result = lambda accuracy: {"accuracy": accuracy}
  fine = {"pgd": result(0.5), "apgd-ce": result(0.45), "square": result(0.48)}
  assert gradient_masking.black_box_beats_white_box(fine) is None
  fine["square"] = result(0.40)
  assert "Square attack (40.00%) beats every white-box attack (best 45.00%)" in (
      gradient_masking.black_box_beats_white_box(fine))
  inside = {"aa-lite": {"after": {"apgd-ce": 0.5, "apgd-t": 0.45, "square": 0.44}}}
  assert "from 45.00% to 44.00%" in gradient_masking.black_box_beats_white_box(inside)
  inside["aa-lite"]["after"]["square"] = 0.449
  assert gradient_masking.black_box_beats_white_box(inside) is None


def test_eps_growth():
  assert gradient_masking.eps_growth([0.1, 0.2, 1.0], [0.5, 0.3, 0.0], unbounded=1.0) is None
  assert "does not decrease with eps" in gradient_masking.eps_growth([0.1, 0.2], [0.3, 0.5])
  assert "unbounded attack leaves 20.0%" in gradient_masking.eps_growth(
      [0.1, 1.0], [0.5, 0.2], unbounded=1.0)


def test_accuracy_falls_with_eps_on_a_linear_model_and_run_all(problem):
  logits_fn, images, labels = problem
  radii = jnp.array([0.0, 0.01, 0.05, 0.1, 1.0])
  accuracy = np.asarray(gradient_masking.accuracy_by_eps(
      jax.tree_util.Partial(logits_fn), images, labels, jax.random.key(0), radii))
  assert accuracy[0] == 1.0 and accuracy[-1] == 0.0
  assert np.all(np.diff(accuracy) <= 0)
  results = {"pgd": {"accuracy": 0.5}}
  assert gradient_masking.run_all(logits_fn, images, labels, jax.random.key(0), eps=0.05,
                                  norm="linf", results=results) == []
  quantised = lambda x: logits_fn(jnp.round(x * 4) / 4)
  warnings = gradient_masking.run_all(quantised, images, labels, jax.random.key(0), eps=0.05,
                                      norm="linf", results=results)
  assert len(warnings) == 2 and "zero" in warnings[0] and "unbounded attack" in warnings[1]
