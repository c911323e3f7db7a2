"""The environment: reward, invalid students, proxy training on real digits, the cache."""

import jax
import pytest

from rcnas_jax import (arch, artifacts, config as config_lib, data, env as env_lib, models,
                       parallel, store)
from rcnas_jax.state import ProbeCache, Task, ThreatModel


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
  task = Task("digits", ThreatModel("fgsm", 0.1), "tiny-8", 100_000)
  all_down = tuple(arch.StageAction(1.0, 1.0, True, False) for _ in range(3))
  result = env_lib.episode(environment, task, all_down)
  assert result["reward"] == -1.0 and not result["valid"] and "1x1" in result["reason"]
  assert environment.cache.entries == {}


def test_episode_trains_evaluates_and_caches(tmp_path):
  environment = _environment(tmp_path)
  task = Task("digits", ThreatModel("pgd", 0.1, 2), "tiny-8", 200_000)
  actions = (arch.StageAction(0.5, 1.0, False, False), arch.StageAction(0.5, 0.5, True, False),
             arch.StageAction(0.5, 0.5, True, False))
  first = env_lib.episode(environment, task, actions)
  spec = arch.spec_from_dict(first["spec"])
  assert spec.depths == (1, 1, 1) and spec.widths == (8, 8, 16)
  assert first["macs"] == arch.count_macs(spec, 8, 10, 1) <= 200_000
  assert 0.0 <= first["robust_accuracy"] <= 1.0 and first["reward"] == first["robust_accuracy"]
  assert not first["cached"] and "PGD-2" in first["attack"]
  again = env_lib.episode(environment, task, actions)
  assert again["cached"] and again["reward"] == first["reward"]
  reloaded = env_lib.EvaluationCache(str(tmp_path / "evaluations.jsonl"))
  assert list(reloaded.entries) == list(environment.cache.entries)
  over_budget = Task("digits", ThreatModel("pgd", 0.1, 2), "tiny-8", first["macs"] // 2)
  penalised = env_lib.episode(environment, over_budget, actions)
  assert penalised["reward"] == pytest.approx(first["robust_accuracy"] / 4)


def test_candidate_slices_give_the_sequential_results(tmp_path):
  task = Task("digits", ThreatModel("pgd", 0.1, 2), "tiny-8", 200_000)
  narrow = tuple(arch.StageAction(0.5, 0.5, s > 0, False) for s in range(3))
  wide = tuple(arch.StageAction(1.0, 1.0, s > 0, False) for s in range(3))
  students = [narrow, wide, narrow]
  one_device = jax.devices()[:1]
  sequential = _environment(tmp_path / "a", parallel.candidate_meshes(1, one_device))
  concurrent = _environment(tmp_path / "b", parallel.candidate_meshes(2, jax.devices()[:2]))
  first = env_lib.episodes(sequential, task, students)
  second = env_lib.episodes(concurrent, task, students)
  assert [r["robust_accuracy"] for r in first] == [r["robust_accuracy"] for r in second]
  assert first[0]["spec"] != first[1]["spec"] and first[0]["reward"] == first[2]["reward"]
  loss = lambda env: sorted(e["final_loss"] for e in env.cache.entries.values())
  assert loss(sequential) == loss(concurrent)
  assert len(concurrent.cache.entries) == 2  # The repeated student trained once.
  assert [r["cached"] for r in second] == [False, False, False]


def test_observation_of_a_task_is_cached(tmp_path):
  environment = _environment(tmp_path)
  task = Task("digits", ThreatModel("fgsm", 0.1), "tiny-8", 200_000)
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
  task = Task("digits", ThreatModel("pgd", 0.1, 2), "tiny-8", 200_000)
  actions = tuple(arch.StageAction(0.5, 0.5, s > 0, False) for s in range(3))
  result = env_lib.episode(environment, task, actions)
  assert result["reward"] == -1.0 and not result["valid"]
  assert result["reason"].startswith("proxy training diverged: non-finite loss at step ")
  [record] = store.read_jsonl(str(tmp_path / "evaluations.jsonl"))
  assert record["failed"] == result["reason"] and "robust_accuracy" not in record
  assert "NaN" not in (tmp_path / "evaluations.jsonl").read_text()
  again = env_lib.episode(environment, task, actions)  # Recorded once, never retrained.
  assert again["cached"] and again["reason"] == result["reason"]
