"""rcnas_jax: reinforced compressive neural architecture search for adversarial robustness."""

__version__ = "0.1.0"


def load_student(path: str):
  """Loads an exported student: (spec, variables, jitted predict, meta). See `export`."""
  from rcnas_jax.nets import export  # Deferred: importing the package should not import JAX.
  return export.load_student(path)
