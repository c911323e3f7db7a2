"""Shared test helpers."""

import jax
import numpy as np
import optax

from rcnas_jax import data


def fit(model, variables: dict, split: data.Split, steps: int) -> dict:
  """`variables` after `steps` clean Adam steps (lr 0.01, batches of 128) on `split`."""
  tx = optax.adam(0.01)

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    def loss(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
    (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, changes), updates["batch_stats"], opt_state

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  for i in range(steps):
    index = np.random.default_rng(i).choice(len(split), 128, replace=False)
    params, batch_stats, opt_state = step(params, batch_stats, opt_state,
                                          split.images[index].astype(np.float32) / 255,
                                          split.labels[index])
  return {"params": params, "batch_stats": batch_stats}
