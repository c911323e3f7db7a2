"""The main job end to end on real digits: results, resume without retraining, CLI."""

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import rcnas_jax
from rcnas_jax import arch, config as config_lib, metrics, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config():
  c = config_lib.base_config()
  c.mode = "train"
  c.dataset.name = "digits"
  c.dataset.max_train_examples = 256
  c.model.arch = "tiny-8"
  c.attack.eps, c.attack.step_size, c.attack.num_steps = 0.1, 0.05, 2
  c.training.update(epochs=2, batch_size=32, learning_rate=0.05, log_every_steps=4)
  c.evaluation.update(eps=0.1, pgd_steps=3, cw_steps=3, max_examples=64, batch_size=32,
                      attacks=("clean", "fgsm", "pgd", "cw"))
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
  [log] = tmp_path.glob("training-*/metrics.jsonl")  # Keyed by the training's settings.
  logged = len(metrics.read(log))
  second = pipeline.run(c, str(tmp_path))  # Finished training is restored, not redone.
  assert len(metrics.read(log)) == logged
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


def _tiny_search_config():
  c = config_lib.base_config()
  c.mode = "search"
  c.dataset.max_train_examples = 256
  c.attack.update(eps=0.1, step_size=0.05, num_steps=1, loop="rolled")
  c.training.update(epochs=1, batch_size=32, learning_rate=0.05, log_every_steps=4)
  c.teacher.epochs = 1
  c.search.update(datasets=("digits",), attacks=("fgsm",), teachers=("tiny-8",),
                  students_per_update=2, meta_updates=1, finetune_updates=1, probe_size=16,
                  lipschitz_iterations=5)
  c.search.target.update(dataset="digits", attack="pgd-2", teacher="tiny-8", budget_fraction=0.5)
  c.search.proxy.update(epochs=1, train_examples=64, validation_examples=32, batch_size=32,
                        attack_steps=1)
  c.search.policy.hidden = 8
  c.evaluation.update(eps=0.1, pgd_steps=2, cw_steps=2, max_examples=32, batch_size=32,
                      attacks=("clean", "fgsm", "pgd", "cw"))
  return c


@pytest.mark.slow
def test_search_pipeline_reports_every_method_and_resumes_to_the_same_report(tmp_path):
  c = _tiny_search_config()
  first = pipeline.run(c, str(tmp_path))
  methods = [row["method"] for row in first["rows"]]
  assert methods[0] == "teacher (tiny-8)" and methods[1] == "hand-scaled RobustResNet"
  assert set(methods[2:]) <= {"random search", "R-NAS", "RC-NAS"} and "RC-NAS" in methods
  for row in first["rows"]:
    assert set(row["results"]) == {"clean", "fgsm", "pgd", "cw"}
    assert row["results"]["pgd"]["accuracy"] <= row["results"]["clean"]["accuracy"]
  assert first["search"]["finetune"]["evaluations"] == 2
  assert first["search"]["meta"]["evaluations"] == 2
  for name in ("report.md", "report.json", "rewards.png", "accuracy_vs_macs.png",
               "topology.png", "export/student.json", "evaluations.jsonl"):
    assert (tmp_path / name).exists(), name
  student = rcnas_jax.load_student(str(tmp_path / "export"))
  rc_nas = next(r for r in first["rows"] if r["method"] == "RC-NAS")
  assert student.spec == arch.spec_from_dict(rc_nas["spec"])
  assert student.predict(np.zeros((2, 8, 8, 1), np.uint8)).shape == (2, 10)
  # A second run finds every phase finished and rebuilds the same report.
  second = pipeline.run(c, str(tmp_path))
  as_json = lambda value: json.loads(json.dumps(value))
  assert as_json(second["rows"]) == as_json(first["rows"])
  assert second["search"] == first["search"]
  # A run killed (SIGKILL) in the middle of meta-training finishes with the same report.
  killed = tmp_path / "killed"
  run = ("import sys; sys.path.insert(0, 'tests'); import test_pipeline as t; "
         "from rcnas_jax import pipeline; pipeline.run(t._tiny_search_config(), sys.argv[1])")
  process = subprocess.Popen([sys.executable, "-c", run, str(killed)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  evaluations = killed / "evaluations.jsonl"
  while process.poll() is None and not (evaluations.exists() and evaluations.stat().st_size):
    time.sleep(0.1)
  process.kill()
  assert process.wait() != 0 and not (killed / "report.json").exists()
  resumed = pipeline.run(c, str(killed))
  untimed = lambda rows: [{**row, "results": {name: {k: v for k, v in r.items() if k != "seconds"}
                                              for name, r in row["results"].items()}}
                          for row in as_json(rows)]
  assert untimed(resumed["rows"]) == untimed(first["rows"])
  assert resumed["search"] == first["search"]
