"""Adversarial-training throughput: one device vs a mesh of all (virtual) devices, same run.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/train_throughput.py

Times the jitted TRADES step (PGD-10 inside, unrolled on CPU) after a warm-up compile, on
synthetic CIFAR-shaped batches. Prints images/s per mesh and the speed-up.
"""

import argparse
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rcnas_jax import config as config_lib  # noqa: E402
from rcnas_jax.nets import arch, models  # noqa: E402
from rcnas_jax.robust import attacks, training  # noqa: E402
from rcnas_jax.runtime import parallel  # noqa: E402


def images_per_second(mesh, spec, batch_size: int, steps: int, settings) -> float:
  """Steady-state images/s of the train step on `mesh`."""
  model = models.build(spec, 10)
  tx = training.optimizer(config_lib.base_config().training, 1000)
  state = parallel.replicate(mesh, training.create_state(model, tx, jax.random.key(0), (32, 32, 3)))
  step = training.make_train_step(model, tx, settings, mesh)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, batch_size).astype(np.int32)
  images, labels = parallel.shard_batch(mesh, images, labels)
  key = jax.random.key(1)
  state, _ = step(state, images, labels, key, None)  # Compile.
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = step(state, images, labels, key, None)
  jax.block_until_ready((state, out))
  return batch_size * steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="WRN-10-2")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--attack_steps", type=int, default=10)
  args = parser.parse_args()
  settings = training.TrainSettings(
      method="trades", attack=attacks.ThreatModel("pgd", eps=8 / 255, step_size=2 / 255,
                                                  num_steps=args.attack_steps),
      unroll=training.unroll_attack_loops("auto"))
  spec = arch.teacher(args.arch)
  print(f"{args.arch}, batch {args.batch_size}, TRADES with PGD-{args.attack_steps}, "
        f"{jax.default_backend()}, unrolled={settings.unroll}")
  results = {}
  for n in sorted({1, jax.device_count()}):
    mesh = parallel.data_mesh(jax.devices()[:n])
    results[n] = images_per_second(mesh, spec, args.batch_size, args.steps, settings)
    print(f"  {n} device(s): {results[n]:8.1f} images/s")
  if len(results) > 1:
    print(f"  speed-up: {results[jax.device_count()] / results[1]:.2f}x")


if __name__ == "__main__":
  main()
