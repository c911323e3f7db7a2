"""Export and one-call loading of a student."""

import jax
import numpy as np
import pytest

import rcnas_jax
from rcnas_jax.nets import arch, export, models


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
  with pytest.raises(export.ExportError, match=f"no exported student at {tmp_path}"):
    rcnas_jax.load_student(str(tmp_path))


def _exported(tmp_path):
  spec = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1),))
  model = models.build(spec, 4)
  path = tmp_path / "student"
  export.export_student(str(path), spec, models.init(model, jax.random.key(0), (8, 8, 1)),
                        num_classes=4, image_shape=(8, 8, 1), mean=(0.0,), std=(1.0,))
  return path


def test_a_damaged_export_is_one_clear_error(tmp_path):
  path = _exported(tmp_path)
  (path / "student.json").write_text('{"spec": ')
  with pytest.raises(export.ExportError, match=r"student at .* is damaged: student.json: "):
    rcnas_jax.load_student(str(path))
  path = _exported(tmp_path)
  (path / "student.json").write_text('{"num_classes": 4}')
  with pytest.raises(export.ExportError, match="damaged: student.json: KeyError: .*no spec"):
    rcnas_jax.load_student(str(path))
  path = _exported(tmp_path)
  for data_file in [p for p in (path / "variables").rglob("*") if p.is_file()]:
    data_file.write_bytes(data_file.read_bytes()[:3])
  with pytest.raises(export.ExportError, match="is damaged: variables/"):
    rcnas_jax.load_student(str(path))


@pytest.mark.parametrize("images,needle", [
    (np.zeros((2, 8, 8), np.uint8), "got shape (2, 8, 8)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "got shape (2, 8, 8, 3)"),
    (np.zeros((2, 8, 8, 1), np.int32), "got dtype int32"),
    (np.full((2, 8, 8, 1), 255.0, np.float32), "got values in [255, 255]"),
    (np.full((2, 8, 8, 1), np.nan, np.float32), "got values in [nan, nan]"),
])
def test_predict_refuses_images_it_cannot_take(tmp_path, images, needle):
  student = rcnas_jax.load_student(str(_exported(tmp_path)))
  with pytest.raises(export.ExportError) as error:
    student.predict(images)
  assert str(error.value).startswith("predict: images must be (N, 8, 8, 1) uint8 or floats in "
                                     "[0, 1]") and needle in str(error.value)
  assert student.predict(np.ones((2, 8, 8, 1), np.float32)).shape == (2, 4)
