"""Task observations: normalised features, LIPS against an exact SVD, the probe cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax import arch, models, parallel, state
from rcnas_jax.state import Task, ThreatModel

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 8, 2)))


def test_stage_features_of_wrn_28_10():
  features = state.stage_features(arch.wide_resnet(28, 10))
  expected = [[0.5, math.log2(5) / 6, math.log2(160) / 11, 0.0],
              [1.0, math.log2(5) / 6, math.log2(320) / 11, 0.0],
              [1.0, math.log2(5) / 6, math.log2(640) / 11, 0.0]]
  np.testing.assert_allclose(features, expected, rtol=1e-6)


def test_task_features_follow_the_definition():
  task = Task("cifar10", ThreatModel("pgd", 8 / 255, 10), "WRN-28-10", 2_000_000_000)
  probe = {"lips": 3.0, "teacher_error": 0.45}
  features = state.task_features(task, probe, 5_243_000_000, 10, (32, 32, 3))
  np.testing.assert_allclose(features, [
      math.log1p(3.0), 2e9 / 5.243e9, math.log10(2e9) / 10, math.log(10) / math.log(1000),
      math.log(3072) / math.log(12288), 0.45], rtol=1e-6)
  assert task.key() == "cifar10|pgd10-linf-0.03137|WRN-28-10|2000000000"


def test_clean_lips_is_the_mean_exact_jacobian_norm_and_error_is_exact():
  model = models.build(SPEC, 4)
  variables = models.init(model, jax.random.key(0), (6, 6, 1))
  images = jax.random.uniform(jax.random.key(1), (8, 6, 6, 1))
  labels = jnp.arange(8) % 4
  stats = state.probe_statistics(variables, images, labels, jax.random.key(2),
                                 threat=ThreatModel("clean", 0.1), model=model, num_iters=100)
  f = lambda x: model.apply(variables, x[None])[0]
  exact = [float(np.linalg.svd(np.asarray(jax.jacobian(f)(x)).reshape(4, -1),
                               compute_uv=False)[0]) for x in images]
  assert float(stats["lips"]) == pytest.approx(np.mean(exact), rel=1e-2)
  error = np.mean(np.argmax(model.apply(variables, images), -1) != labels)
  assert float(stats["teacher_error"]) == pytest.approx(error)


@pytest.mark.parametrize("threat", [ThreatModel("pgd", 0.3, 10), ThreatModel("apgd-ce", 0.3, 10)])
def test_an_attack_raises_the_teacher_error(threat):
  model = models.build(SPEC, 4)
  variables = models.init(model, jax.random.key(0), (6, 6, 1))
  noise = lambda path, v: v if "var" in jax.tree_util.keystr(path) else v + 0.5 * jax.random.normal(
      jax.random.key(len(jax.tree_util.keystr(path))), v.shape)
  variables = jax.tree_util.tree_map_with_path(noise, variables)
  images = jax.random.uniform(jax.random.key(1), (32, 6, 6, 1))
  labels = jnp.argmax(model.apply(variables, images), -1)  # Clean error 0.
  assert len(np.unique(labels)) > 1
  stats = state.probe_statistics(variables, images, labels, jax.random.key(2),
                                 threat=threat, model=model)
  assert float(stats["teacher_error"]) > 0.3


def test_probe_cache_computes_once_and_persists(tmp_path):
  path = str(tmp_path / "probes.json")
  calls = []
  compute = lambda: calls.append(1) or {"lips": 1.5, "teacher_error": 0.25}
  cache = state.ProbeCache(path)
  assert cache.get("k", compute) == cache.get("k", compute) == {"lips": 1.5,
                                                               "teacher_error": 0.25}
  assert state.ProbeCache(path).get("k", compute)["lips"] == 1.5
  assert len(calls) == 1


def test_observation_shapes():
  task = Task("digits", ThreatModel("cw", 0.1, 10), "tiny-8", 100_000)
  observation = state.observe(task, {"lips": 0.5, "teacher_error": 0.1}, 10, (8, 8, 1))
  assert observation.stages.shape == (3, 4) and observation.task.shape == (6,)


@pytest.mark.parametrize("batch", [16, 12])  # 12 does not split over 8 devices: replicated.
def test_probe_on_eight_devices_matches_one(batch):
  model = models.build(SPEC, 4)
  variables = models.init(model, jax.random.key(0), (6, 6, 1))
  images = np.asarray(jax.random.uniform(jax.random.key(1), (batch, 6, 6, 1)))
  labels = np.arange(batch) % 4
  settings = dict(threat=ThreatModel("pgd", 0.1, 3), model=model, num_iters=10)
  one = state.probe_statistics_on_mesh(parallel.data_mesh(jax.devices()[:1]), variables, images,
                                       labels, jax.random.key(2), **settings)
  eight = state.probe_statistics_on_mesh(parallel.data_mesh(), variables, images, labels,
                                         jax.random.key(2), **settings)
  assert one["lips"] > 0
  assert eight == pytest.approx(one, rel=1e-4, abs=1e-6)
