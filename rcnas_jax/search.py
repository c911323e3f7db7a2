"""Learning to compress: policy-gradient updates, meta-training, fine-tuning, baselines (METHOD §6).

Each update samples M students for one task from the multi-head policy, evaluates them in the
environment and takes one step of REINFORCE with a value baseline and an entropy bonus (or a
few PPO epochs). Meta-training draws a random task per update from the buffers, never the
held-out target; fine-tuning continues the meta-trained policy on the target; R-NAS is the same
fine-tuning from a fresh policy; random search spends the same number of evaluations on
uniformly random actions. Policy, optimiser and iteration are checkpointed with Orbax after
every update, and every evaluation is cached, so a killed search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rcnas_jax import (arch, checkpoint, env as env_lib, metrics, parallel, policy, preemption,
                       store)
from rcnas_jax.state import Task, ThreatModel

PHASES = ("meta", "finetune", "rnas", "random")


def parse_attack(name: str, eps: float, norm: str = "linf") -> ThreatModel:
  """'clean', 'fgsm', 'pgd-<steps>', 'cw-<steps>' or 'apgd-<steps>' (APGD-CE) as a ThreatModel."""
  kind, _, steps = name.partition("-")
  stepped = ("pgd", "cw", "apgd")
  if kind not in ("clean", "fgsm") + stepped or (kind in stepped) != steps.isdigit():
    raise ValueError(f"attack {name!r}: expected clean, fgsm, pgd-<steps>, cw-<steps> or "
                     "apgd-<steps>")
  return ThreatModel("apgd-ce" if kind == "apgd" else kind, eps, int(steps) if steps else 1, norm)


def target_task(config: ml_collections.ConfigDict, image_size: int, num_classes: int,
                in_channels: int) -> Task:
  """The held-out task that fine-tuning optimises for."""
  t = config.search.target
  budget = t.budget_macs or int(t.budget_fraction * arch.count_macs(
      arch.teacher(t.teacher), image_size, num_classes, in_channels))
  return Task(t.dataset, parse_attack(t.attack, config.attack.eps, config.attack.norm),
              t.teacher, budget)


def meta_task(config: ml_collections.ConfigDict, iteration: int, target: Task,
              dataset_infos: dict) -> Task:
  """The task of one meta-training update: a (dataset, attack) pair from a seeded cycle through
  the buffers (never the target's pair, every pair once per cycle), a random teacher and budget.
  """
  s = config.search
  pairs = [(d, parse_attack(a, config.attack.eps, config.attack.norm))
           for d in s.datasets for a in s.attacks]
  pairs = [p for p in pairs if p != (target.dataset, target.attack)]
  cycle, position = divmod(iteration, len(pairs))
  order = np.random.default_rng((config.seed, 7, cycle)).permutation(len(pairs))
  dataset, attack = pairs[order[position]]
  rng = np.random.default_rng((config.seed, 8, iteration))
  teacher = s.teachers[rng.integers(len(s.teachers))]
  info = dataset_infos[dataset]
  teacher_macs = arch.count_macs(arch.teacher(teacher), info.image_shape[0], info.num_classes,
                                 info.image_shape[-1])
  low, high = s.budget_range
  return Task(dataset, attack, teacher, int(rng.uniform(low, high) * teacher_macs))


# ---------------------------------------------------------------------------------------------
# Policy updates (pure, jitted).
# ---------------------------------------------------------------------------------------------


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


def stage_actions(actions: policy.Action, i: int) -> tuple:
  """The i-th student's StageActions."""
  pick = lambda x: np.asarray(x[i])
  return env_lib.actions_from_policy(jax.nn.sigmoid(pick(actions.depth_logit)),
                                     jax.nn.sigmoid(pick(actions.width_logit)),
                                     pick(actions.downsample), pick(actions.robust))


# ---------------------------------------------------------------------------------------------
# Phases.
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


@functools.lru_cache(maxsize=None)
def _network(hidden: int, num_stages: int) -> policy.PolicyNetwork:
  return policy.PolicyNetwork(hidden=hidden, num_stages=num_stages)


def fresh_search_state(config: ml_collections.ConfigDict, observation) -> dict:
  """A new policy with its optimiser state, at iteration 0 (the same for every phase)."""
  p = PolicySettings(**config.search.policy)
  network = _network(p.hidden, observation.stages.shape[0])
  params = policy.init(network, jax.random.key(config.seed), observation)
  return {"params": params, "opt_state": optax.adam(p.learning_rate).init(params),
          "iteration": jnp.int32(0)}


def run_phase(name: str, env: env_lib.Environment, task_for: Callable[[int], Task],
              num_updates: int, initial: dict, directory: str, *, learn: bool = True,
              progress: bool = True) -> tuple[dict, list[dict]]:
  """Runs (or resumes) one search phase in `directory`; returns its final state and episodes.

  The task, the actions and the evaluations of update i do not depend on the phase's length,
  so a phase keyed without it resumes from any shorter run and is cut back from a longer one.
  """
  config = env.config
  s = config.search
  num_stages = len(arch.teacher(task_for(0).teacher).stages)
  p = PolicySettings(**s.policy)
  network = _network(p.hidden, num_stages)
  tx = optax.adam(p.learning_rate)
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
    key = jax.random.fold_in(jax.random.key(config.seed), PHASES.index(name) * 100_000 + iteration)
    if learn:
      actions = sample_actions(state["params"], observation, key, network=network,
                               num_students=s.students_per_update)
    else:
      actions = random_actions(key, num_stages, s.students_per_update)
    results = env_lib.episodes(env, task, [stage_actions(actions, i)
                                           for i in range(s.students_per_update)])
    rewards = jnp.array([r["reward"] for r in results], jnp.float32)
    info = {}
    if learn:
      params, opt_state, info = update(state["params"], state["opt_state"], observation, actions,
                                       rewards, network=network, tx=tx, p=p)
      state = {"params": params, "opt_state": opt_state, "iteration": jnp.int32(iteration + 1)}
    else:
      state = {**state, "iteration": jnp.int32(iteration + 1)}
    new = [{"phase": name, "iteration": iteration, "student": i, "task": task.key(), **r}
           for i, r in enumerate(results)]
    episodes += new
    store.append_jsonl(log_path, new)
    if writer:  # Process 0 writes the logs.
      writer.write(iteration + 1, {"mean_reward": float(rewards.mean()),
                                   "best_reward": max(e["reward"] for e in episodes),
                                   **{k: float(v) for k, v in info.items()}})
    checkpoint.save(manager, iteration + 1, state)
    checkpoint.wait(manager)
    bar.set_postfix(mean_reward=f"{float(rewards.mean()):.3f}",
                    best=f"{max(e['reward'] for e in episodes):.3f}",
                    **{k: f"{float(v):.3f}" for k, v in info.items() if k == "entropy"})
    bar.update(1)
    preemption.check(f"{name} after update {iteration + 1} of {num_updates}")
  bar.close()
  manager.close()
  if writer:
    writer.close()
  return state, episodes


def _keep_before(log_path: str, iteration: int) -> list[dict]:
  """The logged episodes of finished iterations; later lines (an interrupted one) are dropped."""
  logged = store.read_jsonl(log_path)
  kept = [e for e in logged if e["iteration"] < iteration]
  if len(kept) < len(logged):
    store.write_jsonl(log_path, kept)
  return kept


def best_episode(episodes: list[dict]) -> dict | None:
  """The valid episode with the highest validation reward (earliest on ties)."""
  valid = [e for e in episodes if e["valid"]]
  return max(valid, key=lambda e: e["reward"]) if valid else None


def evaluations_to_best(episodes: list[dict]) -> int:
  """How many evaluations the phase needed to first reach its best reward."""
  best = max(e["reward"] for e in episodes)
  return next(i + 1 for i, e in enumerate(episodes) if e["reward"] >= best)
