"""Orbax checkpoints of pytrees in a workdir: save, and restore the latest by itself.

Restores always pass the abstract target tree, so arrays come back with the right shapes,
dtypes and shardings, bit-identical to what was saved.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  """A manager keeping the newest `keep` checkpoints under `directory`."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, tree: Any, meta: dict | None = None) -> None:
  """Saves `tree` (and JSON `meta`) as checkpoint `step`, asynchronously."""
  args = {"state": ocp.args.StandardSave(tree)}
  if meta is not None:
    args["meta"] = ocp.args.JsonSave(meta)
  mngr.save(step, args=ocp.args.Composite(**args))


def abstract(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """Shape/dtype structs of `tree` (with `sharding`, when given) for restoring into."""
  def struct(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))
  return jax.tree.map(struct, tree)


def restore_latest(mngr: ocp.CheckpointManager, like: Any,
                   sharding: jax.sharding.Sharding | None = None) -> Any | None:
  """The newest checkpoint restored into the structure of `like`, or None when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract(like, sharding))))
  return restored["state"]


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """The JSON metadata saved with a checkpoint (the newest by default)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
