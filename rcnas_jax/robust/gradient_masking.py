"""Sanity checks for gradient masking, in the spirit of AutoAttack's `checks.py`.

Each check returns a warning (a string) or None: outputs that change between identical calls
(randomness), softmax-like outputs (probabilities instead of logits), zero or vanishing input
gradients, a black-box attack beating the white-box ones, and robust accuracy that does not
decrease as eps grows (or stays above zero for an unbounded attack). A warning means the robust
accuracies may overestimate the true robustness.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from rcnas_jax.robust import attacks


def randomness(logits_fn, images: jax.Array, labels: jax.Array, *, calls: int = 3,
               tolerance: float = 1e-4) -> str | None:
  """Warns when identical calls give different predictions or (normalised) outputs."""
  outputs = [np.asarray(logits_fn(images), np.float64) for _ in range(calls)]
  outputs = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10) for o in outputs]
  correct = [int(np.sum(np.argmax(o, 1) == np.asarray(labels))) for o in outputs]
  difference = max(float(np.max(np.linalg.norm(o - outputs[0], axis=1))) for o in outputs)
  if len(set(correct)) > 1 or difference > tolerance:
    return (f"outputs change between identical calls (max normalised difference "
            f"{difference:.2g}, correct {correct}): a randomised model needs EOT attacks")
  return None


def softmax_output(logits: jax.Array, tolerance: float = 1e-5) -> str | None:
  """Warns when the outputs look like probabilities (in [0, 1], rows summing to 1)."""
  logits = np.asarray(logits)
  if (logits.max() < 1 + tolerance and logits.min() > -tolerance
      and np.all(np.abs(logits.sum(-1) - 1) < tolerance)):
    return "the model outputs a probability distribution: attacks need the logits"
  return None


def input_gradients(logits_fn, images: jax.Array, labels: jax.Array, *,
                    vanishing: float = 1e-8) -> str | None:
  """Warns about points whose input gradient of the CE loss is zero or vanishing (L1 norm)."""
  grad = jax.grad(lambda x: jnp.sum(attacks.cross_entropy(logits_fn(x), labels)))(images)
  size = np.asarray(jnp.sum(jnp.abs(grad.reshape(len(images), -1)), axis=1))
  zero, small = int(np.sum(size == 0)), int(np.sum((size > 0) & (size < vanishing)))
  if zero or small:
    return (f"{zero} of {len(size)} points have a zero and {small} a vanishing (L1 < "
            f"{vanishing:g}) input gradient: gradient-based attacks may fail on them")
  return None


def black_box_beats_white_box(results: dict[str, dict], alpha: float = 0.002) -> str | None:
  """Warns when Square beats every white-box attack, alone or after them inside AA-lite."""
  white = [results[n]["accuracy"] for n in attacks.WHITE_BOX if n in results]
  if "square" in results and white and results["square"]["accuracy"] < min(white) - alpha:
    return (f"the black-box Square attack ({100 * results['square']['accuracy']:.2f}%) beats "
            f"every white-box attack (best {100 * min(white):.2f}%)")
  composite = next((results[n] for n in attacks.COMPOSITES if n in results), {})
  after = composite.get("after", {})
  if "square" in after and len(after) > 1:
    before = min(v for k, v in after.items() if k != "square")
    if after["square"] < before - alpha:
      return (f"inside AA-lite, Square lowered the robust accuracy left by the white-box "
              f"attacks from {100 * before:.2f}% to {100 * after['square']:.2f}%")
  return None


@functools.partial(jax.jit, static_argnames=("norm", "num_steps"))
def accuracy_by_eps(logits_fn: Partial, images: jax.Array, labels: jax.Array, key: jax.Array,
                    eps_values: jax.Array, *, norm: str = "linf",
                    num_steps: int = 20) -> jax.Array:
  """Accuracy under PGD-CE (step eps / 4, rolled loop) at each radius of `eps_values`.

  `logits_fn` is a `jax.tree_util.Partial`, so its bound arguments (weights) are traced, not
  baked into the program; all radii run in one vmapped program.
  """
  def accuracy(eps):
    adversarial = attacks.pgd(logits_fn, images, labels, key, eps=eps, step_size=eps / 4,
                              num_steps=num_steps, norm=norm, unroll=False)
    return jnp.mean(jnp.argmax(logits_fn(adversarial), axis=1) == labels)
  return jax.vmap(accuracy)(eps_values)


def eps_growth(eps_values, accuracies, *, unbounded: float | None = None,
               tolerance: float = 0.005) -> str | None:
  """Warns when accuracy rises with eps, or stays above `tolerance` at an unbounded radius."""
  accuracies = [float(a) for a in accuracies]
  rises = [(e0, e1) for e0, e1, a0, a1 in zip(eps_values, eps_values[1:], accuracies,
                                             accuracies[1:]) if a1 > a0 + tolerance]
  table = ", ".join(f"{e:.4g}: {100 * a:.1f}%" for e, a in zip(eps_values, accuracies))
  if rises:
    return f"robust accuracy does not decrease with eps ({table})"
  if unbounded is not None and eps_values[-1] >= unbounded and accuracies[-1] > tolerance:
    return f"an unbounded attack leaves {100 * accuracies[-1]:.1f}% accuracy ({table})"
  return None


def run_all(logits_fn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps: float,
            norm: str, results: dict[str, dict], num_steps: int = 20) -> list[str]:
  """Every check on (images in [0, 1], labels) and the suite's results; the warnings raised."""
  logits_fn = logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)
  radii = [eps * m for m in (0.25, 0.5, 1.0, 2.0, 4.0)]
  unbounded = 1.0 if norm == "linf" else float(np.sqrt(images[0].size))
  radii.append(unbounded)
  accuracies = accuracy_by_eps(logits_fn, images, labels, key, jnp.asarray(radii), norm=norm,
                               num_steps=num_steps)
  warnings = [randomness(logits_fn, images, labels), softmax_output(logits_fn(images)),
              input_gradients(logits_fn, images, labels),
              black_box_beats_white_box(results),
              eps_growth(radii, np.asarray(accuracies), unbounded=unbounded,
                         tolerance=max(0.005, 1.5 / len(images)))]
  return [w for w in warnings if w]
