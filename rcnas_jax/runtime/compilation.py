"""How many programs XLA compiles, and how long that takes, from JAX's own monitoring events.

On CPU a search is compile-bound, so each pipeline phase records its compiles beside its wall
time. `track()` counts, while it is open, every backend compilation (a persistent-cache load
counts too, and is also counted as a hit), the backend time, and the time spent tracing and
lowering to MLIR. Event names are those of jax 0.10.2 (`jax/_src/dispatch.py`, `compiler.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


@dataclasses.dataclass
class CompileStats:
  """Compilations seen by one `track()`."""

  compiles: int = 0  # Programs built by the backend or loaded from the persistent cache.
  compile_seconds: float = 0.0  # Backend time of those (a cache load is fast).
  trace_seconds: float = 0.0  # Tracing to jaxprs and lowering to MLIR.
  cache_hits: int = 0  # Programs loaded from the persistent compilation cache.
  cache_misses: int = 0  # Programs compiled and then written to the cache.

  def to_dict(self) -> dict:
    """JSON-ready, times rounded to 10 ms."""
    return {"compiles": self.compiles, "compile_seconds": round(self.compile_seconds, 2),
            "trace_seconds": round(self.trace_seconds, 2), "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses}

  def describe(self) -> str:
    """One line, e.g. '12 compiles, 30.1 s compiling (+2.0 s tracing), 4 from the cache'."""
    return (f"{self.compiles} compiles, {self.compile_seconds:.1f} s compiling "
            f"(+{self.trace_seconds:.1f} s tracing), {self.cache_hits} from the cache")


def record_duration(stats: CompileStats, event: str, seconds: float) -> None:
  """Adds one duration event to `stats`."""
  if event == BACKEND_COMPILE_EVENT:
    stats.compiles += 1
    stats.compile_seconds += seconds
  elif event in (TRACE_EVENT, LOWER_EVENT):
    stats.trace_seconds += seconds


def record_count(stats: CompileStats, event: str) -> None:
  """Adds one count event to `stats`."""
  if event == CACHE_HIT_EVENT:
    stats.cache_hits += 1
  elif event == CACHE_MISS_EVENT:
    stats.cache_misses += 1


@contextlib.contextmanager
def track() -> Iterator[CompileStats]:
  """Counts compilations until the block ends (nested blocks each count their own)."""
  stats = CompileStats()
  on_duration = lambda event, seconds, **_: record_duration(stats, event, seconds)
  on_event = lambda event, **_: record_count(stats, event)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield stats
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)

