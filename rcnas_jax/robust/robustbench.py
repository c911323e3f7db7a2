"""An evaluated student as a RobustBench-style entry and a Markdown page.

The entry holds RobustBench's model-info fields (architecture, params, MACs, dataset, threat
model, eps, clean and per-attack robust accuracy, autoattack_acc, n_examples) plus, per attack,
its exact settings and time, and the gradient-masking warnings. `pipeline.evaluate_export`
(mode='evaluate') writes them as `robustness.json` and `robustness.md`.
"""

from __future__ import annotations

import ml_collections

from rcnas_jax.nets import arch, export
from rcnas_jax.robust import evaluate


def _architecture(spec: arch.NetworkSpec) -> str:
  """A one-line description, e.g. 'pre-act ResNet: stem 16, stages 2x16 basic /1, ...'."""
  stages = ", ".join(f"{s.depth}x{s.channels} {s.block} /{s.stride}" for s in spec.stages)
  return f"pre-act ResNet ({spec.activation}): stem {spec.stem_channels}, stages {stages}"


def _eps_label(eps: float, norm: str) -> str:
  """RobustBench's eps string: '8/255' for L-inf radii on that grid, else the number."""
  if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
    return f"{round(eps * 255)}/255"
  return f"{eps:g}"


def entry(student: export.Student, dataset: str, results: dict[str, dict],
                      e: ml_collections.ConfigDict, warnings: list[str], name: str) -> dict:
  """RobustBench's model-info fields (accuracies in %) plus our per-attack details."""
  percent = lambda r: round(100 * r["accuracy"], 2)
  aa_lite, autoattack = results.get("aa-lite"), results.get("autoattack")
  return {
      "name": name, "architecture": _architecture(student.spec),
      "spec": student.spec.to_dict(), "params": student.meta["params"],
      "macs": student.meta["macs"], "dataset": dataset,
      "threat_model": "Linf" if e.norm == "linf" else "L2", "eps": _eps_label(e.eps, e.norm),
      "clean_acc": percent(results["clean"]) if "clean" in results else None,
      "robust_acc": {k: percent(r) for k, r in results.items() if k != "clean"},
      # Only AutoAttack's standard version is ever written as autoattack_acc.
      "autoattack_acc": percent(autoattack) if autoattack and autoattack["standard"] else None,
      "aa_lite_acc": percent(aa_lite) if aa_lite else None,
      "n_examples": next(iter(results.values()))["n_examples"],
      "attacks": {k: {"settings": r["attack"], "seconds": r["seconds"],
                      **({"after": r["after"]} if "after" in r else {})}
                  for k, r in results.items()},
      "unreliable_evaluation": bool(warnings), "warnings": warnings,
  }


def markdown(entry: dict, results: dict[str, dict]) -> str:
  """The report as Markdown: a header line, the attack table and the warnings."""
  lines = [f"# Robustness of {entry['name']}", "",
           f"{entry['architecture']}; {entry['params']:,} params, {entry['macs']:,} MACs. "
           f"{entry['dataset']} test split, {entry['n_examples']} examples, threat model "
           f"{entry['threat_model']} eps={entry['eps']}, eval-mode BN.", "",
           evaluate.format_table(results), ""]
  for name, label in (("autoattack", "AutoAttack"), ("aa-lite", "AA-lite")):
    if name in results:
      after = ", ".join(f"{k} {100 * v:.2f}%" for k, v in results[name]["after"].items())
      lines += [f"{label}, robust accuracy after each attack: {after}.", ""]
  lines += [f"- WARNING (possible gradient masking): {w}" for w in entry["warnings"]]
  if not entry["warnings"]:
    lines.append("Gradient-masking checks: no warning.")
  return "\n".join(lines) + "\n"
