"""The report: Markdown table with settings, and the three plots."""

from rcnas_jax import arch, config as config_lib, report
from rcnas_jax.state import Task, ThreatModel


def _row(method, macs, accuracy):
  results = {"clean": {"accuracy": accuracy + 0.2, "n_examples": 50, "attack": "clean"},
             "pgd": {"accuracy": accuracy, "n_examples": 50, "attack": "PGD-20 (CE, ...)"}}
  return {"method": method, "params": 1234, "macs": macs, "results": results,
          "spec": arch.TEACHERS["tiny-8"].to_dict()}


def test_report_files_and_table(tmp_path):
  task = Task("digits", ThreatModel("cw", 0.1, 10), "tiny-8", 1000)
  episodes = [{"phase": "finetune", "iteration": i // 2, "reward": 0.1 * i, "valid": True,
               "macs": 500 + i, "robust_accuracy": 0.1 * i} for i in range(6)]
  rows = [_row("teacher (tiny-8)", 5000, 0.5), _row("RC-NAS", 900, 0.4)]
  result = report.write(str(tmp_path), config_lib.base_config(), task, rows,
                        {"finetune": episodes}, {"meta-training": 1.0})
  text = (tmp_path / "report.md").read_text()
  assert "| teacher (tiny-8) | 1,234 | 5,000 (over budget) | 70.00 | 50.00 |" in text
  assert "| RC-NAS | 1,234 | 900 | 60.00 | 40.00 |" in text
  assert "- pgd: PGD-20 (CE, ...)" in text
  assert result["search"]["finetune"] == {"evaluations": 6, "best_reward": 0.5,
                                          "evaluations_to_best": 6}
  for name in ("rewards.png", "accuracy_vs_macs.png", "topology.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
