"""APGD-CE throughput, ours (JAX) vs torchattacks 3.5.1, same network and images.

  python benchmarks/apgd_throughput.py   # needs torch and torchattacks (`make test` installs)

One run: a WRN-10-2 (random weights, converted 1:1 to PyTorch by `torch_export`) attacks the
same CIFAR-shaped random images with APGD-CE, 100 steps, L-inf eps 8/255. Ours runs as the
evaluation runs it, both ways: one program with a rolled loop, and one program per step from
a Python loop (`evaluate.stepped_from_host`, the CPU default). Labels are the model's
own predictions, so every image is attacked for all steps by both (torchattacks skips
misclassified ones). Ours: the batch sharded over all (virtual) CPU devices, timed after a
warm-up call (its compile included in "first call"). Prints images/s of each, the ratios and
the robust accuracies.
"""

import argparse
import functools
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchattacks  # noqa: E402

from rcnas_jax.nets import arch, models, torch_export  # noqa: E402
from rcnas_jax.robust import attacks, evaluate  # noqa: E402
from rcnas_jax.runtime import parallel  # noqa: E402

EPS = 8 / 255


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="WRN-10-2")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args()
  spec = arch.teacher(args.arch)
  mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
  model = models.build(spec, 10, mean, std)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, 32, 32, 3), np.uint8)
  images = pixels.astype(np.float32) / 255
  logits_fn = models.logits_fn(model, variables)
  labels = np.asarray(jnp.argmax(logits_fn(images), axis=1))
  print(f"{args.arch}, {args.batch_size} images 32x32x3, APGD-CE {args.steps} steps, "
        f"eps 8/255; {jax.device_count()} JAX CPU device(s), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads")

  mesh = parallel.data_mesh()
  threat = attacks.ThreatModel("apgd-ce", eps=EPS, num_steps=args.steps)
  v = parallel.replicate(mesh, variables)
  x, y = parallel.shard_batch(mesh, pixels, labels)
  ways = {"one rolled program": functools.partial(evaluate._correct, unroll=False),
          "a program per step (CPU default)": evaluate._correct_stepped}
  ours = {}
  for name, run in ways.items():
    attack = lambda k: run(v, x, y, k, None, model=model, attack=threat)[0]
    started = time.perf_counter()
    jax.block_until_ready(attack(jax.random.key(0)))
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    correct = np.asarray(jax.block_until_ready(attack(jax.random.key(1))))
    ours[name] = (time.perf_counter() - started, compile_seconds, float(correct.mean()))

  twin = torch_export.convert(spec, variables, mean, std)
  x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y_torch = torch.from_numpy(labels.astype(np.int64))
  with torch.no_grad():
    agree = float((twin(x_torch).argmax(1) == y_torch).float().mean())
  started = time.perf_counter()
  theirs = torchattacks.APGD(twin, eps=EPS, steps=args.steps, loss="ce")(x_torch, y_torch)
  theirs_seconds = time.perf_counter() - started
  with torch.no_grad():
    theirs_accuracy = float((twin(theirs).argmax(1) == y_torch).float().mean())

  n = args.batch_size
  print(f"  clean predictions agree: {100 * agree:.1f}%")
  for name, (seconds, compile_seconds, accuracy) in ours.items():
    print(f"  ours, {name}: {n / seconds:7.2f} images/s ({seconds:.1f} s, first call "
          f"{compile_seconds:.1f} s), robust accuracy {100 * accuracy:.1f}%, "
          f"{theirs_seconds / seconds:.2f}x torchattacks")
  print(f"  torchattacks:  {n / theirs_seconds:7.2f} images/s ({theirs_seconds:.1f} s), robust "
        f"accuracy {100 * theirs_accuracy:.1f}%")


if __name__ == "__main__":
  main()
