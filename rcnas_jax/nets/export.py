"""Exported students: an Orbax checkpoint of the variables plus the spec and metrics as JSON.

`load_student(path)` gives back everything needed to use one: the spec, the variables and
`predict(images) -> logits` on uint8 or [0, 1] float images, which checks what it is given.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rcnas_jax.nets import arch, models
from rcnas_jax.runtime import parallel, store


class ExportError(ValueError):
  """An export is missing or damaged, or `predict` got images it cannot take."""


class Student(NamedTuple):
  spec: arch.NetworkSpec
  variables: dict
  predict: Callable[[jax.Array], jax.Array]
  meta: dict  # num_classes, image_shape, mean, std, metrics


def export_student(path: str, spec: arch.NetworkSpec, variables: dict, *, num_classes: int,
                   image_shape, mean, std, metrics: dict | None = None,
                   dataset: str = "", training_data: dict | None = None) -> None:
  """Writes <path>/variables (Orbax), <path>/student.json (spec + data) and metrics.json.

  `dataset` (optional) names the dataset the student was trained on, for `mode='evaluate'`;
  `training_data` the settings that chose its training examples (`pipeline.training_data`), so
  that a search using it as a teacher can check it never saw the validation split.
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, "variables"), parallel.to_host(variables), force=True)
  meta = {"spec": spec.to_dict(), "num_classes": num_classes, "image_shape": list(image_shape),
          "mean": list(mean), "std": list(std), "dataset": dataset,
          "training_data": training_data,
          "params": arch.count_params(spec, num_classes, image_shape[-1]),
          "macs": arch.count_macs(spec, image_shape[0], num_classes, image_shape[-1])}
  # Every process saves the variables (Orbax), process 0 the JSON.
  store.write_json(os.path.join(path, "metrics.json"), metrics or {})
  store.write_json(os.path.join(path, "student.json"), meta)


def _read_meta(path: str) -> dict:
  """student.json and metrics.json of the export at `path`; ExportError says what is wrong."""
  if not os.path.exists(os.path.join(path, "student.json")):
    raise ExportError(f"no exported student at {path} (expected student.json and variables/)")
  try:
    meta = store.read_json(os.path.join(path, "student.json"))
    meta["metrics"] = store.read_json(os.path.join(path, "metrics.json"), {})
    missing = [f for f in ("spec", "num_classes", "image_shape", "mean", "std") if f not in meta]
    if missing:
      raise KeyError(f"no {', '.join(missing)}")
    meta["spec"] = arch.spec_from_dict(meta["spec"])
  except (store.StoreError, KeyError, TypeError, ValueError) as error:
    raise ExportError(f"the exported student at {path} is damaged: student.json: "
                      f"{type(error).__name__}: {error}") from None
  return meta


def check_images(images, image_shape) -> None:
  """Raises ExportError unless `images` is a (N, H, W, C) batch of uint8 or [0, 1] floats."""
  shape, dtype = tuple(np.shape(images)), np.dtype(getattr(images, "dtype", np.float64))
  expected = f"(N, {', '.join(map(str, image_shape))}) uint8 or floats in [0, 1]"
  if len(shape) != 4 or shape[1:] != tuple(image_shape):
    raise ExportError(f"predict: images must be {expected}; got shape {shape}")
  if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
    raise ExportError(f"predict: images must be {expected}; got dtype {dtype}")
  if np.issubdtype(dtype, np.floating) and shape[0]:
    low, high = float(jnp.min(images)), float(jnp.max(images))
    if not (0.0 <= low and high <= 1.0):  # NaN fails both.
      raise ExportError(f"predict: images must be {expected}; got values in [{low:g}, {high:g}] "
                        "(divide 0-255 pixels by 255, or pass uint8)")


def load_student(path: str) -> Student:
  """The exported student at `path`: spec, variables and a checked, jitted predict."""
  path = os.path.abspath(path)
  meta = _read_meta(path)
  spec = meta["spec"]
  meta["spec"] = spec.to_dict()
  model = models.build(spec, meta["num_classes"], meta["mean"], meta["std"])
  abstract = jax.eval_shape(lambda: models.init(model, jax.random.key(0), meta["image_shape"]))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(os.path.join(path, "variables"), abstract)
  except Exception as error:  # Orbax and TensorStore raise many kinds on a damaged file.
    raise ExportError(f"the exported student at {path} is damaged: variables/: "
                      f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from None

  @jax.jit
  def logits(images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8:
      images = images.astype(jnp.float32) / 255.0
    return model.apply(variables, images, train=False)

  def predict(images) -> jax.Array:
    check_images(images, meta["image_shape"])
    return logits(images)

  return Student(spec, variables, predict, meta)
