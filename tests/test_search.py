"""Search: task sampling, policy updates that learn, exact resume of a phase."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax import arch, config as config_lib, data, env as env_lib, policy, search
from rcnas_jax.state import Task, ThreatModel


def _config():
  c = config_lib.base_config()
  c.search.update(datasets=("digits", "mnist5k"), attacks=("fgsm", "pgd-5", "cw-5"),
                  teachers=("tiny-8", "WRN-10-2"), students_per_update=4)
  c.search.target.update(dataset="digits", attack="pgd-5", teacher="tiny-8")
  c.search.policy.update(hidden=16, learning_rate=0.03, entropy_weight=0.0)
  return c


INFOS = {"digits": data.DatasetInfo("digits", 10, (8, 8, 1), (0.3,), (0.4,)),
         "mnist5k": data.DatasetInfo("mnist5k", 10, (28, 28, 1), (0.1,), (0.3,))}


def test_parse_attack():
  assert search.parse_attack("pgd-7", 0.1) == ThreatModel("pgd", 0.1, 7)
  assert search.parse_attack("fgsm", 0.1).num_steps == 1
  assert search.parse_attack("apgd-20", 0.1) == ThreatModel("apgd-ce", 0.1, 20)
  with pytest.raises(ValueError, match="pgd-<steps>"):
    search.parse_attack("pgd", 0.1)


def test_meta_tasks_are_deterministic_and_never_the_target():
  c = _config()
  target = search.target_task(c, 8, 10, 1)
  assert target.budget_macs == int(0.4 * arch.count_macs(arch.TEACHERS["tiny-8"], 8, 10, 1))
  tasks = [search.meta_task(c, i, target, INFOS) for i in range(60)]
  assert tasks == [search.meta_task(c, i, target, INFOS) for i in range(60)]
  assert all((t.dataset, t.attack) != (target.dataset, target.attack) for t in tasks)
  assert {t.dataset for t in tasks} == {"digits", "mnist5k"}
  assert len({t.teacher for t in tasks}) == 2
  # Every (dataset, attack) pair but the target's appears once in each cycle of 5 updates.
  assert len({(t.dataset, t.attack) for t in tasks[:5]}) == 5
  for t in tasks:
    info = INFOS[t.dataset]
    macs = arch.count_macs(arch.TEACHERS[t.teacher], info.image_shape[0], 10, 1)
    assert 0.2 * macs <= t.budget_macs <= 0.6 * macs


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
  state = search.fresh_search_state(c, observation)
  p = search.PolicySettings(**c.search.policy)
  network = search._network(p.hidden, 3)
  tx = __import__("optax").adam(p.learning_rate)
  params, opt_state = state["params"], state["opt_state"]
  means = []
  for i in range(60):
    actions = search.sample_actions(params, observation, jax.random.key(i), network=network,
                                    num_students=16)
    rewards = _synthetic_reward(actions)
    means.append(float(rewards.mean()))
    params, opt_state, info = search.update(params, opt_state, observation, actions, rewards,
                                            network=network, tx=tx, p=p)
  assert np.mean(means[-10:]) > np.mean(means[:10]) + 0.3
  assert abs(float(info["value"]) - np.mean(means[-10:])) < 0.5  # The baseline tracks rewards.


def test_random_actions_cover_the_space():
  actions = search.random_actions(jax.random.key(0), 3, 500)
  ratios = jax.nn.sigmoid(actions.depth_logit)
  assert 0.0 < float(ratios.min()) < 0.05 and 0.95 < float(ratios.max()) < 1.0
  assert 0.4 < float(actions.robust.mean()) < 0.6
  students = [search.stage_actions(actions, i) for i in range(3)]
  assert all(len(s) == 3 and 0 < s[0].depth_ratio < 1 for s in students)


def _fake_environment(monkeypatch, c):
  """An environment whose episodes score actions by a formula instead of training."""
  calls = []

  def episode(env, task, actions):
    calls.append(actions)
    score = np.mean([a.depth_ratio - a.width_ratio + a.robust for a in actions])
    return {"reward": float(score), "valid": True, "robust_accuracy": float(score), "macs": 1,
            "params": 1, "spec": None, "cached": False, "reason": ""}

  monkeypatch.setattr(env_lib, "episodes",
                      lambda env, task, students: [episode(env, task, a) for a in students])
  monkeypatch.setattr(env_lib, "observe", lambda env, task: _observation())
  environment = env_lib.Environment(c, {}, {}, None, env_lib.EvaluationCache(None), None)
  return environment, calls


def test_a_stopped_phase_resumes_exactly(tmp_path, monkeypatch):
  c = _config()
  environment, calls = _fake_environment(monkeypatch, c)
  task = Task("digits", ThreatModel("pgd", 0.1, 5), "tiny-8", 100)
  fresh = search.fresh_search_state(c, _observation())
  straight, episodes = search.run_phase("finetune", environment, lambda i: task, 4, fresh,
                                        str(tmp_path / "a"), progress=False)
  search.run_phase("finetune", environment, lambda i: task, 2, fresh, str(tmp_path / "b"),
                   progress=False)
  resumed, resumed_episodes = search.run_phase("finetune", environment, lambda i: task, 4, fresh,
                                               str(tmp_path / "b"), progress=False)
  assert int(resumed["iteration"]) == 4 and len(resumed_episodes) == 16
  assert [e["reward"] for e in resumed_episodes] == [e["reward"] for e in episodes]
  for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(a, b)
  assert len(calls) == 16 + 16  # The resumed run re-evaluated nothing it had finished.


def test_best_episode_and_evaluations_to_best():
  episodes = [{"reward": r, "valid": v} for r, v in [(0.2, True), (-1.0, False), (0.5, True),
                                                      (0.5, True), (0.9, False)]]
  assert search.best_episode(episodes) is episodes[2]
  assert search.evaluations_to_best([{"reward": r} for r in (0.1, 0.4, 0.3, 0.4)]) == 2
