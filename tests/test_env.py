"""The environment: reward, invalid students, episodes on real digits, the caches, the slices."""

import json

import jax
import pytest

from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import arch, models, space
from rcnas_jax.rl import env as env_lib, proxy
from rcnas_jax.rl.tasks import ProbeCache, Task
from rcnas_jax.robust.attacks import ThreatModel
from rcnas_jax.runtime import artifacts, parallel, store


def _episode(env, task, actions) -> env_lib.Episode:
  return env_lib.episodes(env, task, [actions], phase="rnas", iteration=0)[0]


def test_reward_is_accuracy_within_budget_and_penalised_over_it():
  assert env_lib.reward(0.6, 900, 1000, 2.0) == 0.6
  assert env_lib.reward(0.6, 2000, 1000, 2.0) == pytest.approx(0.6 / 4)
  assert env_lib.reward(0.6, 1000, 1000, 2.0) == 0.6


def _environment(tmp_path, slices=None):
  c = config_lib.base_config()
  c.attack.update(eps=0.1, step_size=0.05, num_steps=2)
  c.search.proxy.update(epochs=1, train_examples=128, validation_examples=64, batch_size=32,
                        attack_steps=1)
  digits = data.load("digits")
  teacher = arch.TEACHERS["tiny-8"]
  model = models.build(teacher, 10, digits.info.mean, digits.info.std)
  variables = models.init(model, jax.random.key(0), (8, 8, 1))
  return env_lib.Environment(c, {"digits": digits}, {("digits", "tiny-8"): variables},
                             parallel.data_mesh(jax.devices()[:2]),
                             env_lib.EvaluationCache(str(tmp_path / "evaluations.jsonl")),
                             ProbeCache(str(tmp_path / "probes.json")), slices)


def test_invalid_students_get_minus_one_and_are_never_trained(tmp_path):
  environment = _environment(tmp_path)
  task = Task("digits", ThreatModel("fgsm", eps=0.1), "tiny-8", 100_000)
  all_down = tuple(space.StageAction(1.0, 1.0, True, False) for _ in range(3))
  result = _episode(environment, task, all_down)
  assert result == env_lib.Episode("rnas", 0, 0, task.key(), reward=-1.0, valid=False,
                                   reason=result.reason, actions=[[1.0, 1.0, 1, 0]] * 3)
  assert "1x1" in result.reason and environment.cache.entries == {}


def test_episode_trains_evaluates_and_caches(tmp_path):
  environment = _environment(tmp_path)
  task = Task("digits", ThreatModel("pgd", eps=0.1, num_steps=2), "tiny-8", 200_000)
  actions = (space.StageAction(0.5, 1.0, False, False), space.StageAction(0.5, 0.5, True, False),
             space.StageAction(0.5, 0.5, True, False))
  first = _episode(environment, task, actions)
  spec = arch.spec_from_dict(first.spec)
  assert spec.depths == (1, 1, 1) and spec.widths == (8, 8, 16)
  assert first.macs == arch.count_macs(spec, 8, 10, 1) <= 200_000
  assert first.params == arch.count_params(spec, 10, 1)
  # The episode scores exactly what a direct proxy evaluation of the same student measures.
  direct = proxy.evaluate_student(environment.config, environment.datasets["digits"],
                                  environment.teachers[("digits", "tiny-8")], task, spec,
                                  environment.mesh)
  assert first.robust_accuracy == direct["robust_accuracy"] == first.reward
  assert not first.cached and first.attack == direct["attack"] == task.attack.describe()
  again = _episode(environment, task, actions)
  assert again.cached and again.reward == first.reward
  reloaded = env_lib.EvaluationCache(str(tmp_path / "evaluations.jsonl"))
  assert list(reloaded.entries) == list(environment.cache.entries)
  over_budget = Task("digits", ThreatModel("pgd", eps=0.1, num_steps=2), "tiny-8",
                     first.macs // 2)
  penalised = _episode(environment, over_budget, actions)
  assert penalised.reward == pytest.approx(first.robust_accuracy / 4)


def test_candidate_slices_give_the_sequential_results(tmp_path):
  task = Task("digits", ThreatModel("pgd", eps=0.1, num_steps=2), "tiny-8", 200_000)
  narrow = tuple(space.StageAction(0.5, 0.5, s > 0, False) for s in range(3))
  wide = tuple(space.StageAction(1.0, 1.0, s > 0, False) for s in range(3))
  students = [narrow, wide, narrow]
  one_device = jax.devices()[:1]
  sequential = _environment(tmp_path / "a", parallel.candidate_meshes(1, one_device))
  concurrent = _environment(tmp_path / "b", parallel.candidate_meshes(2, jax.devices()[:2]))
  first = env_lib.episodes(sequential, task, students, phase="rnas", iteration=0)
  second = env_lib.episodes(concurrent, task, students, phase="rnas", iteration=0)
  assert [r.robust_accuracy for r in first] == [r.robust_accuracy for r in second]
  assert first[0].spec != first[1].spec and first[0].reward == first[2].reward
  loss = lambda env: sorted(e["final_loss"] for e in env.cache.entries.values())
  assert loss(sequential) == loss(concurrent)
  assert len(concurrent.cache.entries) == 2  # The repeated student trained once.
  assert [r.cached for r in second] == [False, False, False]
  assert [r.student for r in second] == [0, 1, 2]


def test_episodes_round_trip_through_their_dict():
  episode = env_lib.Episode("meta", 3, 1, "digits|fgsm-linf-0.1|tiny-8|100", reward=0.25,
                            valid=True, robust_accuracy=0.25, macs=10, params=20,
                            spec=arch.TEACHERS["tiny-8"].to_dict(), attack="FGSM")
  assert env_lib.Episode.from_dict(json.loads(json.dumps(episode.to_dict()))) == episode
  older = {k: v for k, v in episode.to_dict().items() if k != "attack"}  # Logs before `attack`.
  assert env_lib.Episode.from_dict(older).attack == ""


def test_observation_of_a_task_is_cached(tmp_path):
  environment = _environment(tmp_path)
  task = Task("digits", ThreatModel("fgsm", eps=0.1), "tiny-8", 200_000)
  observation = env_lib.observe(environment, task)
  assert observation.task.shape == (6,) and float(observation.task[1]) == pytest.approx(
      200_000 / arch.count_macs(arch.TEACHERS["tiny-8"], 8, 10, 1))
  key = artifacts.probe(environment.config, task.key(),
                        environment.teacher_weights[("digits", "tiny-8")])
  assert list(ProbeCache(str(tmp_path / "probes.json")).entries) == [key]


def test_a_diverged_student_is_a_failed_evaluation_and_no_nan_reaches_the_cache(tmp_path):
  environment = _environment(tmp_path)
  environment.config.search.proxy.learning_rate = 1e30
  environment.config.training.grad_clip = 0.0
  task = Task("digits", ThreatModel("pgd", eps=0.1, num_steps=2), "tiny-8", 200_000)
  actions = tuple(space.StageAction(0.5, 0.5, s > 0, False) for s in range(3))
  result = _episode(environment, task, actions)
  assert result.reward == -1.0 and not result.valid and result.robust_accuracy == 0.0
  assert result.reason.startswith("proxy training diverged: non-finite loss at step ")
  [record] = store.read_jsonl(str(tmp_path / "evaluations.jsonl"))
  assert record["failed"] == result.reason and "robust_accuracy" not in record
  assert "NaN" not in (tmp_path / "evaluations.jsonl").read_text()
  again = _episode(environment, task, actions)  # Recorded once, never retrained.
  assert again.cached and again.reason == result.reason
