"""Device meshes and shardings: data parallelism is `jax.jit` over a `NamedSharding`.

Every batch is split along the mesh's `data` axis; states are replicated. Under jit, BatchNorm
statistics stay global, so results match one device up to float reassociation.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all of them) with axis `data`."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def candidate_meshes(num_slices: int, devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
  """`num_slices` disjoint data meshes over equal shares of the devices: the candidate axis."""
  devices = list(jax.devices() if devices is None else devices)
  if num_slices < 1 or len(devices) % num_slices:
    raise ValueError(f"{num_slices} candidate slices do not divide {len(devices)} devices")
  size = len(devices) // num_slices
  return [data_mesh(devices[i * size:(i + 1) * size]) for i in range(num_slices)]


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Host arrays placed on the mesh, split along their leading axis."""
  sharding = batch_sharded(mesh)
  return tuple(jax.device_put(a, sharding) for a in arrays)


def replicate(mesh: Mesh, tree):
  """A pytree placed whole on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
