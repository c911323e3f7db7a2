"""The agent: a bidirectional-LSTM state encoder, one action head per stage, and the RL losses.

The teacher's stages are read as a sequence (METHOD §3): a shared dense layer encodes each stage
vector, a bidirectional LSTM lets every stage see all the others (stage i's choice depends on
what the stages before and after it keep), and a *separate* MLP per stage mixes that context
with the task features. Each stage then has its own head (METHOD §4): two Gaussians on
unconstrained logits, squashed by a sigmoid into the depth and width ratios, and two Bernoulli
logits (downsample, robust block). The value head reads the mean of the per-stage states.

Everything here is a pure function of arrays. An `Observation` has no batch axis; batches come
from `jax.vmap`. The distribution functions (`sample`, `log_prob`, `entropy`) and the losses
(`policy_gradient_loss`, `ppo_clip_loss`, `value_loss`) follow rlax: small, chex-checked, and
tested on hand-computed cases. Sampled actions carry no gradient: the policy gradient is the
score-function (REINFORCE) estimator, never a reparameterisation through the environment.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

# The initial policy keeps half of each stage (mean logit 0) with a wide but not flat spread
# (std 0.5 in logit space puts 95% of ratios in [0.27, 0.73]).
INITIAL_LOG_STD = math.log(0.5)
# Below -5 the policy is deterministic for all practical purposes; above 1 the squashed ratio
# piles up at 0 and 1. The head's output is squashed smoothly into this range (a hard clip would
# zero its gradient past the bounds, and a policy stuck there could never come back).
LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0
# Means and logits stay within +-MAX_LOGIT: a ratio's mean in (0.018, 0.982), a binary choice
# taken with probability at least 1.8% either way.
MAX_LOGIT = 4.0
# Observation.max_downsamples when nothing is masked.
UNMASKED = 1 << 10
# Heads start near zero output (purejaxrl's actor initialisation), so the initial policy is the
# one set by the biases above, whatever the observation.
head_init = nn.initializers.orthogonal(0.01)
hidden_init = nn.initializers.orthogonal(math.sqrt(2.0))


class Observation(NamedTuple):
  """What the agent sees of one task; no batch axis."""

  stages: jax.Array  # (S, 4): the teacher's normalised per-stage [stride, depth, width, robust].
  task: jax.Array  # (F,): task features [LIPS, cost..., data...].
  # How many stages may downsample before the image shrinks below 2x2 (`mask_downsample`);
  # the default masks nothing.
  max_downsamples: jax.Array | int = UNMASKED


class Action(NamedTuple):
  """One student: per stage, the pre-squash ratio logits and the two binary choices."""

  depth_logit: jax.Array  # (S,) float; depth ratio = sigmoid(depth_logit).
  width_logit: jax.Array  # (S,) float; width ratio = sigmoid(width_logit).
  downsample: jax.Array  # (S,) int32 in {0, 1}: 1 = the stage's first block has stride 2.
  robust: jax.Array  # (S,) int32 in {0, 1}: 1 = the stage uses robust blocks.


class PolicyOutput(NamedTuple):
  """The action distribution's parameters for every stage, and the baseline."""

  depth_mean: jax.Array  # (S,) mean of the depth logit.
  depth_log_std: jax.Array  # (S,) in (LOG_STD_MIN, LOG_STD_MAX), see `bounded_log_std`.
  width_mean: jax.Array  # (S,)
  width_log_std: jax.Array  # (S,)
  downsample_logit: jax.Array  # (S,) Bernoulli logit of downsample = 1.
  robust_logit: jax.Array  # (S,) Bernoulli logit of robust = 1.
  value: jax.Array  # () the value baseline.


# ---------------------------------------------------------------------------------------------
# Network.
# ---------------------------------------------------------------------------------------------


class StageMLP(nn.Module):
  """Per-stage state s_i from [task, H_i^F, H_i^B]: two tanh layers."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.tanh(nn.Dense(self.hidden, kernel_init=hidden_init, name="dense0")(x))
    return nn.tanh(nn.Dense(self.hidden, kernel_init=hidden_init, name="dense1")(x))


def bounded_log_std(raw: jax.Array) -> jax.Array:
  """A smooth map of R onto (LOG_STD_MIN, LOG_STD_MAX): a scaled sigmoid, whose gradient never
  vanishes exactly (a hard clip's does past the bounds)."""
  return LOG_STD_MIN + (LOG_STD_MAX - LOG_STD_MIN) * jax.nn.sigmoid(raw)


def bounded_logit(raw: jax.Array) -> jax.Array:
  """A smooth map of R onto (-MAX_LOGIT, MAX_LOGIT), the identity near 0: a head can never
  saturate, so the policy keeps exploring and keeps depending on the observation."""
  return MAX_LOGIT * jnp.tanh(raw / MAX_LOGIT)


def _raw_log_std(log_std: float) -> float:
  """The head output that `bounded_log_std` maps to `log_std` (its inverse)."""
  fraction = (log_std - LOG_STD_MIN) / (LOG_STD_MAX - LOG_STD_MIN)
  return math.log(fraction / (1.0 - fraction))


class StageHead(nn.Module):
  """One stage's action head: six scalars, one dense layer each."""

  @nn.compact
  def __call__(self, state: jax.Array) -> tuple[jax.Array, ...]:
    def scalar(name, bias=0.0):
      layer = nn.Dense(1, kernel_init=head_init, bias_init=nn.initializers.constant(bias),
                       name=name)
      return layer(state)[0]

    log_std = lambda name: bounded_log_std(scalar(name, _raw_log_std(INITIAL_LOG_STD)))
    bounded = lambda name: bounded_logit(scalar(name))
    return (bounded("depth_mean"), log_std("depth_log_std"),
            bounded("width_mean"), log_std("width_log_std"),
            bounded("downsample_logit"), bounded("robust_logit"))


class PolicyNetwork(nn.Module):
  """Observation -> PolicyOutput (METHOD §3-4), with a `stage{i}_mlp` and `stage{i}_head` per stage.

  Parameter names: `stage_encoder`, `lstm_forward`, `lstm_backward`, `stage{i}_mlp`,
  `stage{i}_head/{depth_mean, depth_log_std, ..., robust_logit}`, `value_hidden`, `value_head`.
  """

  hidden: int = 64
  num_stages: int = 3

  @nn.compact
  def __call__(self, observation: Observation) -> PolicyOutput:
    stages = jnp.asarray(observation.stages, jnp.float32)
    task = jnp.asarray(observation.task, jnp.float32)
    if stages.shape != (self.num_stages, 4) or task.ndim != 1:
      raise ValueError(f"observation: stages {stages.shape}, task {task.shape}; expected "
                       f"stages ({self.num_stages}, 4) and task (F,) (no batch axis: use vmap)")
    encoded = nn.tanh(nn.Dense(self.hidden, kernel_init=hidden_init, name="stage_encoder")(stages))
    # The cells carry the names: Flax binds a cell to the module that constructs it.
    forward = nn.RNN(nn.OptimizedLSTMCell(self.hidden, name="lstm_forward"))(encoded)
    backward = nn.RNN(nn.OptimizedLSTMCell(self.hidden, name="lstm_backward"), reverse=True,
                      keep_order=True)(encoded)
    states, heads = [], []
    for i in range(self.num_stages):
      state = StageMLP(self.hidden, name=f"stage{i}_mlp")(
          jnp.concatenate([task, forward[i], backward[i]]))
      states.append(state)
      heads.append(StageHead(name=f"stage{i}_head")(state))
    pooled = jnp.mean(jnp.stack(states), axis=0)
    value = nn.tanh(nn.Dense(self.hidden, kernel_init=hidden_init, name="value_hidden")(pooled))
    value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0), name="value_head")(value)[0]
    per_head = [jnp.stack(column) for column in zip(*heads)]
    return PolicyOutput(*per_head, value=value)


def init(network: PolicyNetwork, key: jax.Array, observation: Observation) -> dict:
  """Initial parameters; run them with `apply(network, params, observation)`."""
  return network.init(key, observation)["params"]


def apply(network: PolicyNetwork, params: dict, observation: Observation) -> PolicyOutput:
  """The policy's output for one observation (vmap for a batch)."""
  return network.apply({"params": params}, observation)


# ---------------------------------------------------------------------------------------------
# Distributions: one squashed Gaussian per ratio and one Bernoulli per binary choice.
# ---------------------------------------------------------------------------------------------


def depth_ratio(action: Action) -> jax.Array:
  """Depth ratio in (0, 1) per stage."""
  return jax.nn.sigmoid(action.depth_logit)


def width_ratio(action: Action) -> jax.Array:
  """Width ratio in (0, 1) per stage."""
  return jax.nn.sigmoid(action.width_logit)


def squashed_gaussian_log_prob(logit: jax.Array, mean: jax.Array,
                               log_std: jax.Array) -> jax.Array:
  """Log-density of the ratio sigmoid(logit), logit ~ N(mean, exp(log_std)^2), elementwise.

  Change of variables: p(r) = N(u) / |dr/du| with dr/du = sigmoid(u) (1 - sigmoid(u)), and
  -log(sigmoid(u) (1 - sigmoid(u))) = softplus(u) + softplus(-u), which stays finite for any u.
  """
  standardised = (logit - mean) * jnp.exp(-log_std)
  gaussian = -0.5 * standardised**2 - log_std - 0.5 * math.log(2 * math.pi)
  return gaussian + jax.nn.softplus(logit) + jax.nn.softplus(-logit)


def bernoulli_log_prob(logit: jax.Array, outcome: jax.Array) -> jax.Array:
  """log P(outcome) for outcome in {0, 1} with P(1) = sigmoid(logit), elementwise."""
  return jnp.where(outcome == 1, jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit))


def gaussian_entropy(log_std: jax.Array) -> jax.Array:
  """Differential entropy 0.5 log(2 pi e sigma^2) of N(., sigma^2), elementwise."""
  return 0.5 * math.log(2 * math.pi * math.e) + log_std


def bernoulli_entropy(logit: jax.Array) -> jax.Array:
  """-p log p - (1 - p) log(1 - p) with p = sigmoid(logit), elementwise and stable."""
  probability = jax.nn.sigmoid(logit)
  return (-probability * jax.nn.log_sigmoid(logit)
          - (1.0 - probability) * jax.nn.log_sigmoid(-logit))


def downsample_allowed(downsample: jax.Array, max_downsamples) -> jax.Array:
  """(S,) bool: stage i may downsample, given the choices of the stages before it.

  Stages choose in order; once `max_downsamples` of them have, the rest cannot (the student
  could not be built). A forced choice has probability 1, so it adds nothing to log pi.
  """
  before = jnp.cumsum(downsample) - downsample
  return before < max_downsamples


def mask_downsample(downsample: jax.Array, max_downsamples) -> jax.Array:
  """The buildable choices: a stage's downsample is dropped once `max_downsamples` are taken.

  Until then every wanted choice is kept, so the wanted ones before stage i count the kept ones.
  """
  downsample = jnp.asarray(downsample, jnp.int32)
  return downsample * downsample_allowed(downsample, max_downsamples)


def sample(output: PolicyOutput, key: jax.Array, max_downsamples=UNMASKED) -> Action:
  """One action from the policy, buildable by construction (`mask_downsample`); it carries no
  gradient (score-function estimator)."""
  output = jax.lax.stop_gradient(output)
  depth_key, width_key, downsample_key, robust_key = jax.random.split(key, 4)
  gaussian = lambda k, mean, log_std: mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
  bernoulli = lambda k, logit: jax.random.bernoulli(k, jax.nn.sigmoid(logit)).astype(jnp.int32)
  return Action(depth_logit=gaussian(depth_key, output.depth_mean, output.depth_log_std),
                width_logit=gaussian(width_key, output.width_mean, output.width_log_std),
                downsample=mask_downsample(bernoulli(downsample_key, output.downsample_logit),
                                           max_downsamples),
                robust=bernoulli(robust_key, output.robust_logit))


def log_prob(output: PolicyOutput, action: Action, max_downsamples=UNMASKED) -> jax.Array:
  """log pi(action): the sum over stages of the depth and width ratio log-densities (squashed
  Gaussians) and the downsample and robust log-probabilities (Bernoulli; a downsample choice
  that `mask_downsample` forced counts log 1 = 0)."""
  chex.assert_equal_shape([output.depth_mean, action.depth_logit, action.width_logit,
                           action.downsample, action.robust])
  allowed = downsample_allowed(action.downsample, max_downsamples)
  return (jnp.sum(squashed_gaussian_log_prob(action.depth_logit, output.depth_mean,
                                             output.depth_log_std))
          + jnp.sum(squashed_gaussian_log_prob(action.width_logit, output.width_mean,
                                               output.width_log_std))
          + jnp.sum(jnp.where(allowed, bernoulli_log_prob(output.downsample_logit,
                                                          action.downsample), 0.0))
          + jnp.sum(bernoulli_log_prob(output.robust_logit, action.robust)))


def entropy(output: PolicyOutput) -> jax.Array:
  """The entropy bonus, summed over stages and heads.

  The squashed ratio's entropy has no closed form; as usual (SAC, PPO with tanh squashing) the
  pre-squash Gaussian's entropy stands in for it. It differs by E[log sigmoid'(u)], which
  only rewards keeping the ratio away from 0 and 1.
  """
  return (jnp.sum(gaussian_entropy(output.depth_log_std))
          + jnp.sum(gaussian_entropy(output.width_log_std))
          + jnp.sum(bernoulli_entropy(output.downsample_logit))
          + jnp.sum(bernoulli_entropy(output.robust_logit)))


# ---------------------------------------------------------------------------------------------
# Losses over a batch of M episodes (rank-1 arrays), minimised by the optimiser.
# ---------------------------------------------------------------------------------------------


def _check_batch(*arrays: jax.Array) -> None:
  """Same-shape rank-1 float arrays, one entry per episode."""
  chex.assert_rank(arrays, 1)
  chex.assert_equal_shape(arrays)
  chex.assert_type(arrays, float)


def leave_one_out_baseline(rewards: jax.Array) -> jax.Array:
  """Each episode's baseline: the mean reward of the other M - 1 episodes of its batch."""
  _check_batch(rewards)
  m = rewards.shape[0]
  return (jnp.sum(rewards) - rewards) / jnp.maximum(m - 1, 1)


def normalised(advantages: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Advantages divided by their batch standard deviation (their mean is kept)."""
  _check_batch(advantages)
  return advantages / (jnp.std(advantages) + eps)


def policy_gradient_loss(log_probs: jax.Array, advantages: jax.Array) -> jax.Array:
  """REINFORCE: -mean(log pi(a) * advantage); the advantage is a constant."""
  _check_batch(log_probs, advantages)
  return -jnp.mean(log_probs * jax.lax.stop_gradient(advantages))


def ppo_clip_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array,
                  clip_epsilon: float = 0.2) -> jax.Array:
  """PPO's clipped surrogate, negated: -mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)) with
  rho = pi(a) / pi_old(a); the old log-probabilities and advantages are constants."""
  _check_batch(log_probs, old_log_probs, advantages)
  advantages = jax.lax.stop_gradient(advantages)
  ratio = jnp.exp(log_probs - jax.lax.stop_gradient(old_log_probs))
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
  return -jnp.mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))


def value_loss(values: jax.Array, returns: jax.Array) -> jax.Array:
  """0.5 * mean squared error of the baseline; the returns are constants."""
  _check_batch(values, returns)
  return 0.5 * jnp.mean((values - jax.lax.stop_gradient(returns)) ** 2)
