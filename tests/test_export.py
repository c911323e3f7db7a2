"""Export and one-call loading of a student."""

import jax
import numpy as np
import pytest

import rcnas_jax
from rcnas_jax import arch, export, models


def test_exported_student_loads_in_one_call_and_predicts_identically(tmp_path):
  spec = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2, "robust")))
  model = models.build(spec, 4, (0.5,), (0.25,))
  variables = models.init(model, jax.random.key(0), (8, 8, 1))
  variables = jax.tree.map(lambda x: x + 0.01, variables)
  export.export_student(str(tmp_path / "student"), spec, variables, num_classes=4,
                        image_shape=(8, 8, 1), mean=(0.5,), std=(0.25,),
                        metrics={"pgd": 0.5})
  student = rcnas_jax.load_student(str(tmp_path / "student"))
  assert student.spec == spec and student.meta["metrics"] == {"pgd": 0.5}
  assert student.meta["macs"] == arch.count_macs(spec, 8, 4, 1)
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  expected = model.apply(variables, images.astype(np.float32) / 255)
  np.testing.assert_allclose(student.predict(images), expected, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(student.variables), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_missing_export_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    rcnas_jax.load_student(str(tmp_path))
