"""Test setup: 8 virtual CPU devices, a compilation cache, and no network."""

import os
import socket

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS, which jax reads once)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               ".cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

_connect = socket.socket.connect


def _loopback_only(self, address):
  """Allows connections to this machine only: a test must never reach a download."""
  host = address[0] if isinstance(address, tuple) else "localhost"
  loopback = host.startswith("127.") or host in ("localhost", "::1")
  if self.family != socket.AF_UNIX and not loopback:
    raise RuntimeError(f"test tried to reach the network ({address}): forbidden")
  return _connect(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
  """Blocks every non-loopback socket connection during each test."""
  monkeypatch.setattr(socket.socket, "connect", _loopback_only)


def pytest_collection_modifyitems(items):
  """Tests marked `long` (the tiny search and its interruptions) start first, beside the rest."""
  items.sort(key=lambda item: item.get_closest_marker("long") is None)  # Stable: long first.
