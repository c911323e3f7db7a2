"""Meshes, shardings, process-local batches and the distributed start-up decision (8 devices)."""

import jax
import numpy as np
import pytest

from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import arch, models
from rcnas_jax.robust import training
from rcnas_jax.runtime import parallel

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2)))


def test_mesh_of_candidate_slices():
  mesh = parallel.make_mesh(2)
  assert mesh.axis_names == ("candidate", "data")
  assert mesh.devices.shape == (2, 4)
  slices = parallel.candidate_meshes(2)
  assert [s.devices.shape for s in slices] == [(1, 4), (1, 4)]
  assert [d.id for s in slices for d in s.devices.flat] == [d.id for d in jax.devices()]
  assert parallel.data_mesh().devices.shape == (1, 8)
  with pytest.raises(ValueError, match="3 candidate slices do not divide 8 devices"):
    parallel.make_mesh(3)


def test_mesh_from_config():
  c = config_lib.base_config()
  c.parallel.candidates = 4
  assert parallel.mesh_from_config(c).devices.shape == (4, 2)
  c.parallel.candidates = 0  # Auto: gcd(students per update, devices).
  c.search.students_per_update = 6
  assert parallel.mesh_from_config(c).devices.shape == (2, 4)


@pytest.mark.parametrize("candidates", [1, 2, 8])
def test_batch_splits_over_every_device_in_order(candidates):
  mesh = parallel.make_mesh(candidates)
  x = np.arange(16 * 3).reshape(16, 3)
  (sharded,) = parallel.shard_batch(mesh, x)
  np.testing.assert_array_equal(np.asarray(sharded), x)
  shards = sorted(sharded.addressable_shards, key=lambda s: s.device.id)
  assert [s.data.shape for s in shards] == [(2, 3)] * 8
  # Device i of the process-ordered mesh holds rows 2i and 2i+1.
  np.testing.assert_array_equal(np.asarray(shards[5].data), x[10:12])


def test_one_process_feeds_every_row():
  assert parallel.process_rows(parallel.make_mesh(2), 32) == slice(0, 32)
  with pytest.raises(ValueError, match="a batch of 12 does not split over 8 devices"):
    parallel.process_rows(parallel.data_mesh(), 12)


def test_replicate_and_read_back():
  tree = {"a": np.arange(4.0), "b": {"c": np.float32(2.5)}}
  placed = parallel.replicate(parallel.make_mesh(2), tree)
  assert placed["a"].sharding.is_fully_replicated
  assert len(placed["a"].sharding.device_set) == 8
  back = parallel.to_host(placed)
  np.testing.assert_array_equal(back["a"], tree["a"])
  assert back["b"]["c"] == 2.5


def test_launchers_that_start_distributed_runs():
  assert not parallel.launched_by_cluster({})
  assert parallel.launched_by_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0"}
  assert parallel.launched_by_cluster({**slurm, "SLURM_NTASKS": "2"})
  assert not parallel.launched_by_cluster({**slurm, "SLURM_NTASKS": "1"})
  assert parallel.launched_by_cluster({"OMPI_COMM_WORLD_SIZE": "4"})


def test_distributed_arguments_leave_unset_fields_to_auto_detection():
  d = config_lib.base_config().distributed
  assert parallel.distributed_arguments(d) == {}
  d.update(coordinator_address="127.0.0.1:9999", num_processes=2, process_id=1)
  assert parallel.distributed_arguments(d) == {"coordinator_address": "127.0.0.1:9999",
                                               "num_processes": 2, "process_id": 1}


def test_single_process_runs_do_not_start_the_distributed_runtime():
  assert not parallel.maybe_initialize_distributed(config_lib.base_config(), environ={})
  assert not jax.distributed.is_initialized()
  assert parallel.is_primary()


def _train(mesh, steps=3):
  c = config_lib.base_config()
  c.training.update(epochs=1, batch_size=16, learning_rate=0.05, log_every_steps=1)
  c.attack.update(eps=0.1, step_size=0.05, num_steps=2)
  split = data.load("digits", max_train_examples=64).train
  model = models.build(SPEC, 10, (0.3,), (0.4,))
  return training.train(model, split, (8, 8, 1), c, None, mesh, max_steps=steps, progress=False)


def test_training_on_a_candidate_mesh_and_on_one_slice_match_one_device():
  one = _train(parallel.data_mesh(jax.devices()[:1]))
  both_axes = _train(parallel.make_mesh(2))
  second_slice = _train(parallel.candidate_meshes(2)[1])
  assert second_slice["params"]["head"]["bias"].sharding.device_set == set(jax.devices()[4:])
  for other in (both_axes, second_slice):
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(other)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
