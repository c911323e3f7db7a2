"""Checks a multi-process setup: every process trains the same tiny net for a few steps.

  python launch/check_distributed.py --steps=3 --out=params.npz

Start it exactly as `rcnas_jax.main` (see launch/README.md): each process joins JAX's
distributed runtime (from the flags below or the launcher's environment), feeds only its rows
of every global batch, and process 0 prints a checksum of the trained parameters and writes
them to --out. The numbers must not depend on how many processes and devices share the work.
For a local test on CPU: --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I --cpu_devices=2.
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags; the distributed ones fill config.distributed."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--coordinator_address", default="")
  p.add_argument("--num_processes", type=int, default=0)
  p.add_argument("--process_id", type=int, default=-1)
  p.add_argument("--cpu_devices", type=int, default=0, help="Run on N virtual CPU devices.")
  p.add_argument("--candidates", type=int, default=1, help="config.parallel.candidates")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", default="")
  p.add_argument("--workdir", default="", help="Checkpoint (and resume) here; '' = none.")
  return p.parse_args(argv)


def tiny_config(args: argparse.Namespace):
  """A TRADES run of a two-stage net on digits, batch 16, with the distributed fields set."""
  from rcnas_jax import config as config_lib
  c = config_lib.base_config()
  c.training.update(epochs=1, batch_size=16, learning_rate=0.05, log_every_steps=1)
  c.attack.update(eps=0.1, step_size=0.05, num_steps=2)
  c.parallel.candidates = args.candidates
  c.distributed.update(coordinator_address=args.coordinator_address,
                       num_processes=args.num_processes, process_id=args.process_id)
  return c


def train_tiny(config, mesh, steps: int, workdir: str = "") -> dict:
  """The trained parameters (as numpy, on every process) after `steps` steps."""
  from rcnas_jax import data
  from rcnas_jax.nets import arch, models
  from rcnas_jax.robust import training
  from rcnas_jax.runtime import parallel
  spec = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2)))
  dataset = data.load("digits", max_train_examples=64)
  model = models.build(spec, 10, dataset.info.mean, dataset.info.std)
  state = training.train(model, dataset.train, dataset.info.image_shape, config, workdir or None,
                         mesh, max_steps=steps, progress=False)
  return parallel.to_host(state["params"])


def checksum(params: dict) -> float:
  """The sum of every parameter: a quick fingerprint to compare runs by eye."""
  import jax
  import numpy as np
  return float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)))


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.cpu_devices:  # Before jax is imported: it reads these once.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
  import jax
  import numpy as np
  from rcnas_jax.runtime import parallel
  config = tiny_config(args)
  started = parallel.maybe_initialize_distributed(config)
  mesh = parallel.mesh_from_config(config)
  params = train_tiny(config, mesh, args.steps, args.workdir)
  key = parallel.replicate(mesh, jax.random.key(7))  # Keys cross processes as key data.
  key_data = parallel.to_host(jax.random.key_data(key)).tolist()
  print(f"process {jax.process_index()}/{jax.process_count()} (distributed: {started}), "
        f"{jax.local_device_count()} of {jax.device_count()} devices, mesh "
        f"{dict(mesh.shape)}, replicated key {key_data}: parameter checksum {checksum(params):.6f}",
        flush=True)
  if args.out and parallel.is_primary():
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(args.out, **flat)


if __name__ == "__main__":
  main()
