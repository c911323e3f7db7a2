"""rcnas_jax: reinforced compressive neural architecture search for adversarial robustness."""

__version__ = "0.1.0"


def load_student(path: str):
  """Loads an exported student: (spec, variables, jitted predict, meta). See `export`."""
  from rcnas_jax.nets import export  # Deferred: importing the package should not import JAX.
  return export.load_student(path)


def export_torch(export_dir: str, out_dir: str) -> str:
  """Writes an exported student as a self-contained PyTorch module (student.py, config.json,
  state_dict.pt) that loads without rcnas_jax; returns out_dir. See `nets.torch_export`."""
  from rcnas_jax.nets import torch_export  # Deferred, as above; needs torch.
  return torch_export.export_torch(export_dir, out_dir)
