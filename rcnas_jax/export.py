"""Exported students: an Orbax checkpoint of the variables plus the spec and metrics as JSON.

`load_student(path)` gives back everything needed to use one: the spec, the variables and a
jitted `predict(images) -> logits` on uint8 or [0, 1] float images.
"""

from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rcnas_jax import arch, models, parallel


class Student(NamedTuple):
  spec: arch.NetworkSpec
  variables: dict
  predict: Callable[[jax.Array], jax.Array]
  meta: dict  # num_classes, image_shape, mean, std, metrics


def export_student(path: str, spec: arch.NetworkSpec, variables: dict, *, num_classes: int,
                   image_shape, mean, std, metrics: dict | None = None,
                   dataset: str = "") -> None:
  """Writes <path>/variables (Orbax), <path>/student.json (spec + data) and metrics.json.

  `dataset` (optional) names the dataset the student was trained on, for `mode='evaluate'`.
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, "variables"), parallel.to_host(variables), force=True)
  meta = {"spec": spec.to_dict(), "num_classes": num_classes, "image_shape": list(image_shape),
          "mean": list(mean), "std": list(std), "dataset": dataset,
          "params": arch.count_params(spec, num_classes, image_shape[-1]),
          "macs": arch.count_macs(spec, image_shape[0], num_classes, image_shape[-1])}
  if not parallel.is_primary():  # Every process saves the variables (Orbax), one the JSON.
    return
  with open(os.path.join(path, "student.json"), "w") as f:
    json.dump(meta, f, indent=2)
  with open(os.path.join(path, "metrics.json"), "w") as f:
    json.dump(metrics or {}, f, indent=2)


def load_student(path: str) -> Student:
  """The exported student at `path`: spec, variables and a jitted predict."""
  path = os.path.abspath(path)
  if not os.path.exists(os.path.join(path, "student.json")):
    raise FileNotFoundError(f"no exported student at {path} (expected student.json and "
                            "variables/)")
  with open(os.path.join(path, "student.json")) as f:
    meta = json.load(f)
  metrics_path = os.path.join(path, "metrics.json")
  meta["metrics"] = json.load(open(metrics_path)) if os.path.exists(metrics_path) else {}
  spec = arch.spec_from_dict(meta["spec"])
  model = models.build(spec, meta["num_classes"], meta["mean"], meta["std"])
  abstract = jax.eval_shape(lambda: models.init(model, jax.random.key(0), meta["image_shape"]))
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(path, "variables"), abstract)

  @jax.jit
  def predict(images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8:
      images = images.astype(jnp.float32) / 255.0
    return model.apply(variables, images, train=False)

  return Student(spec, variables, predict, meta)
