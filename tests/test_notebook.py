"""The Colab notebook runs end to end on CPU: a tiny mode='train' config, report, export, load."""

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"

TINY = ["--config.mode=train", "--config.model.arch=tiny-8", "--config.training.epochs=1",
        "--config.training.batch_size=64", "--config.attack.num_steps=1",
        "--config.evaluation.max_examples=64", "--config.evaluation.batch_size=64",
        "--config.evaluation.attacks=('clean', 'fgsm')"]


def _parametrised(workdir: pathlib.Path):
  """The notebook with its parameters cell replaced: no install, a tiny run in `workdir`."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  cell.source = "\n".join([
      'CONFIG = "configs/quickstart.py"', f"OVERRIDES = {TINY!r}", f"WORKDIR = {str(workdir)!r}",
      "INSTALL = False", 'REPO = ""', f"REPO_DIR = {str(ROOT)!r}"])
  return notebook


def _outputs(cell) -> str:
  return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/markdown", ""))
                 for o in cell.get("outputs", []))


@pytest.mark.slow
def test_notebook_runs_the_tiny_config_and_reloads_the_student(tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = _parametrised(tmp_path / "run")
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "\n".join(_outputs(c) for c in notebook.cells if c.cell_type == "code")
  assert "accelerator: cpu" in text
  assert "2 cpu device(s)" in text
  assert "| clean |" in text and "| fgsm |" in text
  assert "| training |" in text  # The compile table.
  assert "clean accuracy of the reloaded student on all 359 test images" in text
  assert (tmp_path / "run" / "export" / "student.json").exists()
