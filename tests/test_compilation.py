"""Compile counting from jax.monitoring events, checked against programs we compile ourselves."""

import jax
import jax.numpy as jnp
import numpy as np

from rcnas_jax.runtime import compilation


def test_counts_one_compile_per_new_shape_and_none_when_cached_in_memory():
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.123456)  # A program no other test compiles.
  with compilation.track() as stats:
    f(np.zeros(3, np.float32))
    f(np.ones(3, np.float32))  # Same shape: the in-memory cache, no compile.
    f(np.zeros(5, np.float32))
  assert stats.compiles == 2
  assert stats.compile_seconds > 0
  assert stats.trace_seconds > 0
  # Every compile either hit or missed the persistent cache that conftest enables.
  assert stats.cache_hits + stats.cache_misses == 2
  with compilation.track() as again:
    f(np.zeros(5, np.float32))
  assert again.compiles == 0 and again.compile_seconds == 0


def test_nested_blocks_count_their_own_and_stop_at_exit():
  g = jax.jit(lambda x: jnp.cos(x) - 0.654321)
  with compilation.track() as outer:
    g(np.zeros(2, np.float32))
    with compilation.track() as inner:
      g(np.zeros(4, np.float32))
  g(np.zeros(6, np.float32))
  assert (outer.compiles, inner.compiles) == (2, 1)


def test_records_and_describes():
  stats = compilation.CompileStats()
  compilation.record_duration(stats, compilation.BACKEND_COMPILE_EVENT, 1.25)
  compilation.record_duration(stats, compilation.LOWER_EVENT, 0.5)
  compilation.record_duration(stats, "/jax/other", 9.0)
  compilation.record_count(stats, compilation.CACHE_HIT_EVENT)
  assert stats.to_dict() == {"compiles": 1, "compile_seconds": 1.25, "trace_seconds": 0.5,
                             "cache_hits": 1, "cache_misses": 0}
  assert stats.describe() == "1 compiles, 1.2 s compiling (+0.5 s tracing), 1 from the cache"
