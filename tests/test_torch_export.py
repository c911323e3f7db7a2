"""PyTorch exports compute the Flax network's eval-mode logits, and load without rcnas_jax
(runs when torch is installed)."""

import ast
import subprocess
import sys

import jax
import numpy as np
import pytest

import rcnas_jax
from rcnas_jax.nets import arch, export, models, torch_export

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
SPECS = {
    "basic": arch.NetworkSpec(stages=(arch.StageSpec(2, 8, 1), arch.StageSpec(1, 16, 2),
                                      arch.StageSpec(1, 16, 2))),
    # Robust stages: a projection and an identity shortcut, stride 1 and 2 (the pooled split).
    "robust": arch.NetworkSpec(stages=(arch.StageSpec(2, 16, 1, "robust"),
                                       arch.StageSpec(2, 16, 2, "robust"))),
    "mixed-silu": arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1),
                                           arch.StageSpec(1, 16, 2, "robust"),
                                           arch.StageSpec(1, 24, 2)), activation="silu"),
    "gelu-strided-stem": arch.NetworkSpec(stages=(arch.StageSpec(1, 16, 1, "robust"),),
                                          stem_stride=2, activation="gelu"),
}


def _network(spec, shape=(12, 12, 3), classes=5):
  """Variables with non-trivial BN statistics, scales and biases (every vector leaf moved by
  0.1 N(0, 1)), so eval mode and every leaf matter."""
  model = models.build(spec, classes, MEAN, STD)
  variables = models.init(model, jax.random.key(0), shape)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [v + 0.1 * jax.random.normal(k, v.shape) if v.ndim == 1 else v
            for v, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves)


def _torch_logits(module, images):
  with torch.no_grad():
    return module(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize("name", list(SPECS))
def test_twin_matches_flax_logits_in_eval_mode(name):
  model, variables = _network(SPECS[name])
  images = np.random.default_rng(0).uniform(size=(4, 12, 12, 3)).astype(np.float32)
  expected = np.asarray(model.apply(variables, images, train=False))
  logits = _torch_logits(torch_export.convert(SPECS[name], variables, MEAN, STD), images)
  assert 0.1 < np.std(expected) and np.max(np.abs(expected)) < 100  # Logits of a usual size.
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_state_dict_maps_every_flax_leaf_once():
  _, variables = _network(SPECS["robust"])
  state = torch_export.state_dict(variables)
  norms = sum(1 for k in state if k.endswith("num_batches_tracked"))
  assert len(state) == len(jax.tree.leaves(variables)) + norms
  kernel = variables["params"]["stage1_block0"]["split_conv0"]["kernel"]  # HWIO, grouped.
  np.testing.assert_array_equal(state["stage1_block0.split_conv0.weight"].numpy(),
                                np.transpose(kernel, (3, 2, 0, 1)))
  np.testing.assert_array_equal(state["head.weight"].numpy(),
                                np.asarray(variables["params"]["head"]["kernel"]).T)


def test_export_torch_is_self_contained_and_matches(tmp_path):
  spec = SPECS["mixed-silu"]
  model, variables = _network(spec, (12, 12, 3), 5)
  export.export_student(str(tmp_path / "student"), spec, variables, num_classes=5,
                        image_shape=(12, 12, 3), mean=MEAN, std=STD)
  out = rcnas_jax.export_torch(str(tmp_path / "student"), str(tmp_path / "torch"))
  source = (tmp_path / "torch" / "student.py").read_text()
  imported = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      imported |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module.split(".")[0])
  assert imported == {"__future__", "json", "os", "torch"}
  images = np.random.default_rng(1).uniform(size=(3, 12, 12, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  # A fresh interpreter where rcnas_jax cannot be imported loads it and writes its logits.
  script = (f"import sys; sys.modules['rcnas_jax'] = None; sys.path.insert(0, {out!r}); "
            "import numpy as np, torch, student; m = student.load(sys.argv[1]); "
            "x = torch.from_numpy(np.load(sys.argv[2])).permute(0, 3, 1, 2); "
            "np.save(sys.argv[3], m(x).detach().numpy())")
  subprocess.run([sys.executable, "-c", script, out, str(tmp_path / "images.npy"),
                  str(tmp_path / "logits.npy")], check=True, timeout=120)
  expected = np.asarray(model.apply(variables, images, train=False))
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=0)


def test_export_torch_command_names_a_missing_export(tmp_path):
  with pytest.raises(SystemExit, match=f"error: no exported student at {tmp_path}"):
    torch_export.main(["torch_export", str(tmp_path), str(tmp_path / "out")])
