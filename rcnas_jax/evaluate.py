"""Clean and robust accuracy of a model on a split, with the attack settings beside every number.

The model is always evaluated in eval mode (BN running statistics), inside the attacks too.
Batches are padded to a fixed size (one compile per attack) and split over the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rcnas_jax import attacks, data, models, parallel


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  """One evaluation attack; `name` is one of attacks.ATTACKS."""

  name: str
  eps: float = 8 / 255
  step_size: float = 0.8 / 255
  num_steps: int = 20
  norm: str = "linf"
  restarts: int = 1

  def describe(self) -> str:
    """A human-readable label, e.g. 'PGD-20 (CE, L-inf eps=0.03137 (8/255), ...)'."""
    if self.name == "clean":
      return "clean"
    norm = "L-inf" if self.norm == "linf" else "L2"
    eps = _fraction_of_255(self.eps) if self.norm == "linf" else f"{self.eps:g}"
    if self.name == "fgsm":
      return f"FGSM (CE, {norm} eps={eps})"
    loss = "CE" if self.name == "pgd" else "CW margin"
    step = _fraction_of_255(self.step_size) if self.norm == "linf" else f"{self.step_size:g}"
    restarts = f"{self.restarts} restart{'s' if self.restarts > 1 else ''}"
    return (f"{'PGD' if self.name == 'pgd' else 'CW'}-{self.num_steps} ({loss}, {norm} "
            f"eps={eps}, step={step}, random start, {restarts})")


def _fraction_of_255(value: float) -> str:
  """An L-inf radius as a decimal and in 1/255 units, e.g. '0.03137 (8/255)'."""
  return f"{value:.4g} ({value * 255:.3g}/255)"


def attacks_from_config(e: ml_collections.ConfigDict) -> tuple[AttackSettings, ...]:
  """The evaluation attacks named in config.evaluation."""
  steps = {"pgd": (e.pgd_steps, e.pgd_step_size), "cw": (e.cw_steps, e.cw_step_size)}
  settings = []
  for name in e.attacks:
    num_steps, step_size = steps.get(name, (1, e.eps))
    settings.append(AttackSettings(name, e.eps, step_size=step_size, num_steps=num_steps,
                                   norm=e.norm, restarts=e.restarts))
  return tuple(settings)


@functools.partial(jax.jit, static_argnames=("model", "attack", "unroll"))
def _count_correct(variables, images, labels, mask, key, *, model: nn.Module,
                   attack: AttackSettings, unroll: bool) -> jax.Array:
  """How many unmasked examples the model still classifies correctly under `attack`."""
  logits_fn = models.logits_fn(model, variables)
  x = images.astype(jnp.float32) / 255.0
  adversarial = attacks.attack(attack.name, logits_fn, x, labels, key, eps=attack.eps,
                               step_size=attack.step_size, num_steps=attack.num_steps,
                               norm=attack.norm, restarts=attack.restarts, unroll=unroll)
  correct = jnp.argmax(logits_fn(adversarial), axis=-1) == labels
  return jnp.sum(correct & mask)


def _padded_batches(split: data.Split, batch_size: int):
  """Fixed-size batches with a validity mask (the last one padded by repeating example 0)."""
  for start in range(0, len(split), batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    valid = len(labels)
    pad = batch_size - valid
    if pad:
      images = np.concatenate([images, np.repeat(split.images[:1], pad, 0)])
      labels = np.concatenate([labels, np.repeat(split.labels[:1], pad, 0)])
    yield images, labels, np.arange(batch_size) < valid


def robust_accuracy(model: nn.Module, variables: dict, split: data.Split,
                    attack: AttackSettings, key: jax.Array, mesh: Mesh, *,
                    batch_size: int = 256, unroll: bool = True) -> dict:
  """Accuracy under `attack` on `split`: {accuracy, n_examples, attack, seconds}."""
  started = time.perf_counter()
  variables = parallel.replicate(mesh, variables)
  batch_size = min(batch_size, -(-len(split) // len(mesh.devices.flat)) * len(mesh.devices.flat))
  correct = 0
  for i, (images, labels, mask) in enumerate(_padded_batches(split, batch_size)):
    images, labels, mask = parallel.shard_batch(mesh, images, labels, mask)
    correct += int(_count_correct(variables, images, labels, mask, jax.random.fold_in(key, i),
                                  model=model, attack=attack, unroll=unroll))
  return {"accuracy": correct / len(split), "n_examples": len(split),
          "attack": attack.describe(), "seconds": time.perf_counter() - started}


def evaluate(model: nn.Module, variables: dict, split: data.Split,
             attack_list: tuple[AttackSettings, ...], key: jax.Array, mesh: Mesh, *,
             batch_size: int = 256, unroll: bool = True) -> dict[str, dict]:
  """`robust_accuracy` for each attack, keyed by attack name."""
  return {a.name: robust_accuracy(model, variables, split, a, jax.random.fold_in(key, i), mesh,
                                  batch_size=batch_size, unroll=unroll)
          for i, a in enumerate(attack_list)}


def format_table(results: dict[str, dict]) -> str:
  """A Markdown table: attack, accuracy, examples, settings."""
  rows = ["| attack | accuracy (%) | examples | settings |", "|---|---:|---:|---|"]
  for name, r in results.items():
    rows.append(f"| {name} | {100 * r['accuracy']:.2f} | {r['n_examples']} | {r['attack']} |")
  return "\n".join(rows)
