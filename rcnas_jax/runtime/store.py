"""The workdir's JSON and JSONL files: atomic writes by process 0, torn last lines dropped.

Every file the pipeline keeps (caches, logs, reports) goes through here, so four promises hold
everywhere:
- a JSON or text file is replaced atomically (a sibling is written and fsynced, then renamed
  over it), so a kill or a full disk leaves the old version or the new one, never half of one;
- a JSONL append is one write of whole lines; a line cut by a kill is dropped, with a warning,
  when the file is next read, and a failed append is rolled back;
- only process 0 of a multi-process run writes;
- non-finite numbers are refused, so no NaN ever reaches a cache.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Iterable

import jax
from absl import logging


class StoreError(RuntimeError):
  """A workdir file could not be read or written; the message says which and why."""


def is_writer() -> bool:
  """Whether this process writes the workdir's files: process 0."""
  return jax.process_index() == 0


def _dumps(value: Any, path: str, indent: int | None = None) -> str:
  try:
    return json.dumps(value, indent=indent, allow_nan=False)
  except ValueError as error:  # NaN or infinity somewhere in `value`.
    raise StoreError(f"refusing to write a non-finite number to {path}: {error}") from None


def _write_failed(path: str, error: OSError) -> StoreError:
  reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror or str(error)
  return StoreError(f"could not write {path}: {reason} (errno {error.errno}); the previous "
                    "version is intact")


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text` atomically (process 0 only)."""
  if not is_writer():
    return
  directory = os.path.dirname(os.path.abspath(path))
  tmp = f"{path}.tmp"
  try:
    os.makedirs(directory, exist_ok=True)
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as error:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise _write_failed(path, error) from None


def write_json(path: str, value: Any) -> None:
  """Replaces `path` with `value` as indented JSON, atomically (process 0 only)."""
  write_text(path, _dumps(value, path, indent=2) + "\n")


def read_json(path: str, default: Any = None) -> Any:
  """The JSON value at `path`, or `default` when there is no such file."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise StoreError(f"{path} is not valid JSON ({error}): it was not written by this "
                     "program; delete it to recompute it") from None


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file ([] when missing); a torn last line is dropped with a warning.

  A line is torn when a kill or a full disk cut it short: it lacks its newline or does not
  parse. Process 0 also cuts it off the file, so the next append starts on a fresh line.
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    content = f.read()
  lines = content.split(b"\n")
  records, kept_bytes = [], 0
  for number, line in enumerate(lines[:-1], start=1):
    try:
      records.append(json.loads(line) if line.strip() else None)
    except json.JSONDecodeError:
      if number < len(lines) - 1:
        raise StoreError(f"{path}:{number} is not a JSON line: the file was not written by "
                         "this program; delete it to recompute it") from None
      break  # The last line is torn even though its newline made it.
    kept_bytes += len(line) + 1
  if kept_bytes < len(content):
    logging.warning("%s: dropped a torn last line (%d bytes), left by an interrupted write; "
                    "its record will be recomputed", path, len(content) - kept_bytes)
    if is_writer():
      os.truncate(path, kept_bytes)
  return [r for r in records if r is not None]


def append_jsonl(path: str, records: Iterable[dict]) -> None:
  """Appends `records` as whole lines and syncs them to disk (process 0 only).

  On a failed write the file is cut back to its previous length, so no torn line remains.
  """
  text = "".join(_dumps(r, path) + "\n" for r in records)
  if not is_writer() or not text:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  size = os.path.getsize(path) if os.path.exists(path) else 0
  try:
    with open(path, "a") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  except OSError as error:
    os.truncate(path, size)
    raise _write_failed(path, error) from None


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  """Replaces `path` with `records` as JSON lines, atomically (process 0 only)."""
  write_text(path, "".join(_dumps(r, path) + "\n" for r in records))
