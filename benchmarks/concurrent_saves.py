"""What serialising Orbax saves costs: two training threads checkpointing at once.

  python benchmarks/concurrent_saves.py --params=2700000 --saves=20 --step_ms=50

Each thread stands for one final training on its own candidate slice: it runs `step_ms` of
device work (a jitted matmul loop) and then checkpoints a train state of `params` float32
parameters (x4: parameters, momentum and the two EMA copies), `saves` times. Two ways to make
the threads' saves safe, measured in the same run:
- `lock`: what checkpoint.save does: Orbax's asynchronous save, its blocking part under one
  process-wide lock, the writing in Orbax's background thread;
- `sync`: synchronous saves (`enable_async_checkpointing=False`), also under the lock, each
  blocking its thread for the whole write.
Printed per way: wall seconds for both threads to finish, and the mean seconds a thread spent
inside save calls. One thread alone, with asynchronous saves, is the reference.
"""

import os
import sys
import tempfile
import threading
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from rcnas_jax.runtime import checkpoint  # noqa: E402

flags.DEFINE_integer("params", 2_700_000, "Parameters of the trained network (WRN-16-4: 2.7M).")
flags.DEFINE_integer("saves", 20, "Checkpoints per thread.")
flags.DEFINE_integer("step_ms", 50, "Device work between two checkpoints, in milliseconds.")


def _state(device, params: int):
  """A train state's worth of arrays on `device`."""
  leaf = lambda i: jax.device_put(jnp.full((params,), float(i), jnp.float32), device)
  return {"params": leaf(0), "momentum": leaf(1), "ema_params": leaf(2), "ema_stats": leaf(3)}


def _work(device, milliseconds: int):
  """Roughly `milliseconds` of device work."""
  x = jax.device_put(jnp.ones((256, 256)), device)
  started = time.perf_counter()
  while (time.perf_counter() - started) * 1000 < milliseconds:
    x = jnp.tanh(x @ x)
  x.block_until_ready()


def _manager(directory: str, asynchronous: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(2), create=True,
      enable_async_checkpointing=asynchronous)
  return ocp.CheckpointManager(directory, options=options)


def _thread(root: str, name: str, device, asynchronous: bool, blocked: list) -> None:
  mngr = _manager(os.path.join(root, name), asynchronous)
  state = _state(device, flags.FLAGS.params)
  spent = 0.0
  for step in range(1, flags.FLAGS.saves + 1):
    _work(device, flags.FLAGS.step_ms)
    started = time.perf_counter()
    checkpoint.save(mngr, step, state)
    spent += time.perf_counter() - started
  checkpoint.wait(mngr)
  mngr.close()
  blocked.append(spent / flags.FLAGS.saves)


def measure(threads: int, asynchronous: bool) -> tuple[float, float]:
  """(wall seconds, mean seconds per save call) for `threads` threads saving concurrently."""
  blocked = []
  with tempfile.TemporaryDirectory() as root:
    workers = [threading.Thread(target=_thread, args=(root, f"t{i}", jax.devices()[i % 2],
                                                      asynchronous, blocked))
               for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
      w.start()
    for w in workers:
      w.join()
    return time.perf_counter() - started, sum(blocked) / len(blocked)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  measure(1, True)  # Warm-up: compiles and the first Orbax handlers.
  rows = [("one thread, asynchronous (reference)", *measure(1, True)),
          ("two threads, asynchronous, lock (ours)", *measure(2, True)),
          ("two threads, synchronous, lock", *measure(2, False))]
  megabytes = 4 * 4 * flags.FLAGS.params / 1e6
  print(f"{flags.FLAGS.saves} saves of {megabytes:.0f} MB per thread, {flags.FLAGS.step_ms} ms "
        "of device work between saves\n")
  print("| saves | wall (s) | per save call (s) |\n|---|---:|---:|")
  for name, wall, per_save in rows:
    print(f"| {name} | {wall:.2f} | {per_save:.3f} |")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
