"""Students as plain PyTorch modules: for RobustBench, the reference AutoAttack, and our
cross-checks against PyTorch tools.

`export_torch(export_dir, out_dir)` writes a self-contained directory: `student.py` (a copy of
`torch_student.py`, which imports torch only), `config.json` (the architecture and input
normalisation) and `state_dict.pt` (the Flax variables renamed, kernels transposed). Loading it
needs no rcnas_jax:

  import sys; sys.path.insert(0, out_dir); import student
  model = student.load(out_dir)  # eval-mode torch.nn.Module, NCHW images in [0, 1] -> logits

    python -m rcnas_jax.nets.torch_export EXPORT_DIR OUT_DIR

torch is imported lazily; it is needed only here (not by the JAX package).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

from rcnas_jax.nets import arch, export
from rcnas_jax.runtime import store

MODULE_SOURCE = os.path.join(os.path.dirname(__file__), "torch_student.py")


def torch_config(spec: arch.NetworkSpec, num_classes: int, image_shape, mean, std) -> dict:
  """config.json of an export: everything `torch_student.Student` builds the network from."""
  stages = [{**s, "out_channels": stage.out_channels,
             "inner_width": arch.robust_inner_width(stage.channels),
             "expansion": arch.ROBUST_EXPANSION, "scales": arch.ROBUST_SCALES,
             "cardinality": arch.ROBUST_CARDINALITY, "se_reduction": arch.ROBUST_SE_REDUCTION}
            for s, stage in zip(spec.to_dict()["stages"], spec.stages)]
  return {"network": {**spec.to_dict(), "stages": stages}, "num_classes": int(num_classes),
          "image_shape": list(image_shape), "mean": [float(m) for m in mean],
          "std": [float(s) for s in std]}


def _torch_leaf(name: str, value: np.ndarray, is_stat: bool) -> tuple[str, np.ndarray]:
  """A Flax leaf as the PyTorch parameter or buffer of the same module."""
  if is_stat:
    return {"mean": "running_mean", "var": "running_var"}[name], value
  if name == "kernel":  # Conv HWIO -> OIHW; Dense (in, out) -> (out, in).
    return "weight", value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return {"scale": "weight", "bias": "bias"}[name], value


def state_dict(variables: dict) -> dict:
  """The Flax {'params', 'batch_stats'} as a PyTorch state_dict for `torch_student.Student`."""
  import torch

  state = {}

  def visit(tree, path, is_stat):
    for key, value in tree.items():
      if isinstance(value, dict):
        visit(value, path + (key,), is_stat)
        continue
      name, array = _torch_leaf(key, np.asarray(value, np.float32), is_stat)
      state[".".join(path + (name,))] = torch.from_numpy(np.array(array, np.float32, order="C"))
      if is_stat and key == "mean":
        state[".".join(path + ("num_batches_tracked",))] = torch.tensor(0)

  visit(variables["params"], (), False)
  visit(variables["batch_stats"], (), True)
  return state


def convert(spec: arch.NetworkSpec, variables: dict, mean, std, image_shape=None):
  """A `torch.nn.Module` in eval mode computing the same logits as models.build(spec, ...)."""
  from rcnas_jax.nets import torch_student  # Imports torch.

  params = variables["params"]
  num_classes = params["head"]["kernel"].shape[1]
  image_shape = image_shape or (None, None, params["stem"]["kernel"].shape[2])
  model = torch_student.Student(torch_config(spec, num_classes, image_shape, mean, std))
  model.load_state_dict(state_dict(variables))  # Strict: every parameter and buffer mapped.
  return model.eval()


def export_torch(export_dir: str, out_dir: str) -> str:
  """Writes the exported student at `export_dir` as a self-contained PyTorch directory."""
  import torch

  student = export.load_student(export_dir)
  meta = student.meta
  config = torch_config(student.spec, meta["num_classes"], meta["image_shape"], meta["mean"],
                        meta["std"])
  convert(student.spec, student.variables, meta["mean"], meta["std"], meta["image_shape"])
  os.makedirs(out_dir, exist_ok=True)
  store.write_json(os.path.join(out_dir, "config.json"), config)
  torch.save(state_dict(student.variables), os.path.join(out_dir, "state_dict.pt"))
  shutil.copyfile(MODULE_SOURCE, os.path.join(out_dir, "student.py"))
  return out_dir


def main(argv: list[str]) -> None:
  """python -m rcnas_jax.nets.torch_export EXPORT_DIR OUT_DIR"""
  if len(argv) != 3:
    raise SystemExit("usage: python -m rcnas_jax.nets.torch_export EXPORT_DIR OUT_DIR")
  try:
    print(f"PyTorch student written to {export_torch(argv[1], argv[2])}")
  except (export.ExportError, store.StoreError) as error:
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  main(sys.argv)
