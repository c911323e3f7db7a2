"""Tasks: the target and meta-training draws, normalised features, LIPS against an exact SVD,
the probe cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import arch, models
from rcnas_jax.rl import tasks
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust.attacks import ThreatModel
from rcnas_jax.runtime import parallel

INFOS = {"digits": data.DatasetInfo("digits", 10, (8, 8, 1), (0.3,), (0.4,)),
         "mnist5k": data.DatasetInfo("mnist5k", 10, (28, 28, 1), (0.1,), (0.3,))}


def _search_config():
  c = config_lib.base_config()
  c.search.update(datasets=("digits", "mnist5k"), attacks=("fgsm", "pgd-5", "cw-5"),
                  teachers=("tiny-8", "WRN-10-2"))
  c.search.target.update(dataset="digits", attack="pgd-5", teacher="tiny-8")
  return c


def test_meta_tasks_are_deterministic_and_never_the_target():
  c = _search_config()
  target = tasks.target_task(c, 8, 10, 1)
  assert target.budget_macs == int(0.4 * arch.count_macs(arch.TEACHERS["tiny-8"], 8, 10, 1))
  drawn = [tasks.meta_task(c, i, target, INFOS) for i in range(60)]
  assert drawn == [tasks.meta_task(c, i, target, INFOS) for i in range(60)]
  assert all((t.dataset, t.attack) != (target.dataset, target.attack) for t in drawn)
  assert {t.dataset for t in drawn} == {"digits", "mnist5k"}
  assert len({t.teacher for t in drawn}) == 2
  # Every (dataset, attack) pair but the target's appears once in each cycle of 5 updates.
  assert len({(t.dataset, t.attack) for t in drawn[:5]}) == 5
  for t in drawn:
    info = INFOS[t.dataset]
    macs = arch.count_macs(arch.TEACHERS[t.teacher], info.image_shape[0], 10, 1)
    assert 0.2 * macs <= t.budget_macs <= 0.6 * macs


SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 8, 2)))


def test_stage_features_of_wrn_28_10():
  features = tasks.stage_features(arch.wide_resnet(28, 10))
  expected = [[0.5, math.log2(5) / 6, math.log2(160) / 11, 0.0],
              [1.0, math.log2(5) / 6, math.log2(320) / 11, 0.0],
              [1.0, math.log2(5) / 6, math.log2(640) / 11, 0.0]]
  np.testing.assert_allclose(features, expected, rtol=1e-6)


def test_task_features_follow_the_definition():
  task = Task("cifar10", ThreatModel("pgd", eps=8 / 255, num_steps=10), "WRN-28-10", 2_000_000_000)
  probe = {"lips": 3.0, "teacher_error": 0.45}
  features = tasks.task_features(task, probe, 5_243_000_000, 10, (32, 32, 3))
  np.testing.assert_allclose(features, [
      math.log1p(3.0), 2e9 / 5.243e9, math.log10(2e9) / 10, math.log(10) / math.log(1000),
      math.log(3072) / math.log(12288), 0.45], rtol=1e-6)
  assert task.key() == "cifar10|pgd10-linf-0.03137|WRN-28-10|2000000000"


def test_clean_lips_is_the_mean_exact_jacobian_norm_and_error_is_exact():
  model = models.build(SPEC, 4)
  variables = models.init(model, jax.random.key(0), (6, 6, 1))
  images = jax.random.uniform(jax.random.key(1), (8, 6, 6, 1))
  labels = jnp.arange(8) % 4
  stats = tasks.probe_statistics(variables, images, labels, jax.random.key(2),
                                 threat=ThreatModel("clean", eps=0.1), model=model, num_iters=100)
  f = lambda x: model.apply(variables, x[None])[0]
  exact = [float(np.linalg.svd(np.asarray(jax.jacobian(f)(x)).reshape(4, -1),
                               compute_uv=False)[0]) for x in images]
  assert float(stats["lips"]) == pytest.approx(np.mean(exact), rel=1e-2)
  error = np.mean(np.argmax(model.apply(variables, images), -1) != labels)
  assert float(stats["teacher_error"]) == pytest.approx(error)


@pytest.mark.parametrize("threat", [ThreatModel("pgd", eps=0.3, num_steps=10),
                                    ThreatModel("apgd-ce", eps=0.3, num_steps=10)])
def test_an_attack_raises_the_teacher_error(threat):
  model = models.build(SPEC, 4)
  variables = models.init(model, jax.random.key(0), (6, 6, 1))
  noise = lambda path, v: v if "var" in jax.tree_util.keystr(path) else v + 0.5 * jax.random.normal(
      jax.random.key(len(jax.tree_util.keystr(path))), v.shape)
  variables = jax.tree_util.tree_map_with_path(noise, variables)
  images = jax.random.uniform(jax.random.key(1), (32, 6, 6, 1))
  labels = jnp.argmax(model.apply(variables, images), -1)  # Clean error 0.
  assert len(np.unique(labels)) > 1
  stats = tasks.probe_statistics(variables, images, labels, jax.random.key(2),
                                 threat=threat, model=model)
  assert float(stats["teacher_error"]) > 0.3


def test_probe_cache_computes_once_and_persists(tmp_path):
  path = str(tmp_path / "probes.json")
  calls = []
  compute = lambda: calls.append(1) or {"lips": 1.5, "teacher_error": 0.25}
  cache = tasks.ProbeCache(path)
  assert cache.get("k", compute) == cache.get("k", compute) == {"lips": 1.5,
                                                               "teacher_error": 0.25}
  assert tasks.ProbeCache(path).get("k", compute)["lips"] == 1.5
  assert len(calls) == 1


def test_observation_of_tiny_8_on_digits_by_hand():
  task = Task("digits", ThreatModel("cw", eps=0.1, num_steps=10), "tiny-8", 100_000)
  observation = tasks.observe(task, {"lips": 0.5, "teacher_error": 0.1}, 10, (8, 8, 1))
  # tiny-8: stem 16, stages 2x8 /1, 2x16 /2, 2x32 /2, all basic; 464,192 MACs on 8x8x1 images
  # (count_macs, itself checked against the model's jaxpr in test_arch).
  depth = math.log2(3) / 6
  np.testing.assert_allclose(observation.stages, [[0.5, depth, 3 / 11, 0.0],
                                                  [1.0, depth, 4 / 11, 0.0],
                                                  [1.0, depth, 5 / 11, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(observation.task, [
      math.log1p(0.5), 100_000 / 464_192, 0.5, 1 / 3, math.log(64) / math.log(12_288), 0.1],
      rtol=1e-6)


@pytest.mark.parametrize("batch", [16, 12])  # 12 does not split over 8 devices: replicated.
def test_probe_on_eight_devices_matches_one(batch):
  model = models.build(SPEC, 4)
  variables = models.init(model, jax.random.key(0), (6, 6, 1))
  images = np.asarray(jax.random.uniform(jax.random.key(1), (batch, 6, 6, 1)))
  labels = np.arange(batch) % 4
  settings = dict(threat=ThreatModel("pgd", eps=0.1, num_steps=3), model=model, num_iters=10)
  one = tasks.probe_statistics_on_mesh(parallel.data_mesh(jax.devices()[:1]), variables, images,
                                       labels, jax.random.key(2), **settings)
  eight = tasks.probe_statistics_on_mesh(parallel.data_mesh(), variables, images, labels,
                                         jax.random.key(2), **settings)
  assert one["lips"] > 0
  assert eight == pytest.approx(one, rel=1e-4, abs=1e-6)
