"""Attacks: constraints, monotonicity in eps, and exact robust accuracy on linear classifiers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax.robust import attacks

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


def _boundary_distances(weights, bias, images, labels, norm="linf"):
  """(N, classes): each point's distance to the boundary with class j, gap / ||w_y - w_j||_dual
  (the dual of L-inf is L1, of L2 itself); inf for j = y, <= 0 when misclassified."""
  x = np.asarray(images).reshape(len(images), -1)
  y = np.asarray(labels)
  logits = x @ weights + bias
  diff = weights[:, y].T[:, :, None] - weights[None]
  dual = np.linalg.norm(diff, ord=1 if norm == "linf" else 2, axis=1)
  gap = logits[np.arange(len(x)), y][:, None] - logits
  own = np.arange(NUM_CLASSES) == y[:, None]
  return np.where(own, np.inf, gap / np.where(own, 1.0, dual))


def _exact_robust_accuracy(weights, bias, images, labels, eps, norm="linf"):
  """A point is robust iff (w_y - w_j).x + b_y - b_j > eps ||w_y - w_j||_dual for every j != y."""
  return float(np.mean(_boundary_distances(weights, bias, images, labels, norm).min(1) > eps))


def _accuracy(logits_fn, images, labels):
  return float(jnp.mean(jnp.argmax(logits_fn(images), axis=1) == labels))


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1])
def test_margin_pgd_matches_exact_linear_robust_accuracy(eps):
  logits_fn, weights, bias, images, labels = _linear_problem()
  exact = _exact_robust_accuracy(weights, bias, images, labels, eps)
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
                                           (dict(loss="hinge"), "loss='hinge'"),
                                           (dict(eps=-1.0), "eps=-1.0")])
def test_bad_settings_fail_with_one_line(kwargs, needle):
  logits_fn, _, _, images, labels = _linear_problem(n=4)
  settings = {"eps": 0.1, "step_size": 0.1, "num_steps": 1, "norm": "linf", **kwargs}
  with pytest.raises(ValueError, match=needle):
    attacks.pgd(logits_fn, images, labels, jax.random.key(0), **settings)


# ---------------------------------------------------------------------------------------------
# AutoAttack: APGD, APGD-T, Square.
# ---------------------------------------------------------------------------------------------


def test_dlr_losses_on_hand_computed_cases():
  logits = jnp.array([[4.0, 3.0, 1.0, 0.0], [0.0, 2.0, 6.0, 1.0]])
  labels = jnp.array([0, 1])
  # (max other - true) / (top1 - top3): (3 - 4) / (4 - 1); (6 - 2) / (6 - 1).
  np.testing.assert_allclose(attacks.dlr(logits, labels), [-1 / 3, 4 / 5], rtol=1e-6)
  # (target - true) / (top1 - (top3 + top4) / 2): (1 - 4) / (4 - 0.5); (0 - 2) / (6 - 0.5).
  np.testing.assert_allclose(attacks.targeted_dlr(logits, labels, jnp.array([2, 0])),
                             [-3 / 3.5, -2 / 5.5], rtol=1e-6)


def test_apgd_checkpoints_follow_autoattack_schedule():
  windows = attacks.apgd_checkpoints(100)
  # Windows of 22, then 3 shorter each time, down to 6 steps.
  assert list(np.nonzero(windows)[0]) == [21, 40, 56, 69, 79, 86, 92, 98]
  assert list(windows[windows > 0]) == [22, 19, 16, 13, 10, 7, 6, 6]
  assert list(np.nonzero(attacks.apgd_checkpoints(10))[0]) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_square_schedule_is_autoattack_standard_at_5000_queries_and_rescaled_otherwise():
  # The standard version (resc_schedule=False): p_selection of the query number itself.
  queries = (0, 10, 11, 51, 201, 501, 1001, 2001, 4000, 4001, 4999)
  assert [attacks.square_fraction(q, 5000) for q in queries] == [
      0.8, 0.8, 0.4, 0.2, 0.1, 0.05, 0.025, 0.0125, 0.0125, 0.00625, 0.00625]
  sizes = attacks.square_sizes(5000, 32, 32)
  assert sizes[0] == 29 and sizes[4001] == sizes[-1] == 3  # round(sqrt(0.00625 * 1024)) = 3.
  assert not attacks.square_rescaled(5000)
  # Any other budget rescales (resc_schedule=True): query 2 of 1,000 is iteration 20 of 10,000.
  assert attacks.square_rescaled(1000) and attacks.square_fraction(2, 1000) == 0.4
  assert [attacks.square_fraction(q, 10000) for q in (0, 10, 11, 51, 201, 501, 8001)] == [
      0.8, 0.8, 0.4, 0.2, 0.1, 0.05, 0.8 / 512]
  sizes = attacks.square_sizes(1000, 32, 32)
  assert sizes[0] == 29 and sizes[2] == 20 and sizes[-1] == 1  # round(sqrt(p * 1024)).
  assert np.all(np.diff(sizes) <= 0)
  # L2 windows are odd and at least 3 pixels wide, as the reference's.
  l2 = attacks.square_sizes(1000, 32, 32, norm="l2")
  assert l2[0] == 29 and l2[2] == 21 and l2[-1] == 3 and np.all(l2 % 2 == 1)


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1])
def test_apgd_targeted_matches_exact_linear_robust_accuracy(eps):
  logits_fn, weights, bias, images, labels = _linear_problem()
  exact = _exact_robust_accuracy(weights, bias, images, labels, eps)
  adversarial = jax.jit(functools.partial(attacks.apgd_targeted, logits_fn, eps=eps,
                                          num_steps=30))(images, labels, jax.random.key(0))
  assert abs(_accuracy(logits_fn, adversarial, labels) - exact) <= 0.005


def test_apgd_dlr_matches_exact_and_ce_is_weaker_on_a_linear_model():
  logits_fn, weights, bias, images, labels = _linear_problem()
  exact = _exact_robust_accuracy(weights, bias, images, labels, 0.1)
  run = lambda loss: _accuracy(logits_fn, jax.jit(functools.partial(
      attacks.apgd, logits_fn, eps=0.1, num_steps=30, loss=loss))(
          images, labels, jax.random.key(0)), labels)
  assert abs(run("dlr") - exact) <= 0.005
  # CE follows the largest logit gap's gradient, not the closest boundary: an upper bound only.
  assert exact < run("ce") < exact + 0.2


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_stays_in_the_ball_and_box_and_loops_agree(norm):
  logits_fn = _small_mlp(2)
  images = jax.random.uniform(jax.random.key(7), (32, SIDE, SIDE, 1))
  images = images.at[:4].set(0.0).at[4:8].set(1.0)
  labels = jnp.argmax(logits_fn(images), axis=1)
  eps = 0.05 if norm == "linf" else 0.5
  run = lambda unroll: jax.jit(functools.partial(
      attacks.apgd, logits_fn, eps=eps, num_steps=12, norm=norm, restarts=2, unroll=unroll))(
          images, labels, jax.random.key(8))
  adversarial = run(False)
  delta = (adversarial - images).reshape(len(images), -1)
  size = jnp.max(jnp.abs(delta), 1) if norm == "linf" else jnp.linalg.norm(delta, axis=1)
  assert float(jnp.max(size)) <= eps * (1 + 1e-5)
  assert float(jnp.min(adversarial)) >= 0.0 and float(jnp.max(adversarial)) <= 1.0
  assert _accuracy(logits_fn, adversarial, labels) < 1.0
  # Same algorithm; float reassociation differs between the loops and sign steps amplify it.
  other = run(True)
  assert np.mean(np.abs(np.asarray(adversarial - other)) < 1e-5) > 0.9
  assert abs(_accuracy(logits_fn, other, labels) - _accuracy(logits_fn, adversarial, labels)) <= (
      1 / 32)


def test_apgd_beats_pgd_with_the_same_budget_and_never_helps_misclassified_points():
  logits_fn = _small_mlp(3)
  images = jax.random.uniform(jax.random.key(9), (256, SIDE, SIDE, 1))
  labels = jnp.argmax(logits_fn(images), axis=1).at[:16].add(1) % NUM_CLASSES
  kwargs = dict(eps=0.02, num_steps=20)
  apgd = jax.jit(functools.partial(attacks.apgd, logits_fn, **kwargs))(
      images, labels, jax.random.key(0))
  pgd = jax.jit(functools.partial(attacks.pgd, logits_fn, step_size=0.005, **kwargs))(
      images, labels, jax.random.key(0))
  assert _accuracy(logits_fn, apgd, labels) <= _accuracy(logits_fn, pgd, labels)
  assert not np.any(np.argmax(logits_fn(apgd[:16]), 1) == labels[:16])


def test_square_is_score_based_and_finds_adversarials():
  logits_fn = _small_mlp(4)
  images = jax.random.uniform(jax.random.key(10), (128, SIDE, SIDE, 1))
  labels = jnp.argmax(logits_fn(images), axis=1)
  adversarial = jax.jit(functools.partial(attacks.square, logits_fn, eps=0.05,
                                          num_queries=200, restarts=2))(
      images, labels, jax.random.key(0))
  assert float(jnp.max(jnp.abs(adversarial - images))) <= 0.05 + 1e-6
  white_box = jax.jit(functools.partial(attacks.apgd, logits_fn, eps=0.05, num_steps=50))(
      images, labels, jax.random.key(0))
  square_accuracy = _accuracy(logits_fn, adversarial, labels)
  assert square_accuracy < 0.7
  assert _accuracy(logits_fn, white_box, labels) <= square_accuracy + 0.05
  # L-inf Square only moves pixels to the corners of the ball (or the box).
  delta = np.abs(np.asarray(adversarial - images))
  at_corner = np.isclose(delta, 0.05, atol=1e-6) | np.isclose(np.asarray(adversarial), 0) | (
      np.isclose(np.asarray(adversarial), 1))
  assert at_corner.mean() > 0.99


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "square"])
def test_named_autoattack_attacks(name):
  logits_fn, _, _, images, labels = _linear_problem(n=64)
  adversarial = jax.jit(functools.partial(attacks.attack, name, logits_fn, eps=0.05,
                                          num_steps=10, num_targets=2))(
      images, labels, jax.random.key(0))
  assert _accuracy(logits_fn, adversarial, labels) < _accuracy(logits_fn, images, labels)


def test_apgd_needs_enough_classes_for_dlr():
  logits_fn = lambda x: x.reshape(x.shape[0], -1)[:, :3]
  images, labels = jnp.zeros((2, 2, 2, 1)), jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match="3 classes: the targeted DLR loss needs at least 4"):
    attacks.apgd_targeted(logits_fn, images, labels, jax.random.key(0), eps=0.1)
  with pytest.raises(ValueError, match="images of 2x2: L2 Square needs at least 5x5"):
    attacks.square(logits_fn, images, labels, jax.random.key(0), eps=0.1, norm="l2")


def test_l2_square_keeps_every_point_on_the_sphere_and_finds_adversarials():
  logits_fn = _small_mlp(4)
  # Pixels at least eps from the box's faces: no coordinate of an L2 step of eps is clipped.
  images = jax.random.uniform(jax.random.key(10), (128, SIDE, SIDE, 1), minval=0.3, maxval=0.7)
  labels = jnp.argmax(logits_fn(images), axis=1)
  eps = 0.3
  adversarial = jax.jit(functools.partial(attacks.square, logits_fn, eps=eps, norm="l2",
                                          num_queries=300))(images, labels, jax.random.key(0))
  norms = np.linalg.norm(np.asarray(adversarial - images).reshape(128, -1), axis=1)
  moved = norms > 0
  assert np.all(norms <= eps + 1e-5) and np.all((adversarial >= 0) & (adversarial <= 1))
  # Every perturbation has norm eps exactly (the reference's rescaling).
  np.testing.assert_allclose(norms[moved], eps, rtol=1e-4)
  white_box = jax.jit(functools.partial(attacks.apgd, logits_fn, eps=eps, norm="l2",
                                        num_steps=50))(images, labels, jax.random.key(0))
  square_accuracy = _accuracy(logits_fn, adversarial, labels)
  assert square_accuracy < 0.7
  assert _accuracy(logits_fn, white_box, labels) <= square_accuracy + 0.05


# ---------------------------------------------------------------------------------------------
# FAB-T: its projection, and exact minimal distances on linear classifiers.
# ---------------------------------------------------------------------------------------------


def _least_norm_step(point, w, c, norm):
  """min ||d|| s.t. w.d = c, 0 <= point + d <= 1, by scipy (an LP for L-inf, a QP for L2)."""
  from scipy import optimize
  bounds = list(zip(-point, 1 - point))
  if norm == "linf":  # Variables (d, t): min t with -t <= d_i <= t.
    d = len(point)
    rows = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
    result = optimize.linprog(np.r_[np.zeros(d), 1.0], A_ub=rows, b_ub=np.zeros(2 * d),
                              A_eq=np.r_[w, 0.0][None], b_eq=[c], bounds=bounds + [(0, None)])
    return result.x[:-1]
  result = optimize.minimize(lambda x: x @ x, np.zeros(len(point)), jac=lambda x: 2 * x,
                             constraints=[{"type": "eq", "fun": lambda x: w @ x - c}],
                             bounds=bounds, method="SLSQP", options={"ftol": 1e-14})
  return result.x


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_boundary_step_is_the_least_norm_step_inside_the_box(norm):
  rng = np.random.default_rng(0)
  size = lambda d: np.max(np.abs(d)) if norm == "linf" else np.linalg.norm(d)
  feasible = 0
  for _ in range(40):
    point, w = rng.uniform(size=7), rng.normal(size=7) * (rng.uniform(size=7) > 0.2)
    c = float(rng.normal() * rng.choice([0.1, 1.0, 3.0]))
    step = np.asarray(attacks.boundary_step(jnp.asarray(point[None], jnp.float32),
                                            jnp.asarray(w[None], jnp.float32),
                                            jnp.asarray([c], jnp.float32), norm))[0]
    reachable = np.sum(np.abs(w) * np.where(w * np.sign(c) > 0, 1 - point, point))
    if reachable >= abs(c):
      feasible += 1
      assert w @ step == pytest.approx(c, abs=1e-5)
      assert np.all(point + step >= -1e-6) and np.all(point + step <= 1 + 1e-6)
      assert size(step) == pytest.approx(size(_least_norm_step(point, w, c, norm)), abs=1e-5)
    else:  # The box cannot reach the plane: the box-free projection, c w / ||w||_dual...
      dual = np.sum(np.abs(w)) if norm == "linf" else np.linalg.norm(w)
      assert w @ step == pytest.approx(c, abs=1e-5)
      assert size(step) == pytest.approx(abs(c) / dual, rel=1e-5)
  assert 10 < feasible < 40


@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("linf", 0.05), ("l2", 0.1), ("l2", 0.3)])
def test_fab_targeted_matches_exact_linear_robust_accuracy(norm, eps):
  logits_fn, weights, bias, images, labels = _linear_problem()
  exact = _exact_robust_accuracy(weights, bias, images, labels, eps, norm)
  assert 0.1 < exact < 0.75
  adversarial = jax.jit(functools.partial(attacks.fab_targeted, logits_fn, eps=eps,
                                          norm=norm))(images, labels, jax.random.key(0))
  delta = np.asarray(adversarial - images).reshape(len(images), -1)
  sizes = np.max(np.abs(delta), 1) if norm == "linf" else np.linalg.norm(delta, axis=1)
  assert np.all(sizes <= eps + 1e-6)
  # FAB's points are real adversarials, so it never reports less than the exact accuracy; and
  # it finds every distance to within 1% (below), so it breaks every point closer than eps/1.01.
  ours = _accuracy(logits_fn, adversarial, labels)
  within = _exact_robust_accuracy(weights, bias, images, labels, eps / 1.01, norm)
  assert exact - 1e-6 <= ours <= within + 1e-6 and within - exact <= 0.01


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_distance_to_each_target_on_a_linear_model(norm):
  logits_fn, weights, bias, images, labels = _linear_problem()
  correct = np.asarray(jnp.argmax(logits_fn(images), 1) == labels)
  images, labels = images[correct], labels[correct]
  targets = attacks._ranked_classes(logits_fn(images), 2)
  stages = attacks.fab_stages(eps=1.0, num_steps=100, norm=norm, restarts=1, num_targets=1)

  def smallest_norms(x, y):  # Of the one run: the target of rank 2, from the image.
    state = stages.start(logits_fn, x, y, jax.random.key(0))
    state = jax.lax.fori_loop(0, 100, lambda i, s: stages.step(logits_fn, x, y, i, s), state)
    return state[1][2][0]

  found = jax.jit(smallest_norms)(images, labels)
  exact = np.take_along_axis(_boundary_distances(weights, bias, images, labels, norm),
                             np.asarray(targets)[:, None], 1)[:, 0]
  ratio = np.asarray(found) / exact
  assert np.all(ratio >= 1 - 1e-4) and np.all(ratio <= 1.01)


# ---------------------------------------------------------------------------------------------
# The registry, the threat model and the task-attack parser.
# ---------------------------------------------------------------------------------------------


def test_registry_lists_every_attack_the_dispatcher_runs():
  images, labels = jnp.full((2, 4, 4, 1), 0.5), jnp.array([0, 1])
  logits_fn = lambda x: x.reshape(len(x), -1)[:, :5] * jnp.array([1.0, -1.0, 2.0, 0.5, -2.0])
  for name in attacks.ATTACKS:
    out = attacks.run(attacks.ThreatModel(name, eps=0.1, num_steps=2, num_targets=2), logits_fn,
                      images, labels, jax.random.key(0), unroll=False)
    assert out.shape == images.shape
  assert attacks.TASK_ATTACKS == ("clean", "fgsm", "pgd", "cw", "apgd-ce")
  assert attacks.WHITE_BOX == ("fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")
  assert attacks.AUTOATTACK == ("apgd-ce", "apgd-t", "fab-t", "square")
  assert attacks.AA_LITE == tuple(a for a in attacks.AUTOATTACK if a != "fab-t")
  assert attacks.EVALUATION_ATTACKS[-2:] == ("autoattack", "aa-lite")
  assert set(attacks.VERSIONS) == set(attacks.ATTACKS)
  with pytest.raises(ValueError, match="not one of clean, fgsm"):
    attacks.ThreatModel("fab", eps=0.1)


def test_threat_model_defaults_to_madrys_step_and_keeps_a_given_one():
  assert attacks.ThreatModel("pgd", eps=0.1, num_steps=5).step_size == pytest.approx(0.05)
  assert attacks.ThreatModel("pgd", eps=0.1, num_steps=5, step_size=0.01).step_size == 0.01
  assert attacks.ThreatModel("pgd", eps=8 / 255, num_steps=10).key() == "pgd10-linf-0.03137"
  assert attacks.ThreatModel("fgsm", eps=0.1).key() == "fgsm-linf-0.1"
  assert attacks.ThreatModel("cw", eps=8 / 255, num_steps=40, step_size=0.8 / 255).describe() == (
      "CW-40 (CW margin, L-inf eps=0.03137 (8/255), step=0.003137 (0.8/255), random start, "
      "1 restart)")
  assert attacks.ThreatModel("fab-t", eps=8 / 255, num_steps=100).describe() == (
      "FAB-T-100 (9 targets, L-inf eps=0.03137 (8/255), alpha_max=0.1, eta=1.05, beta=0.9, "
      "1 restart)")
  assert attacks.ThreatModel("square", eps=0.5, num_steps=5000, norm="l2").describe() == (
      "Square (5000 queries, standard p schedule, margin, p_init=0.8, L2 eps=0.5, 1 restart)")
  assert "p schedule rescaled to the budget" in attacks.ThreatModel(
      "square", eps=0.5, num_steps=300).describe()
  assert attacks.ThreatModel("square").version == 3
  with pytest.raises(TypeError):
    attacks.ThreatModel("pgd", 0.1, 5)  # Positional settings are ambiguous: keywords only.


@pytest.mark.parametrize("name,expected", [
    ("pgd-7", attacks.ThreatModel("pgd", eps=0.1, num_steps=7)),
    ("cw-20", attacks.ThreatModel("cw", eps=0.1, num_steps=20)),
    ("apgd-20", attacks.ThreatModel("apgd-ce", eps=0.1, num_steps=20)),
    ("fgsm", attacks.ThreatModel("fgsm", eps=0.1, num_steps=1)),
    ("clean", attacks.ThreatModel("clean", eps=0.1, num_steps=1)),
])
def test_parse_task_attack(name, expected):
  assert attacks.parse_task_attack(name, 0.1) == expected


@pytest.mark.parametrize("name", ["pgd", "pgd-0", "pgd-x", "fgsm-3", "apgd-ce-10", "square", "",
                                  None, 3])
def test_parse_task_attack_names_the_allowed_forms(name):
  with pytest.raises(ValueError, match=r"expected clean, fgsm, pgd-<steps>, cw-<steps> or "
                                       r"apgd-<steps>"):
    attacks.parse_task_attack(name, 0.1)
