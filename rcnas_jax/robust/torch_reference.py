"""AutoAttack's standard attacks in torchattacks, set as the reference implementation sets them.

For cross-checks of our attacks (tests/test_reference.py, benchmarks/autoattack_reference.py) on
a PyTorch twin of a student (`nets.torch_export`). torchattacks 3.5.1's own
`AutoAttack(version='standard')` differs from fra31/auto-attack's standard version: it builds
APGD, APGD-T and FAB with torchattacks' default 10 steps (the reference: 100) and Square with the
rescaled p schedule (the reference: `resc_schedule=False`). `attack` builds each at the
reference's settings instead. torch and torchattacks are imported lazily.
"""

from __future__ import annotations

import time

import numpy as np

from rcnas_jax.robust import evaluate

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def attack(name: str, model, eps: float, norm: str = "linf", num_classes: int = 10):
  """torchattacks' `name` (one of STANDARD) at AutoAttack's standard settings."""
  import torchattacks

  norm = "Linf" if norm == "linf" else "L2"
  if name == "apgd-ce":
    return torchattacks.APGD(model, norm=norm, eps=eps, steps=100, loss="ce", n_restarts=1)
  if name == "apgd-t":
    return torchattacks.APGDT(model, norm=norm, eps=eps, steps=100, n_classes=num_classes,
                              n_restarts=1)
  if name == "fab-t":
    return torchattacks.FAB(model, norm=norm, eps=eps, steps=100, multi_targeted=True,
                            n_classes=num_classes, n_restarts=1)
  if name == "square":
    return torchattacks.Square(model, norm=norm, eps=eps, n_queries=5000, n_restarts=1,
                               resc_schedule=False)
  raise ValueError(f"attack {name!r} is not one of {', '.join(STANDARD)}")


def correct(model, attack_fn, images: np.ndarray, labels: np.ndarray, eps: float,
            norm: str = "linf") -> tuple[np.ndarray, float]:
  """Per NHWC image in [0, 1], whether `model` is right on it clean and under `attack_fn` (as
  evaluate counts it); the attack's seconds.

  Checks, as AutoAttack does, that every perturbation is within eps.
  """
  import torch

  x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
  y = torch.from_numpy(np.asarray(labels, np.int64))
  started = time.perf_counter()
  adversarial = attack_fn(x.contiguous(), y).detach()
  seconds = time.perf_counter() - started
  delta = (adversarial - x).flatten(1)
  size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
  if float(size.max()) > eps * (1 + evaluate.TOLERANCE) + evaluate.TOLERANCE:
    raise AssertionError(f"torchattacks left the eps-ball: {float(size.max()):.6g} > {eps:.6g}")
  with torch.no_grad():
    return ((model(x).argmax(1) == y) & (model(adversarial).argmax(1) == y)).numpy(), seconds


def autoattack(model, images: np.ndarray, labels: np.ndarray, eps: float, norm: str = "linf",
               num_classes: int = 10) -> dict[str, tuple[float, float]]:
  """{attack: (robust accuracy, seconds)} of each STANDARD attack on every image, their
  point-wise worst case ('autoattack', the reference's standard version), and torchattacks'
  own 'torchattacks.AutoAttack'."""
  import torch
  import torchattacks

  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
    robust = model(x).argmax(1).numpy() == labels
  results = {"clean": (float(np.mean(robust)), 0.0)}
  for name in STANDARD:
    flags, seconds = correct(model, attack(name, model, eps, norm, num_classes), images, labels,
                             eps, norm)
    results[name] = (float(np.mean(flags)), seconds)
    robust &= flags
  results["autoattack"] = (float(np.mean(robust)), sum(s for _, s in results.values()))
  shipped = torchattacks.AutoAttack(model, norm="Linf" if norm == "linf" else "L2", eps=eps,
                                    version="standard", n_classes=num_classes, seed=0)
  flags, seconds = correct(model, shipped, images, labels, eps, norm)
  results["torchattacks.AutoAttack"] = (float(np.mean(flags)), seconds)
  return results
