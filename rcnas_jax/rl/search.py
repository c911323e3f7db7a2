"""Learning to compress: samplers, policy updates and the search phases (METHOD §6).

Each update draws M students for one task from a sampler, evaluates them in the environment
and lets the sampler learn from the rewards. The policy sampler takes one step of REINFORCE
with a value baseline and an entropy bonus (or a few PPO epochs); the random sampler draws
uniform actions and never learns. Meta-training runs the policy on a random task per update
from the buffers, never the held-out target; fine-tuning continues the meta-trained policy on
the target; R-NAS is the same fine-tuning from a fresh policy; random search spends the same
number of evaluations. The sampler's state and the iteration are checkpointed with Orbax after
every update, and every evaluation is cached, so a killed search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
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
STREAMS = {"meta": 0, "finetune": 1, "rnas": 2, "random": 3}


def update_key(seed: int, phase: str, iteration: int) -> jax.Array:
  """The key of update `iteration` of `phase`: the same in every run of that seed."""
  return jax.random.fold_in(jax.random.key(seed), STREAMS[phase] * 100_000 + iteration)


# ---------------------------------------------------------------------------------------------
# The learner: the policy network, its optimiser and its loss settings, built once.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicySettings:
  """config.search.policy as a hashable value (a static argument of the jitted update)."""

  algorithm: str = "vpg"  # 'vpg' (REINFORCE with a value baseline) or 'ppo'.
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


def _losses(params, network, observation, actions, rewards, old_log_probs, p):
  """Policy, value and entropy terms for M actions taken in one task."""
  output = policy.apply(network, params, observation)
  log_probs = jax.vmap(policy.log_prob, in_axes=(None, 0))(output, actions)
  advantages = rewards - jax.lax.stop_gradient(output.value)
  if p.algorithm == "ppo":
    policy_loss = policy.ppo_clip_loss(log_probs, old_log_probs, advantages, p.ppo_clip)
  else:
    policy_loss = policy.policy_gradient_loss(log_probs, advantages)
  value_loss = policy.value_loss(jnp.broadcast_to(output.value, rewards.shape), rewards)
  entropy = policy.entropy(output)
  total = policy_loss + p.value_weight * value_loss - p.entropy_weight * entropy
  return total, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
                 "value": output.value}


@functools.partial(jax.jit, static_argnames=("network", "tx", "p"))
def update(params, opt_state, observation, actions, rewards, *, network, tx, p):
  """One policy update (VPG: one gradient step; PPO: `ppo_epochs` clipped steps)."""
  output = policy.apply(network, params, observation)
  old_log_probs = jax.vmap(policy.log_prob, in_axes=(None, 0))(output, actions)
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
  return jax.vmap(policy.sample, in_axes=(None, 0))(output, jax.random.split(key, num_students))


def random_actions(key: jax.Array, num_stages: int, num_students: int) -> policy.Action:
  """Uniform ratios in (0, 1) and fair coins: the random-search baseline."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  shape = (num_students, num_stages)
  ratio_logit = lambda k: jax.scipy.special.logit(jax.random.uniform(k, shape, minval=1e-3,
                                                                     maxval=1.0 - 1e-3))
  coin = lambda k: jax.random.bernoulli(k, 0.5, shape).astype(jnp.int32)
  return policy.Action(ratio_logit(k1), ratio_logit(k2), coin(k3), coin(k4))


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
    del state, observation, history
    return random_actions(key, self.num_stages, num_students)

  def learn(self, state, observation, actions, rewards):
    return state, {}


def stage_actions(actions: policy.Action, i: int) -> tuple[space.StageAction, ...]:
  """The i-th student's StageActions."""
  pick = lambda x: np.asarray(x[i])
  return space.stage_actions(jax.nn.sigmoid(pick(actions.depth_logit)),
                             jax.nn.sigmoid(pick(actions.width_logit)),
                             pick(actions.downsample), pick(actions.robust))


# ---------------------------------------------------------------------------------------------
# Phases.
# ---------------------------------------------------------------------------------------------


def run_phase(name: str, env: env_lib.Environment, task_for: Callable[[int], Task],
              num_updates: int, initial: dict, directory: str, sampler: Sampler, *,
              progress: bool = True) -> tuple[dict, list[Episode]]:
  """Runs (or resumes) one search phase in `directory`; returns its final state and episodes.

  The task, the actions and the evaluations of update i do not depend on the phase's length,
  so a phase keyed without it resumes from any shorter run and is cut back from a longer one.
  """
  config = env.config
  m = config.search.students_per_update
  manager = checkpoint.manager(os.path.join(directory, "checkpoints"))
  state = checkpoint.restore_latest(manager, initial, max_step=num_updates) or initial
  start = int(state["iteration"])
  for later in [step for step in manager.all_steps() if step > start]:
    manager.delete(later)  # Of a longer run of this phase, or unreadable.
  log_path = os.path.join(directory, "episodes.jsonl")
  episodes = _keep_before(log_path, start)
  writer = metrics.MetricsWriter(directory) if parallel.is_primary() else None
  bar = metrics.progress(total=num_updates, initial=start, desc=name, disable=not progress)
  for iteration in range(start, num_updates):
    task = task_for(iteration)
    observation = env_lib.observe(env, task)
    actions = sampler.sample(state, observation, update_key(config.seed, name, iteration), m,
                             episodes)
    new = env_lib.episodes(env, task, [stage_actions(actions, i) for i in range(m)],
                           phase=name, iteration=iteration)
    rewards = jnp.array([e.reward for e in new], jnp.float32)
    state, info = sampler.learn(state, observation, actions, rewards)
    state = {**state, "iteration": jnp.int32(iteration + 1)}
    episodes += new
    store.append_jsonl(log_path, [e.to_dict() for e in new])
    best = max(e.reward for e in episodes)
    if writer:  # Process 0 writes the logs.
      writer.write(iteration + 1, {"mean_reward": float(rewards.mean()), "best_reward": best,
                                   **{k: float(v) for k, v in info.items()}})
    checkpoint.save(manager, iteration + 1, state)
    checkpoint.wait(manager)
    bar.set_postfix(mean_reward=f"{float(rewards.mean()):.3f}", best=f"{best:.3f}",
                    **{k: f"{float(v):.3f}" for k, v in info.items() if k == "entropy"})
    bar.update(1)
    preemption.check(f"{name} after update {iteration + 1} of {num_updates}")
  bar.close()
  manager.close()
  if writer:
    writer.close()
  return state, episodes


def _keep_before(log_path: str, iteration: int) -> list[Episode]:
  """The logged episodes of finished iterations; later lines (an interrupted one) are dropped."""
  logged = store.read_jsonl(log_path)
  kept = [e for e in logged if e["iteration"] < iteration]
  if len(kept) < len(logged):
    store.write_jsonl(log_path, kept)
  return [Episode.from_dict(e) for e in kept]


def best_episode(episodes: list[Episode]) -> Episode | None:
  """The valid episode with the highest validation reward (earliest on ties)."""
  valid = [e for e in episodes if e.valid]
  return max(valid, key=lambda e: e.reward) if valid else None


def evaluations_to_best(episodes: list[Episode]) -> int:
  """How many evaluations the phase needed to first reach its best reward."""
  best = max(e.reward for e in episodes)
  return next(i + 1 for i, e in enumerate(episodes) if e.reward >= best)


def summary(phases: dict[str, list[Episode]]) -> dict[str, dict]:
  """Per phase: its evaluations, best validation reward and evaluations to reach it."""
  return {phase: {"evaluations": len(episodes), "best_reward": max(e.reward for e in episodes),
                  "evaluations_to_best": evaluations_to_best(episodes)}
          for phase, episodes in phases.items() if episodes}
