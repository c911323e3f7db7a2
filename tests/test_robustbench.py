"""RobustBench-style entries, and mode='evaluate': an exported student in, JSON and Markdown out."""

import json
import shutil

import jax
import pytest

from rcnas_jax import config as config_lib, data, pipeline
from rcnas_jax.nets import arch, export, models
from rcnas_jax.robust import robustbench

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2)))


def _config(checkpoint: str):
  c = config_lib.base_config()
  c.mode, c.checkpoint = "evaluate", checkpoint
  c.dataset.name = "mnist5k"  # The student's own record (digits) wins.
  c.evaluation.update(eps=8 / 255, attacks=("clean", "apgd-ce", "aa-lite"),
                      apgd_steps=3, apgd_targets=2, square_queries=5, max_examples=24,
                      batch_size=8, check_examples=16, loop="rolled")
  return c


@pytest.fixture(scope="module")
def student(tmp_path_factory):
  info = data.load("digits").info
  model = models.build(SPEC, info.num_classes, info.mean, info.std)
  path = str(tmp_path_factory.mktemp("run") / "export")
  export.export_student(path, SPEC, models.init(model, jax.random.key(0), info.image_shape),
                        num_classes=info.num_classes, image_shape=info.image_shape,
                        mean=info.mean, std=info.std, dataset="digits")
  return path


def test_entry_in_percent_with_robustbenchs_eps_label():
  student = export.Student(SPEC, {}, None, {"params": 123, "macs": 456})
  results = {"clean": {"accuracy": 0.9, "n_examples": 10, "attack": "clean", "seconds": 1.0},
             "pgd": {"accuracy": 0.456789, "n_examples": 10, "attack": "PGD-20 (...)",
                     "seconds": 2.0}}
  e = config_lib.base_config().evaluation
  entry = robustbench.entry(student, "digits", results, e, [], "run/export")
  assert (entry["clean_acc"], entry["robust_acc"], entry["aa_lite_acc"],
          entry["autoattack_acc"]) == (90.0, {"pgd": 45.68}, None, None)
  assert (entry["eps"], entry["threat_model"], entry["n_examples"]) == ("8/255", "Linf", 10)
  assert entry["architecture"] == ("pre-act ResNet (relu): stem 16, stages 1x8 basic /1, "
                                   "1x16 basic /2")
  e.update(eps=0.3, norm="l2")
  assert robustbench.entry(student, "digits", results, e, ["masked"], "x")["eps"] == "0.3"
  assert "- WARNING (possible gradient masking): masked" in robustbench.markdown(
      robustbench.entry(student, "digits", results, e, ["masked"], "x"), results)


@pytest.mark.parametrize("standard", [True, False])
def test_only_the_standard_autoattack_is_written_as_autoattack_acc(standard):
  student = export.Student(SPEC, {}, None, {"params": 123, "macs": 456})
  composite = {"accuracy": 0.4, "n_examples": 10, "attack": "AutoAttack (...)", "seconds": 3.0,
               "after": {"apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.42, "square": 0.4},
               "standard": standard}
  results = {"autoattack": composite, "aa-lite": {**composite, "accuracy": 0.41}}
  entry = robustbench.entry(student, "digits", results, config_lib.base_config().evaluation,
                            [], "run/export")
  assert entry["autoattack_acc"] == (40.0 if standard else None)
  assert entry["aa_lite_acc"] == 41.0 and entry["robust_acc"]["autoattack"] == 40.0
  text = robustbench.markdown(entry, results)
  assert ("AutoAttack, robust accuracy after each attack: apgd-ce 50.00%, apgd-t 45.00%, "
          "fab-t 42.00%, square 40.00%.") in text


def test_report_fields_and_resume(student, tmp_path):
  entry = pipeline.run(_config(student), str(tmp_path))
  saved = json.loads((tmp_path / "robustness.json").read_text())
  assert saved == json.loads(json.dumps(entry))
  assert (entry["dataset"], entry["threat_model"], entry["eps"], entry["n_examples"]) == (
      "digits", "Linf", "8/255", 24)
  assert entry["params"] == arch.count_params(SPEC, 10, 1)
  assert entry["macs"] == arch.count_macs(SPEC, 8, 10, 1)
  assert list(entry["robust_acc"]) == ["apgd-ce", "aa-lite"]
  assert entry["aa_lite_acc"] == entry["robust_acc"]["aa-lite"] <= entry["robust_acc"]["apgd-ce"]
  assert entry["aa_lite_acc"] <= entry["clean_acc"]
  assert list(entry["attacks"]["aa-lite"]["after"]) == ["apgd-ce", "apgd-t", "square"]
  assert entry["unreliable_evaluation"] == bool(entry["warnings"])
  text = (tmp_path / "robustness.md").read_text()
  assert "| aa-lite |" in text and "APGD-T-3 (targeted DLR, 2 targets" in text
  [progress] = tmp_path.glob("evaluation-*.jsonl")  # Named after the weights and the seed.
  lines = progress.read_text()
  config = _config(student)
  config.evaluation.check_examples = 0
  again = pipeline.run(config, str(tmp_path))
  assert progress.read_text() == lines  # Nothing recomputed.
  assert again["robust_acc"] == entry["robust_acc"] and again["warnings"] == []
  config.seed += 1  # Another seed (or other weights) never reuses these results.
  pipeline.run(config, str(tmp_path))
  assert len(list(tmp_path.glob("evaluation-*.jsonl"))) == 2


def test_wrong_dataset_shape_is_one_line(student, tmp_path):
  c = _config(student)
  with open(f"{student}/student.json") as f:
    meta = json.load(f)
  meta["dataset"] = ""
  with open(f"{student}/student.json", "w") as f:
    json.dump(meta, f)
  with pytest.raises(config_lib.ConfigError, match="mnist5k images are"):
    pipeline.run(c, str(tmp_path))


def test_a_missing_or_damaged_export_is_one_error_line(student, tmp_path):
  from rcnas_jax import main
  missing = _config(str(tmp_path / "nowhere"))
  with pytest.raises(SystemExit) as stop:
    main.job(missing, str(tmp_path / "a"))
  assert str(stop.value.code) == (f"error: no exported student at {tmp_path / 'nowhere'} "
                                  "(expected student.json and variables/)")
  damaged = tmp_path / "damaged"
  shutil.copytree(student, damaged)
  for data_file in [p for p in (damaged / "variables").rglob("*") if p.is_file()]:
    data_file.write_bytes(b"")
  with pytest.raises(SystemExit) as stop:
    main.job(_config(str(damaged)), str(tmp_path / "b"))
  message = str(stop.value.code)
  assert message.startswith(f"error: the exported student at {damaged} is damaged: variables/")
  assert "\n" not in message
