"""The main job end to end on real digits: results, resume without retraining, CLI."""

import json
import pathlib
import subprocess
import sys

import pytest

from rcnas_jax import config as config_lib, metrics, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config():
  c = config_lib.base_config()
  c.dataset.name = "digits"
  c.dataset.max_train_examples = 256
  c.model.arch = "tiny-8"
  c.attack.eps, c.attack.step_size, c.attack.num_steps = 0.1, 0.05, 2
  c.training.update(epochs=2, batch_size=32, learning_rate=0.05, log_every_steps=4)
  c.evaluation.update(eps=0.1, pgd_steps=3, cw_steps=3, max_examples=64, batch_size=32)
  return c


def test_train_and_evaluate_writes_results_and_resumes(tmp_path):
  c = _tiny_config()
  first = pipeline.run(c, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["dataset"] == "digits" and saved["arch"]["stages"][0]["channels"] == 8
  for name in ("clean", "fgsm", "pgd", "cw"):
    assert saved["results"][name]["n_examples"] == 64
    assert 0.0 <= saved["results"][name]["accuracy"] <= saved["results"]["clean"]["accuracy"]
  assert saved["results"]["clean"]["accuracy"] > 0.3  # 16 steps already beat chance (0.1).
  assert "| pgd |" in (tmp_path / "results.md").read_text()
  logged = len(metrics.read(tmp_path / "metrics.jsonl"))
  second = pipeline.run(c, str(tmp_path))  # Finished training is restored, not redone.
  assert len(metrics.read(tmp_path / "metrics.jsonl")) == logged
  assert second["clean"]["accuracy"] == first["clean"]["accuracy"]
  assert second["pgd"]["accuracy"] == first["pgd"]["accuracy"]


def test_missing_dataset_stops_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "rcnas_jax.main", "--config=configs/cifar10.py",
       f"--config.dataset.data_dir={tmp_path}", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cifar10 not found under") and str(tmp_path) in last
