"""Metrics as JSONL lines in the workdir, and progress bars for long loops."""

from __future__ import annotations

import json
import os
import time

import tqdm


class MetricsWriter:
  """Appends one JSON object per call to <workdir>/<name>.jsonl."""

  def __init__(self, workdir: str, name: str = "metrics"):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"{name}.jsonl")

  def write(self, step: int, values: dict) -> None:
    """Records `values` at `step`, with the wall-clock time."""
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")


def read(path: str) -> list[dict]:
  """All records of a JSONL metrics file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def progress(total: int, desc: str, initial: int = 0, disable: bool = False) -> tqdm.tqdm:
  """A progress bar that also works when resumed part-way (`initial`)."""
  return tqdm.tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                   leave=True, mininterval=2.0)
