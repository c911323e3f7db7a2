"""The PGD-10 adversarial training step: ours (JAX) vs PyTorch, and both vs the matmul peak.

  python benchmarks/train_step.py   # needs torch (`make test` installs it into .venv)

One run, per network (default WRN-10-2 and WRN-16-4, batch 128 of CIFAR-shaped random
images): images/s of one PGD-AT step (Madry et al.: PGD-10 on the cross-entropy, L-inf eps
8/255, step 2/255, random start, BN in eval mode inside the attack; then a train-mode forward
and backward and SGD with momentum 0.9, weight decay and global-norm clipping as
`config.training`) for
- ours, `training.make_train_step`, on 1 device and on all (virtual) CPU devices, batch sharded
  (`--bfloat16` adds ours computing in bfloat16 with float32 weights; the peak stays float32);
- PyTorch, the same pre-activation network (`torch_export.convert`, weights 1:1), eager in
  channels_last, and `torch.compile` of the model where it works here (`--no_compile` skips).
Each is timed over `--steps` steps after a warm-up step (its compile is "first step").

FLOP/s are model FLOPs: 2 x MACs (`arch.count_macs`) per forward, a forward and an input
gradient per attack step (2 forwards' worth), a forward and a backward for the weights (3),
so (2K + 3) x 2 x MACs per image for K attack steps. The peak is the best of a float32
4096 x 4096 matmul in JAX (one device) and in PyTorch, measured in the same run.
"""

import argparse
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rcnas_jax import config as config_lib  # noqa: E402
from rcnas_jax.nets import arch, models, torch_export  # noqa: E402
from rcnas_jax.robust import attacks, training  # noqa: E402
from rcnas_jax.runtime import parallel  # noqa: E402

EPS, STEP_SIZE = 8 / 255, 2 / 255
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def timed(step, warmups: int, steps: int) -> tuple[float, float]:
  """(seconds of the first `warmups` calls, seconds per call of the next `steps`)."""
  started = time.perf_counter()
  for _ in range(warmups):
    step()
  first = time.perf_counter() - started
  started = time.perf_counter()
  for _ in range(steps):
    step()
  return first, (time.perf_counter() - started) / steps


def matmul_peak(n: int = 4096, repeats: int = 10) -> dict[str, float]:
  """Float32 FLOP/s of an n x n matmul: JAX on one device, PyTorch on its threads."""
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32),
                     jax.devices()[0])
  dot = jax.jit(jnp.dot)
  jax_seconds = timed(lambda: jax.block_until_ready(dot(a, a)), 2, repeats)[1]
  t = torch.from_numpy(np.array(a))
  torch_seconds = timed(lambda: torch.mm(t, t), 2, repeats)[1]
  return {"jax": 2 * n**3 / jax_seconds, "torch": 2 * n**3 / torch_seconds}


def ours(spec: arch.NetworkSpec, variables: dict, images: np.ndarray, labels: np.ndarray,
         devices: list, steps: int, dtype: str = "float32") -> tuple[float, float]:
  """(first step s, s per step) of our jitted PGD-AT step on a mesh of `devices`."""
  t = config_lib.base_config().training
  model = models.build(spec, 10, MEAN, STD, dtype=dtype)
  tx = training.optimizer(t, 1000)
  settings = training.TrainSettings(
      method="pgd_at", attack=attacks.ThreatModel("pgd", eps=EPS, step_size=STEP_SIZE,
                                                  num_steps=10),
      unroll=training.unroll_attack_loops("auto"))
  mesh = parallel.data_mesh(devices)
  state = parallel.replicate(mesh, training.create_state(model, tx, None, None, variables))
  step = training.make_train_step(model, tx, settings, mesh)
  x, y = parallel.shard_batch(mesh, images, labels)
  key = jax.random.key(1)

  def one_step():
    nonlocal state
    state, out = step(state, x, y, key, None)
    jax.block_until_ready((state, out))

  return timed(one_step, 1, steps)


def pytorch(spec: arch.NetworkSpec, variables: dict, images: np.ndarray, labels: np.ndarray,
            steps: int, compiled: bool) -> tuple[float, float]:
  """(first step s, s per step) of the same step in PyTorch eager (or compiled), channels_last."""
  t = config_lib.base_config().training
  model = torch_export.convert(spec, variables, MEAN, STD).to(memory_format=torch.channels_last)
  forward = torch.compile(model) if compiled else model
  optimizer = torch.optim.SGD(model.parameters(), lr=t.learning_rate, momentum=t.momentum,
                              weight_decay=t.weight_decay)
  x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(labels.astype(np.int64))

  def attack() -> torch.Tensor:
    model.eval()
    adversarial = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(10):
      adversarial.requires_grad_(True)
      loss = F.cross_entropy(forward(adversarial), y)
      (grad,) = torch.autograd.grad(loss, adversarial)  # Input gradient only.
      adversarial = adversarial.detach() + STEP_SIZE * grad.sign()
      adversarial = torch.minimum(torch.maximum(adversarial, x - EPS), x + EPS).clamp(0, 1)
    return adversarial.detach()

  def one_step():
    adversarial = attack()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(forward(adversarial), y).backward()
    if t.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    optimizer.step()

  return timed(one_step, 2 if compiled else 1, steps)  # Compiled: train and eval graphs.


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", default="WRN-10-2,WRN-16-4")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no_compile", action="store_true", help="skip torch.compile")
  parser.add_argument("--bfloat16", action="store_true",
                      help="also time ours computing in bfloat16 (float32 weights) on all devices")
  args = parser.parse_args()
  peak = matmul_peak()
  best_peak = max(peak.values())
  print(f"PGD-AT step (PGD-10 CE, eps 8/255, step 2/255, BN eval in the attack, SGD momentum), "
        f"batch {args.batch_size}, 32x32x3; {jax.device_count()} JAX CPU device(s), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads")
  print(f"float32 4096^2 matmul peak: JAX {peak['jax'] / 1e9:.0f} GFLOP/s, PyTorch "
        f"{peak['torch'] / 1e9:.0f} GFLOP/s")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, args.batch_size).astype(np.int32)
  print("| network | implementation | images/s | vs PyTorch eager | GFLOP/s | of peak | "
        "first step (s) |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for name in args.archs.split(","):
    spec = arch.teacher(name)
    flops = (2 * 10 + 3) * 2 * arch.count_macs(spec, 32, 10)
    # On the host: each step donates its state, so every run must place its own copy.
    variables = jax.tree.map(np.asarray, models.init(models.build(spec, 10, MEAN, STD),
                                                     jax.random.key(0), (32, 32, 3)))
    rows = {f"PyTorch eager ({torch.get_num_threads()} threads)":
            pytorch(spec, variables, images, labels, args.steps, compiled=False)}
    if not args.no_compile:
      try:
        rows["PyTorch torch.compile"] = pytorch(spec, variables, images, labels, args.steps,
                                                compiled=True)
      except Exception as error:  # noqa: BLE001  (inductor needs a working C++ toolchain)
        print(f"  torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0]}")
    for n in sorted({1, jax.device_count()}):
      rows[f"ours, {n} device(s)"] = ours(spec, variables, images, labels, jax.devices()[:n],
                                          args.steps)
    if args.bfloat16:
      rows[f"ours bfloat16, {jax.device_count()} device(s)"] = ours(
          spec, variables, images, labels, jax.devices(), args.steps, "bfloat16")
    eager = args.batch_size / next(iter(rows.values()))[1]
    for implementation, (first, seconds) in rows.items():
      rate = args.batch_size / seconds
      print(f"| {name} | {implementation} | {rate:.1f} | {rate / eager:.2f}x | "
            f"{rate * flops / 1e9:.0f} | {100 * rate * flops / best_peak:.0f}% | {first:.1f} |")


if __name__ == "__main__":
  main()
