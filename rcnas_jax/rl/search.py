"""Learning to compress: samplers, policy updates and the search phases (METHOD §6).

Each update draws M students for one task from a sampler, evaluates them in the environment
and lets the sampler learn from the rewards. The policy sampler takes one step of REINFORCE
(each reward's baseline the mean of the update's other M - 1, advantages normalised) with an
entropy bonus, or a few PPO epochs; the random sampler draws uniform actions and never learns;
regularized evolution mutates tournament winners of its recent students. Meta-training runs
the policy on a random task per update from the buffers, never the held-out target;
fine-tuning continues the meta-trained policy on the target; R-NAS is the same fine-tuning
from a fresh policy; the baselines spend the same number of evaluations. A method delivers
the best of its top k within-budget students on the selection set (`top_within_budget`,
`selected`). The sampler's state and the iteration are checkpointed with Orbax after every
update, and every evaluation is cached, so a killed search resumes where it stopped."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rcnas_jax.nets import space
from rcnas_jax.rl import env as env_lib, policy
from rcnas_jax.rl.env import Episode
from rcnas_jax.rl.tasks import Task
from rcnas_jax.runtime import checkpoint, metrics, parallel, preemption, store

# Each phase draws its update keys from its own stream of the seed. Fixed: renumbering a
# stream changes every student that phase samples.
STREAMS = {"meta": 0, "finetune": 1, "rnas": 2, "random": 3, "evolution": 4,
           "prior": 5}  # "prior": the synthetic suite's fixed prior (`synthetic.PriorSampler`).


def update_key(seed: int, phase: str, iteration: int) -> jax.Array:
  """The key of update `iteration` of `phase`: the same in every run of that seed."""
  return jax.random.fold_in(jax.random.key(seed), STREAMS[phase] * 100_000 + iteration)


# ---------------------------------------------------------------------------------------------
# The learner: the policy network, its optimiser and its loss settings, built once.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicySettings:
  """config.search.policy as a hashable value (a static argument of the jitted update)."""

  algorithm: str = "vpg"  # 'vpg' (REINFORCE) or 'ppo'.
  # 'leave_one_out': each episode's baseline is the mean reward of the update's other M - 1
  # episodes; 'value': the value head's prediction (trained either way).
  baseline: str = "leave_one_out"
  normalise_advantages: bool = True  # Divide the advantages by their batch std.
  hidden: int = 64
  learning_rate: float = 3e-3
  entropy_weight: float = 0.01
  value_weight: float = 0.5
  ppo_epochs: int = 4
  ppo_clip: float = 0.2


@dataclasses.dataclass(frozen=True)
class Learner:
  """What a policy update needs besides its state; hashable, so it keys compiled programs."""

  network: policy.PolicyNetwork
  tx: optax.GradientTransformation
  settings: PolicySettings


@functools.lru_cache(maxsize=None)
def _learner(settings: PolicySettings, num_stages: int) -> Learner:
  return Learner(policy.PolicyNetwork(hidden=settings.hidden, num_stages=num_stages),
                 optax.adam(settings.learning_rate), settings)


def make_learner(config: ml_collections.ConfigDict, num_stages: int) -> Learner:
  """The learner of config.search.policy for a teacher of `num_stages` stages (one per setting)."""
  return _learner(PolicySettings(**config.search.policy), num_stages)


def continued_state(learner: Learner, params: dict) -> dict:
  """`params` (e.g. meta-trained) with a fresh optimiser, at iteration 0."""
  return {"params": params, "opt_state": learner.tx.init(params), "iteration": jnp.int32(0)}


def fresh_state(learner: Learner, seed: int, observation: policy.Observation) -> dict:
  """A new policy with its optimiser state, at iteration 0 (the same for every phase)."""
  return continued_state(learner, policy.init(learner.network, jax.random.key(seed), observation))


def advantages(rewards: jax.Array, value: jax.Array, p: PolicySettings) -> jax.Array:
  """The M rewards minus their baseline (`p.baseline`), normalised if `p` says so."""
  baseline = (policy.leave_one_out_baseline(rewards) if p.baseline == "leave_one_out"
              else jnp.broadcast_to(value, rewards.shape))
  centred = rewards - jax.lax.stop_gradient(baseline)
  return policy.normalised(centred) if p.normalise_advantages else centred


def _log_probs(output: policy.PolicyOutput, actions: policy.Action,
               observation: policy.Observation) -> jax.Array:
  """log pi of each of the M actions."""
  return jax.vmap(policy.log_prob, in_axes=(None, 0, None))(output, actions,
                                                            observation.max_downsamples)


def _losses(params, network, observation, actions, rewards, old_log_probs, p):
  """Policy, value and entropy terms for M actions taken in one task."""
  output = policy.apply(network, params, observation)
  log_probs = _log_probs(output, actions, observation)
  advantage = advantages(rewards, output.value, p)
  if p.algorithm == "ppo":
    policy_loss = policy.ppo_clip_loss(log_probs, old_log_probs, advantage, p.ppo_clip)
  else:
    policy_loss = policy.policy_gradient_loss(log_probs, advantage)
  value_loss = policy.value_loss(jnp.broadcast_to(output.value, rewards.shape), rewards)
  entropy = policy.entropy(output)
  total = policy_loss + p.value_weight * value_loss - p.entropy_weight * entropy
  return total, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
                 "value": output.value}


@functools.partial(jax.jit, static_argnames=("network", "tx", "p"))
def update(params, opt_state, observation, actions, rewards, *, network, tx, p):
  """One policy update (VPG: one gradient step; PPO: `ppo_epochs` clipped steps)."""
  output = policy.apply(network, params, observation)
  old_log_probs = _log_probs(output, actions, observation)
  epochs = p.ppo_epochs if p.algorithm == "ppo" else 1
  for _ in range(epochs):
    grads, info = jax.grad(_losses, has_aux=True)(params, network, observation, actions,
                                                  rewards, old_log_probs, p)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state, info


@functools.partial(jax.jit, static_argnames=("network", "num_students"))
def sample_actions(params, observation, key, *, network, num_students: int):
  """M actions for one observation."""
  output = policy.apply(network, params, observation)
  return jax.vmap(policy.sample, in_axes=(None, 0, None))(
      output, jax.random.split(key, num_students), observation.max_downsamples)


def random_actions(key: jax.Array, num_stages: int, num_students: int,
                   max_downsamples=policy.UNMASKED) -> policy.Action:
  """Uniform ratios in (0, 1) and fair coins, downsampling masked as the policy's: the
  random-search baseline."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  shape = (num_students, num_stages)
  ratio_logit = lambda k: jax.scipy.special.logit(jax.random.uniform(k, shape, minval=1e-3,
                                                                     maxval=1.0 - 1e-3))
  coin = lambda k: jax.random.bernoulli(k, 0.5, shape).astype(jnp.int32)
  downsample = jax.vmap(policy.mask_downsample, in_axes=(0, None))(coin(k3), max_downsamples)
  return policy.Action(ratio_logit(k1), ratio_logit(k2), downsample, coin(k4))


# ---------------------------------------------------------------------------------------------
# Samplers: where a phase's students come from, and what it learns from their rewards.
# ---------------------------------------------------------------------------------------------


class Sampler(Protocol):
  """Proposes the M students of an update and learns from their rewards."""

  def sample(self, state: dict, observation: policy.Observation, key: jax.Array,
             num_students: int, history: list[Episode]) -> policy.Action:
    """M actions; `history` holds the phase's earlier episodes (for population methods)."""

  def learn(self, state: dict, observation: policy.Observation, actions: policy.Action,
            rewards: jax.Array) -> tuple[dict, dict]:
    """The state after this update's rewards, and what to log of the update."""


@dataclasses.dataclass(frozen=True)
class PolicySampler:
  """RC-NAS and R-NAS: students from the policy, one policy-gradient update per step."""

  learner: Learner

  def sample(self, state, observation, key, num_students, history):
    del history
    return sample_actions(state["params"], observation, key, network=self.learner.network,
                          num_students=num_students)

  def learn(self, state, observation, actions, rewards):
    params, opt_state, info = update(state["params"], state["opt_state"], observation, actions,
                                     rewards, network=self.learner.network, tx=self.learner.tx,
                                     p=self.learner.settings)
    return {**state, "params": params, "opt_state": opt_state}, info


@dataclasses.dataclass(frozen=True)
class RandomSampler:
  """Random search: uniform actions; the state only counts updates."""

  num_stages: int

  def sample(self, state, observation, key, num_students, history):
    del state, history
    return random_actions(key, self.num_stages, num_students, observation.max_downsamples)

  def learn(self, state, observation, actions, rewards):
    return state, {}


@dataclasses.dataclass(frozen=True)
class EvolutionSampler:
  """Regularized evolution (Real et al., 2019): tournament selection, one mutation, ageing.

  The population is the phase's last `population` students, so the oldest dies as each child
  is born, however good it was. Until the population is full, students are uniform random, as
  random search's. Each of an update's M children copies the best of `tournament` members
  drawn at random and changes one choice of one stage: a ratio moves by N(0, mutation_std) in
  logit space, a binary choice flips (downsampling masked as the policy's).
  """

  num_stages: int
  population: int = 20
  tournament: int = 3
  mutation_std: float = 1.0

  def sample(self, state, observation, key, num_students, history):
    del state
    members = [e for e in history[-self.population:] if e.actions is not None]
    if len(members) < self.population:
      return random_actions(key, self.num_stages, num_students, observation.max_downsamples)
    rng = np.random.default_rng(jax.random.key_data(key).tolist())
    children = [self._mutated(self._parent(members, rng), rng) for _ in range(num_students)]
    depth, width, downsample, robust = (np.array(column) for column in zip(*children))
    downsample = jax.vmap(policy.mask_downsample, in_axes=(0, None))(
        jnp.asarray(downsample), observation.max_downsamples)
    logit = lambda r: jax.scipy.special.logit(jnp.clip(jnp.asarray(r, jnp.float32), 1e-3,
                                                       1 - 1e-3))
    return policy.Action(logit(depth), logit(width), downsample, jnp.asarray(robust, jnp.int32))

  def _parent(self, members: list[Episode], rng: np.random.Generator) -> list:
    """The best of `tournament` members drawn without replacement (the earliest on ties)."""
    drawn = sorted(rng.choice(len(members), size=min(self.tournament, len(members)),
                              replace=False))
    return max((members[i] for i in drawn), key=lambda e: e.reward).actions

  def _mutated(self, actions: list, rng: np.random.Generator) -> tuple[list, ...]:
    """Per field (depth, width, downsample, robust), the per-stage values after one mutation."""
    fields = [list(column) for column in zip(*actions)]
    stage, field = rng.integers(self.num_stages), rng.integers(4)
    if field < 2:
      ratio = float(np.clip(fields[field][stage], 1e-3, 1 - 1e-3))
      moved = math.log(ratio / (1 - ratio)) + self.mutation_std * rng.normal()
      fields[field][stage] = 1 / (1 + math.exp(-moved))
    else:
      fields[field][stage] = 1 - int(fields[field][stage])
    return tuple(fields)

  def learn(self, state, observation, actions, rewards):
    return state, {}


def make_sampler(config: ml_collections.ConfigDict, kind: str, num_stages: int) -> Sampler:
  """The sampler of `kind`: 'policy' (RC-NAS, R-NAS), 'random' or 'evolution'."""
  if kind == "policy":
    return PolicySampler(make_learner(config, num_stages))
  if kind == "random":
    return RandomSampler(num_stages)
  if kind == "evolution":
    return EvolutionSampler(num_stages, **config.search.evolution)
  raise ValueError(f"sampler {kind!r}: expected policy, random or evolution")


def stage_actions(actions: policy.Action, i: int) -> tuple[space.StageAction, ...]:
  """The i-th student's StageActions."""
  pick = lambda x: np.asarray(x[i])
  return space.stage_actions(jax.nn.sigmoid(pick(actions.depth_logit)),
                             jax.nn.sigmoid(pick(actions.width_logit)),
                             pick(actions.downsample), pick(actions.robust))


# ---------------------------------------------------------------------------------------------
# Phases.
# ---------------------------------------------------------------------------------------------


class Environment(Protocol):
  """What a phase runs on: `env.Environment` (proxy training) or `synthetic.Environment`."""

  config: ml_collections.ConfigDict

  def observe(self, task) -> policy.Observation:
    """The policy's observation of `task`."""

  def episodes(self, task, actions: list, *, phase: str, iteration: int) -> list[Episode]:
    """The scored students of one update."""


def run_phase(name: str, env: Environment, task_for: Callable[[int], Task],
              num_updates: int, initial: dict, directory: str | None, sampler: Sampler, *,
              progress: bool = True) -> tuple[dict, list[Episode]]:
  """Runs (or resumes) one search phase in `directory`; returns its final state and episodes.

  The task, the actions and the evaluations of update i do not depend on the phase's length,
  so a phase keyed without it resumes from any shorter run and is cut back from a longer one.
  With `directory=None` the phase runs in memory (no checkpoints, logs or progress bar).
  """
  m = env.config.search.students_per_update
  log = _PhaseLog(directory, initial, num_updates) if directory else None
  state, episodes = log.restored() if log else (initial, [])
  start = int(state["iteration"])
  bar = metrics.progress(total=num_updates, initial=start, desc=name,
                         disable=not (progress and log))
  for iteration in range(start, num_updates):
    task = task_for(iteration)
    observation = env.observe(task)
    actions = sampler.sample(state, observation, update_key(env.config.seed, name, iteration), m,
                             episodes)
    new = env.episodes(task, [stage_actions(actions, i) for i in range(m)], phase=name,
                       iteration=iteration)
    rewards = jnp.array([e.reward for e in new], jnp.float32)
    state, info = sampler.learn(state, observation, actions, rewards)
    state = {**state, "iteration": jnp.int32(iteration + 1)}
    episodes += new
    if log:
      log.write(iteration + 1, state, new, rewards, max(e.reward for e in episodes), info)
      bar.set_postfix(mean_reward=f"{float(rewards.mean()):.3f}",
                      best=f"{max(e.reward for e in episodes):.3f}",
                      **{k: f"{float(v):.3f}" for k, v in info.items() if k == "entropy"})
      bar.update(1)
      preemption.check(f"{name} after update {iteration + 1} of {num_updates}")
  bar.close()
  if log:
    log.close()
  return state, episodes


class _PhaseLog:
  """A phase's directory: Orbax checkpoints of the sampler state, the episode log, metrics."""

  def __init__(self, directory: str, initial: dict, num_updates: int):
    self.initial, self.num_updates = initial, num_updates
    self.manager = checkpoint.manager(os.path.join(directory, "checkpoints"))
    self.path = os.path.join(directory, "episodes.jsonl")
    self.writer = metrics.MetricsWriter(directory) if parallel.is_primary() else None

  def restored(self) -> tuple[dict, list[Episode]]:
    """The latest state of at most `num_updates` updates and the episodes before it."""
    state = checkpoint.restore_latest(self.manager, self.initial,
                                      max_step=self.num_updates) or self.initial
    start = int(state["iteration"])
    for later in [step for step in self.manager.all_steps() if step > start]:
      self.manager.delete(later)  # Of a longer run of this phase, or unreadable.
    return state, _keep_before(self.path, start)

  def write(self, step: int, state: dict, new: list[Episode], rewards, best: float, info: dict):
    """Logs one finished update durably, then checkpoints the state after it."""
    store.append_jsonl(self.path, [e.to_dict() for e in new])
    if self.writer:  # Process 0 writes the logs.
      self.writer.write(step, {"mean_reward": float(rewards.mean()), "best_reward": best,
                               **{k: float(v) for k, v in info.items()}})
    checkpoint.save(self.manager, step, state)
    checkpoint.wait(self.manager)

  def close(self):
    self.manager.close()
    if self.writer:
      self.writer.close()


def _keep_before(log_path: str, iteration: int) -> list[Episode]:
  """The logged episodes of finished iterations; later lines (an interrupted one) are dropped."""
  logged = store.read_jsonl(log_path)
  kept = [e for e in logged if e["iteration"] < iteration]
  if len(kept) < len(logged):
    store.write_jsonl(log_path, kept)
  return [Episode.from_dict(e) for e in kept]


def top_within_budget(episodes: list[Episode], budget_macs: int, k: int) -> list[Episode]:
  """The `k` distinct within-budget students with the highest rewards, best first (each the
  earliest episode that evaluated it)."""
  first = {}
  for e in episodes:
    if env_lib.within_budget(e, budget_macs):
      first.setdefault(json.dumps(e.spec, sort_keys=True), e)
  return sorted(first.values(), key=lambda e: -e.reward)[:k]


def selected(candidates: list[Episode]) -> Episode | None:
  """Of a method's top candidates, the one with the best selection-set accuracy (the first,
  i.e. the best reward, on ties or when there is no selection set)."""
  score = lambda e: e.reward if e.selection_accuracy is None else e.selection_accuracy
  return max(candidates, key=score) if candidates else None


def evaluations_to_best(episodes: list[Episode]) -> int:
  """How many evaluations the phase needed to first reach its best reward."""
  best = max(e.reward for e in episodes)
  return next(i + 1 for i, e in enumerate(episodes) if e.reward >= best)


def summary(phases: dict[str, list[Episode]]) -> dict[str, dict]:
  """Per phase: its evaluations, best validation reward and evaluations to reach it."""
  return {phase: {"evaluations": len(episodes), "best_reward": max(e.reward for e in episodes),
                  "evaluations_to_best": evaluations_to_best(episodes)}
          for phase, episodes in phases.items() if episodes}
