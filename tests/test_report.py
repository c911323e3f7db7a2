"""The report: Markdown table with settings, and the three plots."""

import numpy as np
import pytest
from scipy import stats

from rcnas_jax import config as config_lib, pipeline, report
from rcnas_jax.nets import arch
from rcnas_jax.rl import search
from rcnas_jax.rl.env import Episode
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust.attacks import ThreatModel


def _row(method, macs, accuracy):
  results = {"clean": {"accuracy": accuracy + 0.2, "n_examples": 50, "attack": "clean"},
             "pgd": {"accuracy": accuracy, "n_examples": 50, "attack": "PGD-20 (CE, ...)"}}
  return {"method": method, "params": 1234, "macs": macs, "results": results,
          "spec": arch.TEACHERS["tiny-8"].to_dict()}


def test_report_files_and_table(tmp_path):
  task = Task("digits", ThreatModel("cw", eps=0.1, num_steps=10), "tiny-8", 1000)
  episodes = [Episode("finetune", i // 2, i % 2, task.key(), reward=0.1 * i, valid=True,
                      macs=500 + i, robust_accuracy=0.1 * i) for i in range(6)]
  rows = [_row("teacher (tiny-8)", 5000, 0.5), _row("RC-NAS", 900, 0.4)]
  phases = {"finetune": episodes}
  result = report.write(str(tmp_path), config_lib.base_config(), task, rows, phases,
                        search.summary(phases), {"meta-training": 1.0})
  text = (tmp_path / "report.md").read_text()
  assert "| teacher (tiny-8) | 1,234 | 5,000 (over budget) | 70.00 | 50.00 |" in text
  assert "| RC-NAS | 1,234 | 900 | 60.00 | 40.00 |" in text
  assert "- pgd: PGD-20 (CE, ...)" in text
  assert result["search"]["finetune"] == {"evaluations": 6, "best_reward": 0.5,
                                          "evaluations_to_best": 6}
  for name in ("rewards.png", "accuracy_vs_macs.png", "topology.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_table_sums_the_phases():
  timings = {"teachers": 10.0, "meta-training": 20.5}
  compiles = {"teachers": {"compiles": 3, "compile_seconds": 4.0, "trace_seconds": 0.5,
                           "cache_hits": 1, "cache_misses": 2},
              "meta-training": {"compiles": 7, "compile_seconds": 12.25, "trace_seconds": 1.0,
                                "cache_hits": 0, "cache_misses": 7}}
  lines = report.compile_table(timings, compiles).splitlines()
  assert lines[2] == "| teachers | 10.0 | 3 | 4.0 | 0.5 | 1 |"
  assert lines[-1] == "| total | 30.5 | 10 | 16.2 | 1.5 | 1 |"


def test_report_lists_compiles_when_given(tmp_path):
  task = Task("digits", ThreatModel("cw", eps=0.1, num_steps=10), "tiny-8", 1000)
  rows = [_row("teacher (tiny-8)", 5000, 0.5)]
  compiles = {"teachers": {"compiles": 2, "compile_seconds": 1.0, "trace_seconds": 0.25,
                           "cache_hits": 2, "cache_misses": 0}}
  result = report.write(str(tmp_path), config_lib.base_config(), task, rows, {}, {},
                        {"teachers": 3.0}, compiles)
  assert result["compiles"] == compiles
  assert "| teachers | 3.0 | 2 | 1.0 | 0.2 | 2 |" in (tmp_path / "report.md").read_text()


def test_selection_table_marks_the_delivered_student_and_methods_where_none_fits(tmp_path):
  task = Task("digits", ThreatModel("cw", eps=0.1, num_steps=10), "tiny-8", 1000)
  student = lambda phase, i, reward, macs, selection: Episode(
      phase, i, 0, task.key(), reward=reward, valid=True, macs=macs, spec={"i": i},
      selection_accuracy=selection)
  phases = {"meta": [student("meta", i, 0.1, 10, 0.1) for i in range(8)],
            "finetune": [student("finetune", 0, 0.6, 900, 0.30),
                         student("finetune", 1, 0.9, 1500, 0.9),  # Over budget.
                         student("finetune", 2, 0.5, 800, 0.35),
                         student("finetune", 3, 0.2, 10, 0.2)],
            "random": [student("random", 0, 0.7, 2000, 0.5)]}
  chosen = pipeline.selections(phases, task.budget_macs, top_k=2)
  assert chosen["RC-NAS"]["delivered"] == 1  # The second by reward, the best on selection.
  assert [c["macs"] for c in chosen["RC-NAS"]["candidates"]] == [900, 800]
  assert chosen["RC-NAS"]["meta_evaluations"] == 8
  assert chosen["random search"]["delivered"] is None and "R-NAS" not in chosen
  rows = [_row("teacher (tiny-8)", 5000, 0.5), _row("RC-NAS", 800, 0.4),
          {"method": "random search", "none_fits": "0 of its 1 students within budget"}]
  report.write(str(tmp_path), config_lib.base_config(), task, rows, phases,
               search.summary(phases), {}, None, chosen, ["the teacher saw validation images"])
  text = (tmp_path / "report.md").read_text()
  assert "**Warning:** the teacher saw validation images" in text
  assert (
      "| random search | none fits: 0 of its 1 students within budget | | | |") in text
  assert "| RC-NAS | 4 (+8 meta-training) | 1 | 900 | 0.6000 | 30.00 |" in text
  assert "|  |  | 2 (delivered) | 800 | 0.5000 | 35.00 |" in text
  assert "| random search | 1 | none fits the budget | | | |" in text


def test_proxy_agreement_ranks_distinct_delivered_students_as_scipy():
  proxy = [0.30, 0.10, 0.40, 0.20, 0.25]
  trained = [0.80, 0.70, 0.75, 0.60, 0.80]
  methods = ["RC-NAS", "R-NAS", "random search", "regularized evolution", "copy"]
  spec = lambda i: {"stages": i % 4}  # "copy" delivered RC-NAS's student: counted once.
  selection = {m: {"delivered": 0, "candidates": [{"spec": spec(i), "robust_accuracy": p}]}
               for i, (m, p) in enumerate(zip(methods, proxy))}
  selection["none"] = {"delivered": None, "candidates": []}
  rows = [{"method": m, "results": {"cw": {"accuracy": a}}} for m, a in zip(methods, trained)]
  rows += [{"method": "none", "none_fits": "0 of its 4 students within budget"}]
  agreement = report.proxy_agreement(selection, rows, "cw")
  expected = stats.kendalltau(proxy[:4], trained[:4]).statistic
  assert agreement == {"attack": "cw", "students": 4, "kendall_tau": pytest.approx(expected)}
  assert "Kendall tau 0.33" in report.agreement_line(agreement)
  assert report.proxy_agreement(selection, rows[:2], "cw")["kendall_tau"] is None
  assert report.kendall_tau_b(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) is None
