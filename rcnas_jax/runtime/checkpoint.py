"""Orbax checkpoints of pytrees in a workdir: save, and restore the newest readable one.

Restores always pass the abstract target tree, so arrays come back with the right shapes,
dtypes and shardings, bit-identical to what was saved. A checkpoint that cannot be read (cut
short by a kill or a full disk) is reported, deleted, and the one before it is used.

Saves from several threads of one process are serialised. Orbax 0.12 numbers each save with a
process-global operation id (`OperationIdGenerator`, a class attribute) that a save increments
and then reads back several times while it sets up its signals (directory creation, commit).
Two trainings saving at once from two candidate-slice threads interleave those reads: one save
waits on the other's signal key ("Timeout waiting for key awaitable_signals_contract_N/
item_directory_creation" after 300 s) or both create the same temporary directory
("FileExistsError"). The lock covers only the blocking part of a save; the writes themselves
still finish in Orbax's background thread.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

_SAVE_LOCK = threading.Lock()  # One Orbax save at a time per process (see the docstring).


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the message names it, the cause and the last good one."""


def manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  """A manager keeping the newest `keep` checkpoints under `directory`."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _failed(mngr: ocp.CheckpointManager, error: Exception) -> CheckpointError:
  """The one-line error of a failed save: where, why, and the last good checkpoint."""
  chain, cause = [], error
  while cause is not None and len(chain) < 20:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  # TensorStore reports a full disk as RESOURCE_EXHAUSTED text, Python as errno ENOSPC.
  if any(getattr(e, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e)
         or "RESOURCE_EXHAUSTED" in str(e) for e in chain):
    reason = "the disk is full"
  else:
    reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
  steps = mngr.all_steps()
  last = f"checkpoint {max(steps)} is the last good one" if steps else "none is complete yet"
  return CheckpointError(f"could not write a checkpoint in {mngr.directory}: {reason}; {last} "
                         "(make room, then run the same command again to resume)")


def save(mngr: ocp.CheckpointManager, step: int, tree: Any) -> None:
  """Saves `tree` as checkpoint `step`; the writing finishes in the background.

  An error of the previous background save surfaces here, as a CheckpointError.
  """
  with _SAVE_LOCK:
    try:
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    except (OSError, ValueError) as error:
      raise _failed(mngr, error) from error


def wait(mngr: ocp.CheckpointManager) -> None:
  """Blocks until the background save is written; its error as a CheckpointError."""
  try:
    mngr.wait_until_finished()
  except Exception as error:  # Orbax wraps the writer's OSError in its own exceptions.
    raise _failed(mngr, error) from error


def abstract(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """Shape/dtype structs of `tree` (with `sharding`, when given) for restoring into."""
  def struct(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))
  return jax.tree.map(struct, tree)


def restore_latest(mngr: ocp.CheckpointManager, like: Any,
                   sharding: jax.sharding.Sharding | None = None,
                   max_step: int | None = None) -> Any | None:
  """The newest readable checkpoint (at most `max_step`) in the structure of `like`, or None.

  An unreadable checkpoint is deleted with a warning and the previous one is tried, so a run
  killed while a checkpoint was being finished falls back to the one before.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    if max_step is not None and step > max_step:
      continue
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract(like, sharding))))
    except Exception as error:  # Orbax and TensorStore raise many kinds on a damaged file.
      logging.warning("checkpoint %d in %s cannot be read (%s: %s); deleting it and falling "
                      "back to the previous one", step, mngr.directory, type(error).__name__,
                      str(error).splitlines()[0][:200] if str(error) else "")
      mngr.delete(step)
      continue
    return restored["state"]
  return None


def orbax_errors_in_one_line(record) -> bool:
  """A logging filter: an Orbax error keeps its first line (the job's `error:` line says more)."""
  if "/orbax/" in record.pathname:
    record.msg, record.args = str(record.getMessage()).splitlines()[0][:300], ()
    record.exc_info = record.exc_text = None
  return True
