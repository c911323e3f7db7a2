"""Device meshes, shardings and multi-host input: every loop is `jax.jit` over a `NamedSharding`.

The mesh has two axes. `candidate` holds independent slices, each of which can train and
evaluate a different candidate student (`candidate_meshes`); `data` splits a batch within a
slice. A loop over one network uses the whole mesh and splits its batch over both axes; states
are replicated. Under jit, BatchNorm statistics stay global, so results match one device up to
float reassociation.

Multi-host: `jax.devices()` spans every process. Each process feeds only the rows of a global
batch that its own devices hold (`process_rows`), so the global batch, and every result, is the
same whatever the number of processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
from typing import Callable, Mapping, Sequence

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CANDIDATE_AXIS = "candidate"
DATA_AXIS = "data"
AXES = (CANDIDATE_AXIS, DATA_AXIS)

# ---------------------------------------------------------------------------------------------
# Meshes.
# ---------------------------------------------------------------------------------------------


def make_mesh(candidates: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (candidates, rest) mesh over `devices` (default: all), grouped by process."""
  devices = list(jax.devices() if devices is None else devices)
  if candidates < 1 or len(devices) % candidates:
    raise ValueError(f"{candidates} candidate slices do not divide {len(devices)} devices")
  # Grouping by process keeps each process's rows of a batch contiguous (see process_rows).
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices).reshape(candidates, -1), AXES)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of one candidate slice: every device splits the batch."""
  return make_mesh(1, devices)


def candidate_slices(requested: int, students_per_update: int, num_devices: int,
                     num_processes: int = 1) -> int:
  """How many students of one update are evaluated concurrently (config.parallel.candidates).

  Auto (`requested` 0): gcd(M, devices) in one process; 1 across processes, where every
  program spans all devices.
  """
  if requested:
    return requested
  if num_processes > 1:
    return 1
  return math.gcd(students_per_update, num_devices)


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
  """The mesh of config.parallel over every device of every process."""
  return make_mesh(candidate_slices(config.parallel.candidates,
                                    config.search.students_per_update, jax.device_count(),
                                    jax.process_count()))


def slices(mesh: Mesh) -> list[Mesh]:
  """The rows of a (candidate, data) mesh, each a (1, data) mesh that trains its own student."""
  return [Mesh(row[None], AXES) for row in mesh.devices]


def candidate_meshes(num_slices: int, devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
  """`num_slices` disjoint (1, data) meshes over equal shares of the devices: the candidate axis."""
  return slices(make_mesh(num_slices, devices))


def num_batch_devices(mesh: Mesh) -> int:
  """How many ways a batch is split: every device of the mesh."""
  return mesh.devices.size


# ---------------------------------------------------------------------------------------------
# Shardings and placement.
# ---------------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over both mesh axes."""
  return NamedSharding(mesh, PartitionSpec(AXES))


def process_rows(mesh: Mesh, global_size: int) -> slice:
  """The rows of a global batch of `global_size` that this process's devices hold."""
  sharding = batch_sharded(mesh)
  if global_size % num_batch_devices(mesh):
    raise ValueError(f"a batch of {global_size} does not split over {mesh.devices.size} devices")
  ranges = sorted({(i[0].start or 0, i[0].stop or global_size)
                   for i in sharding.addressable_devices_indices_map((global_size,)).values()})
  if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
    raise ValueError(f"this process's rows are not contiguous: {ranges}")
  return slice(ranges[0][0], ranges[-1][1])


def shard_local_batch(mesh: Mesh, global_size: int, *local: np.ndarray) -> tuple[jax.Array, ...]:
  """This process's rows (`process_rows`) of a global batch, assembled into global arrays."""
  sharding = batch_sharded(mesh)
  return tuple(jax.make_array_from_process_local_data(sharding, a, (global_size, *a.shape[1:]))
               for a in local)


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Whole host batches (the same on every process) split over the mesh along the leading axis.

  Each process copies only its own rows.
  """
  rows = process_rows(mesh, len(arrays[0]))
  return shard_local_batch(mesh, len(arrays[0]), *(np.asarray(a)[rows] for a in arrays))


def shard_or_replicate(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Host arrays split over the mesh when their length divides over it, else replicated."""
  if len(arrays[0]) % num_batch_devices(mesh) == 0:
    return shard_batch(mesh, *arrays)
  return replicate(mesh, tuple(np.asarray(a) for a in arrays))


def replicate(mesh: Mesh, tree):
  """A pytree placed whole on every device of the mesh."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  # Across processes, device_put takes host values only (each process passes the same ones).
  return jax.tree.map(lambda x: _replicate_across_processes(x, sharding), tree)


def _replicate_across_processes(x, sharding: NamedSharding):
  """One leaf through the host; a PRNG key travels as its raw key data."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = jax.device_put(_host_value(jax.random.key_data(x)), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.device_put(_host_value(x), sharding)


def _host_value(x):
  """A local value as numpy; a global array is read through its (replicated) local shard."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded array whole, as numpy, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree):
  """A replicated (or local) pytree as numpy arrays, readable on every process."""
  return jax.tree.map(_host_value, tree)


# ---------------------------------------------------------------------------------------------
# Multi-process runs.
# ---------------------------------------------------------------------------------------------


def launched_by_cluster(environ: Mapping[str, str]) -> bool:
  """Whether a launcher started this process as one of several (JAX, Slurm or Open MPI)."""
  slurm = all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID"))
  return ("JAX_COORDINATOR_ADDRESS" in environ
          or (slurm and int(environ.get("SLURM_NTASKS", "1")) > 1)
          or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def distributed_arguments(d: ml_collections.ConfigDict) -> dict:
  """jax.distributed.initialize's arguments from config.distributed (unset ones auto-detected)."""
  arguments = {}
  if d.coordinator_address:
    arguments["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    arguments["num_processes"] = d.num_processes
  if d.process_id >= 0:
    arguments["process_id"] = d.process_id
  return arguments


def maybe_initialize_distributed(config: ml_collections.ConfigDict,
                                 environ: Mapping[str, str] | None = None) -> bool:
  """Starts JAX's distributed runtime when configured or launched so; True when it runs.

  Must be called before any JAX computation. config.distributed.enabled (or a coordinator
  address) forces it; otherwise the launcher's environment decides (`launched_by_cluster`).
  """
  if jax.distributed.is_initialized():
    return True
  d = config.distributed
  environ = os.environ if environ is None else environ
  if not (d.enabled or d.coordinator_address or launched_by_cluster(environ)):
    return False
  jax.distributed.initialize(**distributed_arguments(d))
  return True


def is_primary() -> bool:
  """Whether this process writes files shared by all (logs, reports): process 0."""
  return jax.process_index() == 0


def on_slices(meshes: list[Mesh], jobs: list[Callable[[Mesh], object]]) -> list:
  """Runs `job(mesh)` for every job, one job at a time per mesh, the meshes concurrently.

  Returns the jobs' values in order. One thread per mesh: XLA compiles and runs without the
  GIL, so one student compiles while another's steps run (on CPU, where a search is compile-
  bound, the compiles themselves overlap too).
  """
  queue = collections.deque(enumerate(jobs))
  values = [None] * len(jobs)

  def worker(mesh: Mesh) -> None:
    while True:
      try:
        index, job = queue.popleft()
      except IndexError:
        return
      values[index] = job(mesh)

  if len(meshes) == 1:
    worker(meshes[0])
    return values
  with concurrent.futures.ThreadPoolExecutor(len(meshes)) as pool:
    for future in [pool.submit(worker, mesh) for mesh in meshes]:
      future.result()
  return values
