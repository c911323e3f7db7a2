"""Search: policy updates that learn, the samplers, the update keys, exact resume of a phase."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax import config as config_lib
from rcnas_jax.rl import env as env_lib, policy, search
from rcnas_jax.rl.env import Episode
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust.attacks import ThreatModel


def _config():
  c = config_lib.base_config()
  c.search.update(datasets=("digits", "mnist5k"), attacks=("fgsm", "pgd-5", "cw-5"),
                  teachers=("tiny-8", "WRN-10-2"), students_per_update=4)
  c.search.target.update(dataset="digits", attack="pgd-5", teacher="tiny-8")
  c.search.policy.update(hidden=16, learning_rate=0.03, entropy_weight=0.0)
  return c


def _observation():
  return policy.Observation(jnp.asarray(np.random.default_rng(0).uniform(size=(3, 4)),
                                        jnp.float32), jnp.linspace(0, 1, 6))


def _synthetic_reward(actions: policy.Action) -> jnp.ndarray:
  """Rewards deep, narrow students that use robust blocks."""
  depth = jax.nn.sigmoid(actions.depth_logit).mean(-1)
  width = jax.nn.sigmoid(actions.width_logit).mean(-1)
  return depth - width + actions.robust.mean(-1)


@pytest.mark.parametrize("algorithm", ["vpg", "ppo"])
def test_policy_updates_raise_the_reward(algorithm):
  c = _config()
  c.search.policy.algorithm = algorithm
  observation = _observation()
  learner = search.make_learner(c, 3)
  assert search.make_learner(c, 3) is learner  # Built once per setting: one compiled update.
  sampler = search.PolicySampler(learner)
  state = search.fresh_state(learner, c.seed, observation)
  means = []
  for i in range(60):
    actions = sampler.sample(state, observation, jax.random.key(i), 16, [])
    rewards = _synthetic_reward(actions)
    means.append(float(rewards.mean()))
    state, info = sampler.learn(state, observation, actions, rewards)
  assert np.mean(means[-10:]) > np.mean(means[:10]) + 0.3
  assert abs(float(info["value"]) - np.mean(means[-10:])) < 0.5  # The baseline tracks rewards.


def test_the_random_sampler_never_learns():
  learner = search.make_learner(_config(), 3)
  state = search.fresh_state(learner, 0, _observation())
  sampler = search.RandomSampler(3)
  actions = sampler.sample(state, _observation(), jax.random.key(0), 4, [])
  assert actions.depth_logit.shape == (4, 3)
  learned, info = sampler.learn(state, _observation(), actions, jnp.ones(4))
  assert learned is state and info == {}


def test_update_keys_differ_across_phases_and_updates_and_repeat_across_runs():
  keys = {(phase, i): jax.random.key_data(search.update_key(0, phase, i)).tolist()
          for phase in search.STREAMS for i in range(50)}
  assert len({str(k) for k in keys.values()}) == len(keys)
  assert keys[("rnas", 3)] == jax.random.key_data(search.update_key(0, "rnas", 3)).tolist()
  # The derivation is part of every search's results: fold_in(key(seed), stream * 1e5 + i).
  expected = jax.random.fold_in(jax.random.key(0), 2 * 100_000 + 3)
  assert keys[("rnas", 3)] == jax.random.key_data(expected).tolist()


def test_random_actions_cover_the_space():
  actions = search.random_actions(jax.random.key(0), 3, 500)
  ratios = jax.nn.sigmoid(actions.depth_logit)
  assert 0.0 < float(ratios.min()) < 0.05 and 0.95 < float(ratios.max()) < 1.0
  assert 0.4 < float(actions.robust.mean()) < 0.6
  students = [search.stage_actions(actions, i) for i in range(3)]
  assert all(len(s) == 3 and 0 < s[0].depth_ratio < 1 for s in students)


def test_random_actions_never_downsample_more_than_the_image_allows():
  actions = search.random_actions(jax.random.key(0), 3, 200, max_downsamples=1)
  assert int(actions.downsample.sum(-1).max()) == 1
  assert 0.3 < float(actions.downsample[:, 0].mean()) < 0.7  # A first choice stays a coin.


def _population(n: int, rng) -> list[Episode]:
  """n episodes with random actions [depth, width, downsample, robust] over 3 stages."""
  return [Episode("evolution", i, 0, "t", reward=float(rng.uniform()), valid=True,
                  actions=[[float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9)),
                            int(rng.integers(2)), int(rng.integers(2))] for _ in range(3)])
          for i in range(n)]


def _children(sampler, history, n=60):
  actions = sampler.sample(None, _observation(), jax.random.key(1), n, history)
  return [[list(stage) for stage in env_lib.chosen(search.stage_actions(actions, i))]
          for i in range(n)]


def _differences(a: list, b: list) -> list[tuple[int, int]]:
  return [(s, f) for s in range(3) for f in range(4) if abs(a[s][f] - b[s][f]) > 1e-4]


def test_evolution_mutates_one_choice_of_the_tournament_winner():
  history = _population(25, np.random.default_rng(0))
  population = history[-10:]  # Ageing: only the last 10 students can be parents.
  best = max(population, key=lambda e: e.reward)
  everyone = search.EvolutionSampler(3, population=10, tournament=10)  # The winner is the best.
  children = _children(everyone, history)
  assert all(len(_differences(child, best.actions)) == 1 for child in children)
  assert len({d for child in children for d in _differences(child, best.actions)}) > 6
  one = search.EvolutionSampler(3, population=10, tournament=1)  # Any member can be a parent.
  parents = [min(population, key=lambda e: len(_differences(child, e.actions)))
             for child in _children(one, history)]
  assert len({p.iteration for p in parents}) >= 6
  assert all(p in population for p in parents)


def test_evolution_starts_from_random_students():
  history = _population(4, np.random.default_rng(0))
  children = _children(search.EvolutionSampler(3, population=10), history, n=8)
  assert all(len(_differences(child, e.actions)) > 3 for child in children for e in history)


def _fake_environment(monkeypatch, c):
  """An environment whose episodes score actions by a formula instead of training."""
  calls = []

  def episode(actions, phase, iteration, i, task):
    calls.append(actions)
    score = float(np.mean([a.depth_ratio - a.width_ratio + a.robust for a in actions]))
    return Episode(phase, iteration, i, task.key(), reward=score, valid=True,
                   robust_accuracy=score, macs=1, params=1)

  monkeypatch.setattr(env_lib, "episodes", lambda env, task, students, phase, iteration: [
      episode(a, phase, iteration, i, task) for i, a in enumerate(students)])
  monkeypatch.setattr(env_lib, "observe", lambda env, task: _observation())
  environment = env_lib.Environment(c, {}, {}, None, env_lib.EvaluationCache(None), None)
  return environment, calls


def test_a_stopped_phase_resumes_exactly(tmp_path, monkeypatch):
  c = _config()
  environment, calls = _fake_environment(monkeypatch, c)
  task = Task("digits", ThreatModel("pgd", eps=0.1, num_steps=5), "tiny-8", 100)
  learner = search.make_learner(c, 3)
  fresh = search.fresh_state(learner, c.seed, _observation())
  run = lambda n, directory: search.run_phase("finetune", environment, lambda i: task, n, fresh,
                                              str(tmp_path / directory),
                                              search.PolicySampler(learner), progress=False)
  straight, episodes = run(4, "a")
  run(2, "b")
  resumed, resumed_episodes = run(4, "b")
  assert int(resumed["iteration"]) == 4 and len(resumed_episodes) == 16
  assert resumed_episodes == episodes  # Typed episodes, read back from the log.
  for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(a, b)
  assert len(calls) == 16 + 16  # The resumed run re-evaluated nothing it had finished.


def _episodes(rewards_and_validity, phase="rnas", macs=None, selection=None):
  n = len(rewards_and_validity)
  macs, selection = macs or [100] * n, selection or [None] * n
  return [Episode(phase, i, 0, "t", reward=r, valid=v, macs=macs[i],
                  selection_accuracy=selection[i], spec={"student": i})
          for i, (r, v) in enumerate(rewards_and_validity)]


def test_top_within_budget_and_selected_deliver_only_students_that_fit():
  episodes = _episodes([(0.2, True), (-1.0, False), (0.5, True), (0.95, True), (0.9, False),
                        (0.4, True)], macs=[100, 0, 100, 150, 100, 90],
                       selection=[0.3, None, 0.1, 0.99, None, 0.35])
  top = search.top_within_budget(episodes, budget_macs=100, k=3)
  assert top == [episodes[2], episodes[5], episodes[0]]  # 3 is over budget, 1 and 4 invalid.
  assert search.selected(top) is episodes[5]  # The best on the selection set, not by reward.
  assert search.selected([]) is None
  assert search.top_within_budget(episodes, budget_macs=50, k=3) == []  # None fits.
  no_selection_set = _episodes([(0.2, True), (0.5, True)])
  assert search.selected(no_selection_set) is no_selection_set[1]


def test_a_student_evaluated_twice_is_one_candidate():
  episodes = _episodes([(0.5, True), (0.4, True), (0.5, True)])
  episodes[2] = dataclasses.replace(episodes[2], spec=episodes[0].spec)
  assert search.top_within_budget(episodes, 100, 3) == [episodes[0], episodes[1]]


def test_evaluations_to_best_and_summary():
  episodes = _episodes([(0.2, True), (-1.0, False), (0.5, True), (0.5, True), (0.9, False)])
  assert search.evaluations_to_best(_episodes([(r, True) for r in (0.1, 0.4, 0.3, 0.4)])) == 2
  assert search.summary({"rnas": episodes, "random": []}) == {
      "rnas": {"evaluations": 5, "best_reward": 0.9, "evaluations_to_best": 5}}
