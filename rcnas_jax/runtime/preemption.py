"""A polite stop: SIGTERM (a scheduler's preemption notice, `kill`) asks the job to save and exit.

`main` installs the handler. Long loops call `check` between units of work that are already
saved (a training step after its checkpoint, a search update, an evaluation batch); the first
check after the signal raises `Stopped`, which unwinds the job, and `main` exits 0 with a line
saying how to resume. Slice threads see the same request, so concurrent trainings stop too.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


class Stopped(Exception):
  """The job was asked to stop; everything it finished is saved in the workdir."""


def install() -> None:
  """Turns SIGTERM into a stop request (call from the main thread)."""
  signal.signal(signal.SIGTERM, lambda signum, frame: _requested.set())


def requested() -> bool:
  """Whether a stop was asked for."""
  return _requested.is_set()


def check(where: str) -> None:
  """Raises Stopped when a stop was asked for; `where` says what was saved last."""
  if _requested.is_set():
    raise Stopped(where)


def reset() -> None:
  """Forgets a stop request (tests, notebooks that continue after one)."""
  _requested.clear()
