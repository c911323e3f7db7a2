"""Attacks: constraints, monotonicity in eps, and exact robust accuracy on linear classifiers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax import attacks

NUM_CLASSES, SIDE = 4, 6
DIM = SIDE * SIDE


def _linear_problem(seed=0, n=400):
  """A random linear classifier and points in [0.25, 0.75] (the box never binds for eps < 0.25)."""
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(DIM, NUM_CLASSES)).astype(np.float32) * 0.2
  bias = rng.normal(size=NUM_CLASSES).astype(np.float32) * 0.1
  images = rng.uniform(0.25, 0.75, size=(n, SIDE, SIDE, 1)).astype(np.float32)
  labels = np.argmax(images.reshape(n, DIM) @ weights + bias, axis=1)
  # Relabel a quarter of the points so some are misclassified from the start.
  labels[: n // 4] = (labels[: n // 4] + 1) % NUM_CLASSES
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights + bias
  return logits_fn, weights, bias, jnp.asarray(images), jnp.asarray(labels)


def _exact_linf_robust_accuracy(weights, bias, images, labels, eps):
  """A point is robust iff (w_y - w_j).x + b_y - b_j > eps ||w_y - w_j||_1 for every j != y."""
  x = np.asarray(images).reshape(len(images), -1)
  y = np.asarray(labels)
  logits = x @ weights + bias
  robust = np.ones(len(x), bool)
  for j in range(NUM_CLASSES):
    diff = weights[:, y].T - weights[:, j][None, :]
    gap = logits[np.arange(len(x)), y] - logits[:, j]
    robust &= (y == j) | (gap > eps * np.abs(diff).sum(axis=1))
  return robust.mean()


def _accuracy(logits_fn, images, labels):
  return float(jnp.mean(jnp.argmax(logits_fn(images), axis=1) == labels))


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1])
def test_margin_pgd_matches_exact_linear_robust_accuracy(eps):
  logits_fn, weights, bias, images, labels = _linear_problem()
  exact = _exact_linf_robust_accuracy(weights, bias, images, labels, eps)
  assert 0.05 < exact < 0.74, "the problem must be non-trivial at this eps"
  adversarial = jax.jit(functools.partial(
      attacks.pgd, logits_fn, eps=eps, step_size=eps / 4, num_steps=30, loss="margin",
      restarts=3))(images, labels, jax.random.key(0))
  assert abs(_accuracy(logits_fn, adversarial, labels) - exact) <= 0.01


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "margin", "kl"])
@pytest.mark.parametrize("unroll", [True, False])
def test_never_leaves_the_ball_or_the_box(norm, loss, unroll):
  logits_fn, _, _, images, labels = _linear_problem(n=64)
  images = images.at[:8].set(0.0).at[8:16].set(1.0)  # Points on the box boundary.
  eps = 0.1 if norm == "linf" else 0.8
  adversarial = attacks.pgd(logits_fn, images, labels, jax.random.key(1), eps=eps,
                            step_size=eps / 2, num_steps=5, loss=loss, norm=norm, restarts=2,
                            unroll=unroll)
  delta = (adversarial - images).reshape(len(images), -1)
  size = jnp.max(jnp.abs(delta), 1) if norm == "linf" else jnp.linalg.norm(delta, axis=1)
  assert float(jnp.max(size)) <= eps * (1 + 1e-5)
  assert float(jnp.min(adversarial)) >= 0.0 and float(jnp.max(adversarial)) <= 1.0
  assert float(jnp.mean(size)) > 0.5 * eps  # It did move.


def test_unrolled_and_rolled_loops_agree():
  logits_fn, _, _, images, labels = _linear_problem(n=32)
  run = lambda unroll: attacks.pgd(logits_fn, images, labels, jax.random.key(2), eps=0.05,
                                   step_size=0.01, num_steps=7, unroll=unroll)
  np.testing.assert_allclose(run(True), run(False), atol=1e-6)


def _small_mlp(seed=0):
  """A fixed random two-layer network on 6x6 images."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  w1 = jax.random.normal(k1, (DIM, 32)) / np.sqrt(DIM) * 4
  w2 = jax.random.normal(k2, (32, NUM_CLASSES)) / np.sqrt(32)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_robust_accuracy_never_increases_with_eps(loss):
  logits_fn = _small_mlp()
  images = jax.random.uniform(jax.random.key(3), (256, SIDE, SIDE, 1))
  labels = jnp.argmax(logits_fn(images), axis=1)
  accuracies = []
  for eps in [0.0, 0.01, 0.02, 0.04, 0.08, 0.16]:
    adversarial = attacks.pgd(logits_fn, images, labels, jax.random.key(4), eps=eps,
                              step_size=eps / 4, num_steps=20, loss=loss, restarts=2)
    accuracies.append(_accuracy(logits_fn, adversarial, labels))
  assert accuracies[0] == 1.0
  assert all(b <= a for a, b in zip(accuracies, accuracies[1:])), accuracies
  assert accuracies[-1] < 0.5


def test_fgsm_is_the_closed_form_on_a_linear_model():
  logits_fn, weights, bias, images, labels = _linear_problem(n=50)
  adversarial = attacks.fgsm(logits_fn, images, labels, jax.random.key(0), eps=0.05)
  grad = jax.grad(lambda x: jnp.sum(attacks.cross_entropy(logits_fn(x), labels)))(images)
  np.testing.assert_allclose(adversarial, jnp.clip(images + 0.05 * jnp.sign(grad), 0, 1),
                             atol=1e-6)


def test_restarts_keep_the_per_example_worst_case():
  logits_fn = _small_mlp(1)
  images = jax.random.uniform(jax.random.key(5), (128, SIDE, SIDE, 1))
  labels = jnp.argmax(logits_fn(images), axis=1)
  kwargs = dict(eps=0.03, step_size=0.01, num_steps=5, loss="ce")
  keys = jax.random.split(jax.random.key(6), 4)
  combined = attacks.pgd(logits_fn, images, labels, jax.random.key(6), restarts=4, **kwargs)
  singles = [attacks.pgd(logits_fn, images, labels, k, **kwargs) for k in keys]
  single_margins = jnp.stack([attacks.margin(logits_fn(s), labels) for s in singles])
  np.testing.assert_allclose(attacks.margin(logits_fn(combined), labels),
                             jnp.max(single_margins, axis=0), atol=1e-5)


def test_losses_on_hand_computed_cases():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(attacks.margin(logits, labels), [-1.0, 3.0])
  np.testing.assert_allclose(attacks.cross_entropy(logits, labels),
                             [np.log(1 + np.e**-1 + np.e**-2), np.log(2 + np.e**3)], rtol=1e-6)
  np.testing.assert_allclose(attacks.kl_divergence(logits, labels, logits), [0.0, 0.0], atol=1e-7)
  p, q = jax.nn.softmax(logits[0]), jax.nn.softmax(logits[1])
  np.testing.assert_allclose(attacks.kl_divergence(logits[1:], labels[:1], logits[:1]),
                             [jnp.sum(p * jnp.log(p / q))], rtol=1e-5)


@pytest.mark.parametrize("kwargs,needle", [(dict(norm="l1"), "norm='l1'"),
                                           (dict(loss="dlr"), "loss='dlr'"),
                                           (dict(eps=-1.0), "eps=-1.0")])
def test_bad_settings_fail_with_one_line(kwargs, needle):
  logits_fn, _, _, images, labels = _linear_problem(n=4)
  settings = {"eps": 0.1, "step_size": 0.1, "num_steps": 1, "norm": "linf", **kwargs}
  with pytest.raises(ValueError, match=needle):
    attacks.pgd(logits_fn, images, labels, jax.random.key(0), **settings)
