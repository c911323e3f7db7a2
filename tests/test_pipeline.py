"""The main job end to end on real digits: results, resume without retraining, CLI."""

import json
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

import rcnas_jax
from rcnas_jax import config as config_lib, pipeline
from rcnas_jax.nets import arch
from rcnas_jax.runtime import metrics

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
  # R-NAS is fine-tuning from the fresh policy: the same code, covered by the search tests.
  c.search.update(datasets=("digits",), attacks=("fgsm",), teachers=("tiny-8",),
                  students_per_update=2, meta_updates=1, finetune_updates=1, probe_size=16,
                  lipschitz_iterations=5, baselines=("random",))
  c.search.target.update(dataset="digits", attack="pgd-2", teacher="tiny-8", budget_fraction=0.9)
  c.search.proxy.update(epochs=1, train_examples=64, validation_examples=32, batch_size=32,
                        attack_steps=1)
  c.search.policy.hidden = 8
  # Two attacks: every new student compiles each of them, and the tests run this search often.
  c.evaluation.update(eps=0.1, pgd_steps=2, max_examples=32, batch_size=32,
                      attacks=("clean", "pgd"))
  return c


# The runs of the tiny search share the test processes' compilation cache (conftest.py), so the
# interrupted runs in subprocesses and the reruns load their programs from it.
COMPILATION_CACHE = str(ROOT / ".cache" / "jax")


@pytest.mark.slow
@pytest.mark.long
def test_the_tiny_search_resumes_survives_interruptions_and_reuses_across_settings(tmp_path):
  """One uninterrupted run of the whole search is the reference for three checks:
  - it reports every method, and a second run rebuilds the same report from the workdir;
  - SIGKILLs and a SIGTERM at random moments across the phases, each followed by a rerun,
    end with the same report;
  - a rerun with other evaluation settings reuses every artifact they do not change and
    recomputes the rest, and with resume='strict' stops, naming the changed fields.
  One test, so the reference is computed once whatever worker runs it.
  """
  c = _tiny_search_config()
  c.compilation_cache_dir = COMPILATION_CACHE
  workdir = tmp_path / "reference"
  reference = pipeline.run(c, str(workdir))
  _reports_every_method_and_resumes(c, workdir, reference)
  _kills_and_a_sigterm_leave_the_same_report(c, reference, tmp_path / "interrupted")
  _other_settings_reuse_what_they_share(c, workdir, reference, tmp_path / "changed")


def _as_json(value):
  return json.loads(json.dumps(value))


def _trained(report: dict) -> list[dict]:
  """The report's rows of trained networks (not those of methods where none fits)."""
  return [row for row in report["rows"] if "none_fits" not in row]


def _untimed(report: dict) -> dict:
  """The report's rows and search statistics without the attacks' timings."""
  rows = [{**row, "results": {name: {k: v for k, v in r.items() if k != "seconds"}
                              for name, r in row["results"].items()}}
          for row in _as_json(_trained(report))]
  return {"rows": rows, "search": report["search"]}


def _reports_every_method_and_resumes(c, workdir: pathlib.Path, first: dict) -> None:
  """Every method's row, the files, the export; a second run rebuilds the same report."""
  # A method delivers its best within-budget student, or the report says none fits.
  # tiny-8's budget is below the smallest hand-scaled network (robust stages keep 16 channels).
  delivered = [m for m, s in first["selection"].items() if s["delivered"] is not None]
  assert set(first["selection"]) == {"RC-NAS", "random search"} and "RC-NAS" in delivered
  trained = _trained(first)
  assert [row["method"] for row in trained] == ["teacher (tiny-8)"] + delivered
  assert all(row["macs"] <= first["budget_macs"] for row in trained[1:])
  assert {row["method"] for row in first["rows"]} - {row["method"] for row in trained} == {
      "hand-scaled RobustResNet"} | set(first["selection"]) - set(delivered)
  assert list(first["search"]) == ["meta", "finetune", "random"]
  for row in trained:
    assert set(row["results"]) == {"clean", "pgd"}
    assert row["results"]["pgd"]["accuracy"] <= row["results"]["clean"]["accuracy"]
  assert first["search"]["finetune"]["evaluations"] == 2
  assert first["search"]["meta"]["evaluations"] == 2
  for name in ("report.md", "report.json", "rewards.png", "accuracy_vs_macs.png",
               "topology.png", "export/student.json", "evaluations.jsonl", "config.json"):
    assert (workdir / name).exists(), name
  assert json.loads((workdir / "report.json").read_text())["config"] == _as_json(c.to_dict())
  student = rcnas_jax.load_student(str(workdir / "export"))
  rc_nas = next(r for r in first["rows"] if r["method"] == "RC-NAS")
  assert student.spec == arch.spec_from_dict(rc_nas["spec"])
  assert student.predict(np.zeros((2, 8, 8, 1), np.uint8)).shape == (2, 10)
  # A second run finds every phase finished and rebuilds the same report.
  second = pipeline.run(c, str(workdir))
  assert _as_json(second["rows"]) == _as_json(first["rows"])
  assert second["search"] == first["search"]


CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
import test_pipeline


def get_config():
  c = test_pipeline._tiny_search_config()
  c.compilation_cache_dir = {cache!r}
  return c
"""


def _moments(workdir: pathlib.Path) -> list[tuple[str, callable, signal.Signals]]:
  """Where to interrupt a run: an event in each phase (a file appears), and the signal."""
  has = lambda pattern: lambda: bool(list(workdir.glob(pattern)))
  lines = lambda name: lambda: (workdir / name).exists() and (workdir / name).stat().st_size > 0
  return [("teacher training", has("teachers/*/metrics.jsonl"), signal.SIGKILL),
          ("meta-training", lines("evaluations.jsonl"), signal.SIGTERM),
          ("fine-tuning", has("search/finetune-*"), signal.SIGKILL),
          ("the final trainings", has("final/d*"), signal.SIGKILL)]


def _kills_and_a_sigterm_leave_the_same_report(c, reference: dict, root: pathlib.Path) -> None:
  """Each moment of `_moments` interrupts a fresh run of the command; a last run finishes."""
  root.mkdir()
  seed = random.randrange(10_000)
  rng = random.Random(seed)
  config_file = root / "tiny.py"
  config_file.write_text(CONFIG_FILE.format(tests=str(ROOT / "tests"),
                                            cache=c.compilation_cache_dir))
  workdir = root / "run"
  command = [sys.executable, "-m", "rcnas_jax.main", f"--config={config_file}",
             f"--workdir={workdir}"]
  interrupted = {signal.SIGKILL: [], signal.SIGTERM: []}
  for phase, happened, sig in _moments(workdir):
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    while process.poll() is None and not happened():
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))  # A random moment after the event.
    process.send_signal(sig)
    out, err = process.communicate(timeout=600)
    if sig == signal.SIGKILL and process.returncode == -signal.SIGKILL:
      interrupted[sig].append(phase)
    elif sig == signal.SIGTERM and process.returncode == 0 and "stopped by SIGTERM" in out:
      interrupted[sig].append(phase)
      assert out.strip().splitlines()[-1].endswith(
          f"everything finished is saved in {workdir}: run the same command again to resume")
    else:  # The run finished before the signal, or failed.
      assert process.returncode == 0 and "Traceback" not in err, (seed, phase, err[-3000:])
    assert not (workdir / "report.json").exists() or process.returncode == 0
  assert len(interrupted[signal.SIGKILL]) >= 3 and interrupted[signal.SIGTERM], (seed,
                                                                                 interrupted)
  finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert finished.returncode == 0, finished.stderr[-3000:]
  resumed = json.loads((workdir / "report.json").read_text())
  assert _untimed(resumed) == _untimed(reference), (seed, interrupted)


def _other_settings_reuse_what_they_share(c, reference_dir: pathlib.Path, reference: dict,
                                          workdir: pathlib.Path) -> None:
  """Other evaluation settings: strict stops, auto reuses all but the test evaluations."""
  shutil.copytree(reference_dir, workdir)
  listing = lambda pattern: sorted(str(p.relative_to(workdir)) for p in workdir.glob(pattern))
  reused = ("teachers/*/checkpoints/*", "search/*/checkpoints/*", "final/*/checkpoints/*",
            "evaluations.jsonl", "probes.json")
  before = {p: listing(p) for p in reused}
  evaluations = (workdir / "evaluations.jsonl").read_text()
  changed = ml_collections.ConfigDict(c.to_dict())
  changed.evaluation.eps = 0.05
  changed.evaluation.pgd_steps = 3
  strict = ml_collections.ConfigDict(changed.to_dict())
  strict.resume = "strict"
  with pytest.raises(config_lib.ConfigError) as error:
    pipeline.run(strict, str(workdir))
  assert str(error.value) == (
      f"config.resume='strict': {workdir} was made with other settings: evaluation.eps (0.1 -> "
      "0.05), evaluation.pgd_steps (2 -> 3) (use another workdir, or resume='auto' to reuse "
      "what they share)")
  assert listing("**/*") == sorted(str(p.relative_to(reference_dir))
                                   for p in reference_dir.glob("**/*"))  # Nothing touched.
  report = pipeline.run(changed, str(workdir))
  # Reused: teachers, proxy evaluations, search phases and final trainings, untouched.
  assert {p: listing(p) for p in reused} == before
  assert (workdir / "evaluations.jsonl").read_text() == evaluations
  assert [r["training"] for r in _trained(report)[1:]] == [
      r["training"] for r in _trained(reference)[1:]]
  # Recomputed: every test-split evaluation, under the new attack.
  for new, old in zip(_trained(report), _trained(reference)):
    assert new["evaluation"] != old["evaluation"]
    assert new["results"]["pgd"]["attack"].startswith("PGD-3 (CE, L-inf eps=0.05 (12.8/255)")
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["evaluation"]["eps"] == 0.05 and saved["evaluation"]["pgd_steps"] == 3
  assert json.loads((workdir / "report.json").read_text())["config"] == saved
  assert "PGD-3 (CE, L-inf eps=0.05" in (workdir / "report.md").read_text()
  exported = json.loads((workdir / "export" / "metrics.json").read_text())
  assert exported["evaluation"] == next(r for r in report["rows"]
                                        if r["method"] == "RC-NAS")["evaluation"]
