"""Policy: densities against numerical CDFs and closed forms, sampling statistics, gradient flow,
the network's per-stage and bidirectional structure, and the RL losses on hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from rcnas_jax.rl import policy

NUM_STAGES, NUM_TASK_FEATURES, HIDDEN = 3, 6, 8


def _observation(seed: int, num_task_features: int = NUM_TASK_FEATURES) -> policy.Observation:
  rng = np.random.default_rng(seed)
  return policy.Observation(
      stages=jnp.asarray(rng.uniform(0, 1, (NUM_STAGES, 4)), jnp.float32),
      task=jnp.asarray(rng.normal(size=num_task_features), jnp.float32))


@pytest.fixture(scope="module")
def network_and_params():
  network = policy.PolicyNetwork(hidden=HIDDEN, num_stages=NUM_STAGES)
  return network, policy.init(network, jax.random.key(0), _observation(0))


def _output(**fields) -> policy.PolicyOutput:
  """A hand-made PolicyOutput: float32 arrays, value 0 unless given."""
  fields.setdefault("value", 0.0)
  return policy.PolicyOutput(**{k: jnp.asarray(v, jnp.float32) for k, v in fields.items()})


TWO_STAGES = dict(depth_mean=[0.4, -1.0], depth_log_std=[math.log(0.5), math.log(1.3)],
                  width_mean=[-0.2, 0.9], width_log_std=[math.log(0.8), math.log(0.3)],
                  downsample_logit=[1.5, -0.4], robust_logit=[-2.0, 0.25])


# ---------------------------------------------------------------------------------------------
# Distributions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean,std", [(0.0, 0.5), (-1.0, 0.3), (1.2, 1.5)])
def test_squashed_gaussian_density_is_the_derivative_of_the_ratio_cdf(mean, std):
  # P(sigmoid(U) <= r) = Phi((logit(r) - mean) / std); its derivative in r is the density.
  ratios = np.array([0.05, 0.2, 0.45, 0.5, 0.7, 0.95])
  # In the upper tail, the CDF minus 1 (same derivative) keeps the float64 digits.
  upper = (special.logit(ratios) - mean) / std > 0
  z = lambda r: (special.logit(r) - mean) / std
  cdf = lambda r: np.where(upper, -special.ndtr(-z(r)), special.ndtr(z(r)))
  step = 1e-6
  numerical_density = (cdf(ratios + step) - cdf(ratios - step)) / (2 * step)
  log_density = policy.squashed_gaussian_log_prob(
      jnp.asarray(special.logit(ratios), jnp.float32), jnp.float32(mean),
      jnp.float32(math.log(std)))
  np.testing.assert_allclose(np.exp(np.asarray(log_density, np.float64)), numerical_density,
                             rtol=1e-3)


def test_sampled_ratios_follow_the_density():
  # Histogram of sampled depth ratios against the density integrated over each bin.
  output = _output(depth_mean=[0.6], depth_log_std=[math.log(0.9)], width_mean=[0.0],
                   width_log_std=[0.0], downsample_logit=[0.0], robust_logit=[0.0])
  num_samples = 100_000
  keys = jax.random.split(jax.random.key(1), num_samples)
  actions = jax.jit(jax.vmap(policy.sample, in_axes=(None, 0)))(output, keys)
  ratios = np.asarray(policy.depth_ratio(actions))[:, 0]
  edges = np.linspace(0.0, 1.0, 11)
  empirical = np.histogram(ratios, edges)[0] / num_samples
  grid = np.linspace(1e-4, 1 - 1e-4, 20_001)
  density = np.exp(np.asarray(policy.squashed_gaussian_log_prob(
      jnp.asarray(special.logit(grid), jnp.float32), output.depth_mean[0],
      output.depth_log_std[0])))
  expected = [np.trapezoid(density[(grid >= lo) & (grid <= hi)], grid[(grid >= lo) & (grid <= hi)])
              for lo, hi in zip(edges[:-1], edges[1:])]
  np.testing.assert_allclose(empirical, expected, atol=5e-3)


def test_bernoulli_log_prob_and_entropy_equal_closed_forms():
  logits = np.array([-2.0, 0.0, 0.7, 3.0])
  outcomes = np.array([0, 1, 1, 0])
  p = 1 / (1 + np.exp(-logits))
  expected_log_prob = np.where(outcomes == 1, np.log(p), np.log(1 - p))
  expected_entropy = -p * np.log(p) - (1 - p) * np.log(1 - p)
  np.testing.assert_allclose(
      policy.bernoulli_log_prob(jnp.asarray(logits, jnp.float32), jnp.asarray(outcomes)),
      expected_log_prob, rtol=1e-6)
  np.testing.assert_allclose(policy.bernoulli_entropy(jnp.asarray(logits, jnp.float32)),
                             expected_entropy, rtol=1e-6)
  assert math.isclose(float(policy.bernoulli_entropy(jnp.float32(0.0))), math.log(2), rel_tol=1e-6)


def test_bernoulli_is_finite_at_extreme_logits():
  logits = jnp.asarray([-80.0, 80.0], jnp.float32)
  np.testing.assert_allclose(policy.bernoulli_log_prob(logits, jnp.asarray([1, 0])), [-80, -80],
                             rtol=1e-6)
  np.testing.assert_allclose(policy.bernoulli_entropy(logits), [0, 0], atol=1e-6)


def test_gaussian_entropy_is_half_log_two_pi_e_sigma_squared():
  stds = np.array([0.1, 0.5, 1.0, 2.7])
  expected = [stats.norm(scale=s).entropy() for s in stds]
  np.testing.assert_allclose(policy.gaussian_entropy(jnp.asarray(np.log(stds), jnp.float32)),
                             expected, rtol=1e-6)
  np.testing.assert_allclose(expected, 0.5 * np.log(2 * np.pi * np.e * stds**2), rtol=1e-12)


def test_log_prob_and_entropy_sum_every_stage_and_head():
  output = _output(**TWO_STAGES)
  action = policy.Action(depth_logit=jnp.asarray([0.1, -2.0]), width_logit=jnp.asarray([1.3, 0.5]),
                         downsample=jnp.asarray([1, 0], jnp.int32),
                         robust=jnp.asarray([0, 1], jnp.int32))
  expected_log_prob, expected_entropy = 0.0, 0.0
  for i in range(2):
    for head in ("depth", "width"):
      u = float(getattr(action, f"{head}_logit")[i])
      mean, std = TWO_STAGES[f"{head}_mean"][i], math.exp(TWO_STAGES[f"{head}_log_std"][i])
      expected_log_prob += (stats.norm.logpdf(u, mean, std)
                            - math.log(special.expit(u) * (1 - special.expit(u))))
      expected_entropy += stats.norm(scale=std).entropy()
    for head in ("downsample", "robust"):
      p = special.expit(TWO_STAGES[f"{head}_logit"][i])
      expected_log_prob += math.log(p if int(getattr(action, head)[i]) == 1 else 1 - p)
      expected_entropy += -p * math.log(p) - (1 - p) * math.log(1 - p)
  assert math.isclose(float(policy.log_prob(output, action)), expected_log_prob, rel_tol=1e-5)
  assert math.isclose(float(policy.entropy(output)), expected_entropy, rel_tol=1e-5)


def test_ratios_are_sigmoids_of_the_logits():
  action = policy.Action(depth_logit=jnp.asarray([0.0, 2.0]), width_logit=jnp.asarray([-1.0, 0.0]),
                         downsample=jnp.zeros(2, jnp.int32), robust=jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(policy.depth_ratio(action), [0.5, special.expit(2.0)], rtol=1e-6)
  np.testing.assert_allclose(policy.width_ratio(action), [special.expit(-1.0), 0.5], rtol=1e-6)


def test_sample_statistics_match_the_distribution():
  output = _output(**TWO_STAGES)
  num_samples = 20_000
  keys = jax.random.split(jax.random.key(2), num_samples)
  actions = jax.jit(jax.vmap(policy.sample, in_axes=(None, 0)))(output, keys)
  for head in ("downsample", "robust"):
    outcomes = np.asarray(getattr(actions, head))
    assert outcomes.dtype == np.int32 and set(np.unique(outcomes)) <= {0, 1}
    # Four standard errors of a Bernoulli mean: 4 * sqrt(0.25 / n) < 0.015.
    np.testing.assert_allclose(outcomes.mean(0), special.expit(TWO_STAGES[f"{head}_logit"]),
                               atol=0.015)
  for head in ("depth", "width"):
    logits = np.asarray(getattr(actions, f"{head}_logit"))
    stds = np.exp(TWO_STAGES[f"{head}_log_std"])
    np.testing.assert_allclose(logits.mean(0), TWO_STAGES[f"{head}_mean"],
                               atol=4 * stds.max() / math.sqrt(num_samples))
    np.testing.assert_allclose(logits.std(0), stds, rtol=0.03)


def test_sample_carries_no_gradient():
  grads = jax.grad(lambda o: jnp.sum(policy.sample(o, jax.random.key(0)).depth_logit))(
      _output(**TWO_STAGES))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------------
# Network.
# ---------------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter(network_and_params):
  network, params = network_and_params
  observation = _observation(3)

  def objective(params):
    output = policy.apply(network, params, observation)
    return policy.log_prob(output, policy.sample(output, jax.random.key(4))) + output.value

  grads = jax.grad(objective)(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.linalg.norm(leaf)) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
  expected = {"stage_encoder", "lstm_forward", "lstm_backward", "value_hidden", "value_head"}
  expected |= {f"stage{i}_{part}" for i in range(NUM_STAGES) for part in ("mlp", "head")}
  assert set(params) == expected
  for i in range(NUM_STAGES):
    assert set(params[f"stage{i}_head"]) == {"depth_mean", "depth_log_std", "width_mean",
                                            "width_log_std", "downsample_logit", "robust_logit"}


def test_each_stage_has_its_own_mlp_and_head(network_and_params):
  network, params = network_and_params
  observation = _observation(5)
  base = policy.apply(network, params, observation)
  for part in ("mlp", "head"):
    changed = jax.tree.map(lambda x: x, params)
    changed[f"stage1_{part}"] = jax.tree.map(lambda x: x + 0.5, params[f"stage1_{part}"])
    output = policy.apply(network, changed, observation)
    for field in ("depth_mean", "width_log_std", "robust_logit"):
      before, after = np.asarray(getattr(base, field)), np.asarray(getattr(output, field))
      np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
      assert abs(after[1] - before[1]) > 1e-4, (part, field)


def test_lstm_is_bidirectional(network_and_params):
  network, params = network_and_params
  observation = _observation(6)

  def stage_states(stages):
    _, captured = network.apply({"params": params}, observation._replace(stages=stages),
                                capture_intermediates=True)
    return [captured["intermediates"][f"stage{i}_mlp"]["__call__"][0] for i in range(NUM_STAGES)]

  base = stage_states(observation.stages)
  # Only the backward LSTM carries the last stage to the first, only the forward one the reverse.
  for changed_stage, watched_stage in ((NUM_STAGES - 1, 0), (0, NUM_STAGES - 1)):
    changed = stage_states(observation.stages.at[changed_stage].add(1.0))
    difference = float(jnp.abs(changed[watched_stage] - base[watched_stage]).max())
    assert difference > 1e-3, (changed_stage, watched_stage, difference)


def test_initial_policy_keeps_half_with_moderate_spread(network_and_params):
  network, params = network_and_params
  for seed in range(3):
    output = policy.apply(network, params, _observation(seed))
    for field in ("depth_mean", "width_mean", "downsample_logit", "robust_logit"):
      assert float(jnp.abs(getattr(output, field)).max()) < 0.05, field
    for field in ("depth_log_std", "width_log_std"):
      np.testing.assert_allclose(getattr(output, field), math.log(0.5), atol=0.05)


@pytest.mark.parametrize("bias,bound", [(30.0, policy.LOG_STD_MAX), (-30.0, policy.LOG_STD_MIN)])
def test_log_std_is_bounded_smoothly(network_and_params, bias, bound):
  network, params = network_and_params

  def log_std(b):
    changed = jax.tree.map(lambda x: x, params)
    changed["stage0_head"]["depth_log_std"]["bias"] = jnp.full((1,), b)
    return policy.apply(network, changed, _observation(7)).depth_log_std[0]

  np.testing.assert_allclose(float(log_std(bias)), bound, atol=1e-5)
  # Inside the range it is the scaled sigmoid of the head's output, whose slope never vanishes
  # exactly (a clip's is 0 past the bound, and the policy could never come back).
  np.testing.assert_allclose(float(policy.bounded_log_std(jnp.float32(0.0))),
                             (policy.LOG_STD_MIN + policy.LOG_STD_MAX) / 2, rtol=1e-6)
  slope = float(jax.grad(lambda b: log_std(b))(jnp.float32(bias / 3)))
  expected = (policy.LOG_STD_MAX - policy.LOG_STD_MIN) * float(
      special.expit(bias / 3) * special.expit(-bias / 3))
  np.testing.assert_allclose(slope, expected, rtol=0.05)
  assert slope > 0


@pytest.mark.parametrize("wanted,limit,kept", [
    ([1, 1, 1], 2, [1, 1, 0]), ([1, 0, 1], 1, [1, 0, 0]), ([0, 1, 1], 1, [0, 1, 0]),
    ([1, 1, 1], 0, [0, 0, 0]), ([1, 0, 1], 5, [1, 0, 1])])
def test_mask_downsample_keeps_the_first_buildable_choices(wanted, limit, kept):
  np.testing.assert_array_equal(policy.mask_downsample(jnp.array(wanted), limit), kept)


@pytest.mark.parametrize("limit", [0, 1, 2, 3])
def test_masked_downsample_probabilities_sum_to_one_and_match_sampling(limit):
  """log_prob of the masked choices is a distribution over the buildable ones, and the one
  `sample` draws from."""
  output = _output(depth_mean=[0.0] * 3, depth_log_std=[0.0] * 3, width_mean=[0.0] * 3,
                   width_log_std=[0.0] * 3, downsample_logit=[0.8, -0.3, 1.2],
                   robust_logit=[0.0] * 3)
  zeros = jnp.zeros(3)
  probability = {}
  for bits in np.ndindex(2, 2, 2):
    choice = jnp.array(bits, jnp.int32)
    if (policy.mask_downsample(choice, limit) != choice).any():
      continue  # Never sampled: not buildable.
    action = policy.Action(zeros, zeros, choice, jnp.zeros(3, jnp.int32))
    ratio_terms = policy.log_prob(output, action._replace(downsample=jnp.zeros(3, jnp.int32)),
                                  3)  # Everything but the downsample choices.
    unmasked_zero = float(jnp.sum(policy.bernoulli_log_prob(output.downsample_logit,
                                                            jnp.zeros(3))))
    probability[bits] = math.exp(float(policy.log_prob(output, action, limit)) - float(
        ratio_terms) + unmasked_zero)
  np.testing.assert_allclose(sum(probability.values()), 1.0, rtol=1e-5)
  draws = jax.vmap(policy.sample, in_axes=(None, 0, None))(
      output, jax.random.split(jax.random.key(limit), 20_000), limit).downsample
  assert int((draws.sum(-1) > limit).sum()) == 0
  for bits, p in probability.items():
    frequency = float(jnp.all(draws == jnp.array(bits), -1).mean())
    assert abs(frequency - p) < 4 * math.sqrt(p * (1 - p) / 20_000) + 1e-3, (bits, frequency, p)


@pytest.mark.parametrize("num_task_features", [1, 9])
def test_any_number_of_task_features(num_task_features):
  network = policy.PolicyNetwork(hidden=4, num_stages=NUM_STAGES)
  observation = _observation(8, num_task_features)
  output = policy.apply(network, policy.init(network, jax.random.key(0), observation), observation)
  assert output.depth_mean.shape == (NUM_STAGES,) and output.value.shape == ()


def test_wrong_number_of_stages_is_a_clear_error(network_and_params):
  network, params = network_and_params
  observation = _observation(9)
  wrong = observation._replace(stages=jnp.concatenate([observation.stages, observation.stages]))
  with pytest.raises(ValueError, match=r"expected stages \(3, 4\)"):
    policy.apply(network, params, wrong)


def test_vmap_matches_single_calls(network_and_params):
  network, params = network_and_params
  observations = [_observation(seed) for seed in range(10, 14)]
  batch = jax.tree.map(lambda *xs: jnp.stack(xs), *observations)
  outputs = jax.jit(jax.vmap(lambda o: policy.apply(network, params, o)))(batch)
  keys = jax.random.split(jax.random.key(5), len(observations))
  actions = jax.vmap(policy.sample)(outputs, keys)
  log_probs = jax.vmap(policy.log_prob)(outputs, actions)
  entropies = jax.vmap(policy.entropy)(outputs)
  for i, observation in enumerate(observations):
    single = policy.apply(network, params, observation)
    for got, want in zip(jax.tree.map(lambda x: x[i], outputs), single):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    action = jax.tree.map(lambda x: x[i], actions)
    np.testing.assert_allclose(log_probs[i], policy.log_prob(single, action), rtol=1e-5)
    np.testing.assert_allclose(entropies[i], policy.entropy(single), rtol=1e-5)
  # Many actions scored under one output (the M students of an update on one task).
  first_output = jax.tree.map(lambda x: x[0], outputs)
  many = jax.vmap(policy.log_prob, in_axes=(None, 0))(first_output, actions)
  np.testing.assert_allclose(
      many, [policy.log_prob(first_output, jax.tree.map(lambda x: x[i], actions))
             for i in range(len(observations))], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------


def _f32(values):
  return jnp.asarray(values, jnp.float32)


def test_policy_gradient_loss_by_hand():
  log_probs, advantages = _f32([-1.0, -2.0]), _f32([1.0, 3.0])
  assert math.isclose(float(policy.policy_gradient_loss(log_probs, advantages)), 3.5)
  grad_log_probs, grad_advantages = jax.grad(policy.policy_gradient_loss, argnums=(0, 1))(
      log_probs, advantages)
  np.testing.assert_allclose(grad_log_probs, [-0.5, -1.5])
  np.testing.assert_array_equal(grad_advantages, [0.0, 0.0])


def test_ppo_clip_loss_by_hand():
  # Ratios 1.5, 1.1, 0.5, 1.5 with advantages 2, 2, -1, -1 and epsilon 0.2:
  # min(3.0, 2.4) = 2.4 (clipped), 2.2 (inside), min(-0.5, -0.8) = -0.8 (clipped),
  # min(-1.5, -1.2) = -1.5 (the unclipped, pessimistic side).
  ratios = np.array([1.5, 1.1, 0.5, 1.5])
  old_log_probs = _f32([-1.0, -0.5, -2.0, -0.3])
  log_probs = old_log_probs + _f32(np.log(ratios))
  advantages = _f32([2.0, 2.0, -1.0, -1.0])
  loss = policy.ppo_clip_loss(log_probs, old_log_probs, advantages, clip_epsilon=0.2)
  assert math.isclose(float(loss), -(2.4 + 2.2 - 0.8 - 1.5) / 4, rel_tol=1e-6)
  grads = jax.grad(policy.ppo_clip_loss, argnums=(0, 1, 2))(log_probs, old_log_probs, advantages)
  # d(-rho A / 4) / d log_prob = -rho A / 4 where unclipped, 0 where the clip is active.
  np.testing.assert_allclose(grads[0], [0.0, -1.1 * 2 / 4, 0.0, 1.5 / 4], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grads[1], np.zeros(4))
  np.testing.assert_array_equal(grads[2], np.zeros(4))


def test_ppo_at_the_old_policy_is_the_policy_gradient():
  log_probs, advantages = _f32([-0.7, -1.9, -0.2]), _f32([0.5, -2.0, 1.0])
  ppo = lambda lp: policy.ppo_clip_loss(lp, log_probs, advantages)
  vanilla = lambda lp: policy.policy_gradient_loss(lp, advantages)
  assert math.isclose(float(ppo(log_probs)), -float(jnp.mean(advantages)), rel_tol=1e-6)
  np.testing.assert_allclose(jax.grad(ppo)(log_probs), jax.grad(vanilla)(log_probs), rtol=1e-6)


def test_leave_one_out_baseline_and_normalised_advantages_by_hand():
  rewards = jnp.array([0.2, 0.5, -1.0, 0.9])
  np.testing.assert_allclose(policy.leave_one_out_baseline(rewards),
                             [(0.5 - 1.0 + 0.9) / 3, (0.2 - 1.0 + 0.9) / 3,
                              (0.2 + 0.5 + 0.9) / 3, (0.2 + 0.5 - 1.0) / 3], rtol=1e-6)
  advantages = jnp.array([0.3, -0.1, 0.4, -0.6])
  np.testing.assert_allclose(policy.normalised(advantages),
                             np.array([0.3, -0.1, 0.4, -0.6]) / np.std([0.3, -0.1, 0.4, -0.6]),
                             rtol=1e-5)
  np.testing.assert_allclose(policy.normalised(jnp.zeros(3)), 0.0)  # No division by zero.


def test_value_loss_by_hand():
  values, returns = _f32([1.0, 2.0]), _f32([0.0, 4.0])
  assert math.isclose(float(policy.value_loss(values, returns)), 1.25)
  grad_values, grad_returns = jax.grad(policy.value_loss, argnums=(0, 1))(values, returns)
  np.testing.assert_allclose(grad_values, [0.5, -1.0])
  np.testing.assert_array_equal(grad_returns, [0.0, 0.0])


@pytest.mark.parametrize("loss", [policy.policy_gradient_loss, policy.value_loss])
def test_losses_reject_mismatched_or_batched_shapes(loss):
  with pytest.raises(AssertionError):
    loss(_f32([1.0, 2.0]), _f32([1.0, 2.0, 3.0]))
  with pytest.raises(AssertionError):
    loss(_f32([[1.0, 2.0]]), _f32([[1.0, 2.0]]))


def test_means_and_logits_are_bounded_smoothly(network_and_params):
  network, params = network_and_params
  changed = jax.tree.map(lambda x: x, params)
  for name, bias in (("depth_mean", 50.0), ("robust_logit", -50.0), ("width_mean", 0.3)):
    changed["stage1_head"][name]["bias"] = jnp.full((1,), bias)
  output = policy.apply(network, changed, _observation(7))
  assert float(output.depth_mean[1]) == pytest.approx(policy.MAX_LOGIT, abs=1e-4)
  assert float(output.robust_logit[1]) == pytest.approx(-policy.MAX_LOGIT, abs=1e-4)
  # Near 0 the bound is the identity (tanh's slope 1), so a fresh policy is unchanged by it.
  changed["stage1_head"]["width_mean"]["kernel"] = jnp.zeros_like(
      changed["stage1_head"]["width_mean"]["kernel"])
  width = float(policy.apply(network, changed, _observation(7)).width_mean[1])
  assert width == pytest.approx(policy.MAX_LOGIT * np.tanh(0.3 / policy.MAX_LOGIT), abs=1e-6)
  assert abs(width - 0.3) < 0.003
