"""Metrics as JSONL lines and TensorBoard event files in the workdir; progress bars."""

from __future__ import annotations

import os
import time

import tensorboardX
import tqdm

from rcnas_jax.runtime import store


class MetricsWriter:
  """Appends one JSON object per call to <workdir>/<name>.jsonl, and the numbers to TensorBoard."""

  def __init__(self, workdir: str, name: str = "metrics"):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"{name}.jsonl")
    self.board = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict) -> None:
    """Records `values` at `step`, with the wall-clock time; both files are flushed."""
    store.append_jsonl(self.path, [{"step": step, "time": time.time(), **values}])
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self.board.add_scalar(name, value, step)
    self.board.flush()

  def close(self) -> None:
    self.board.close()


def read(path: str) -> list[dict]:
  """All records of a JSONL metrics file (a torn last line dropped)."""
  return store.read_jsonl(str(path))


def progress(total: int, desc: str, initial: int = 0, disable: bool = False) -> tqdm.tqdm:
  """A progress bar that also works when resumed part-way (`initial`)."""
  return tqdm.tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                   leave=True, mininterval=2.0)
