"""The search's report: one row per method with sizes, test accuracies and attack settings,
plus the plots (reward per update, robust accuracy vs MACs, teacher-vs-student topology).
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # Files only; no display needed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rcnas_jax.nets import arch  # noqa: E402
from rcnas_jax.runtime import parallel, store  # noqa: E402

PHASE_LABELS = {"meta": "meta-training", "finetune": "RC-NAS fine-tuning", "rnas": "R-NAS",
                "random": "random search", "evolution": "regularized evolution"}


def markdown(report: dict) -> str:
  """The report as Markdown: the table, the attack settings and the search statistics."""
  attacks = list(report["rows"][0]["results"])
  header = "| method | params | MACs | " + " | ".join(f"{a} (%)" for a in attacks) + " |"
  lines = [f"# RC-NAS report: {report['target']}", "",
           f"Test split, {report['n_examples']} examples, eval-mode BN; budget "
           f"{report['budget_macs']:,} MACs.", ""]
  for warning in report.get("warnings", []):
    lines += [f"**Warning:** {warning}", ""]
  lines += [header, "|---|---:|---:|" + "---:|" * len(attacks)]
  for row in report["rows"]:
    if "none_fits" in row:  # A method that has no student within the budget.
      lines.append(f"| {row['method']} | none fits: {row['none_fits']} |" +
                   " |" * (1 + len(attacks)))
      continue
    accuracies = " | ".join(f"{100 * row['results'][a]['accuracy']:.2f}" for a in attacks)
    over = "" if row["macs"] <= report["budget_macs"] else " (over budget)"
    lines.append(f"| {row['method']} | {row['params']:,} | {row['macs']:,}{over} | "
                 f"{accuracies} |")
  lines += ["", "Attacks:"] + [f"- {a}: {report['rows'][0]['results'][a]['attack']}"
                               for a in attacks]
  if report.get("selection"):
    lines += ["", selection_table(report["selection"]),
              "", agreement_line(report["proxy_agreement"])]
  lines += ["", "| search phase | evaluations | best validation reward | evaluations to best |",
            "|---|---:|---:|---:|"]
  for phase, stats in report["search"].items():
    lines.append(f"| {PHASE_LABELS[phase]} | {stats['evaluations']} | "
                 f"{stats['best_reward']:.4f} | {stats['evaluations_to_best']} |")
  lines += ["", "The settings of this run are `config.json` beside this file (and report.json's "
            "`config`)."]
  lines += ["", "Wall time per phase (s): " + ", ".join(
      f"{k} {v}" for k, v in report["timings"].items())]
  if report.get("compiles"):
    lines += ["", compile_table(report["timings"], report["compiles"])]
  return "\n".join(lines) + "\n"


def selection_table(selection: dict[str, dict]) -> str:
  """Per method: its evaluations, and its top within-budget students by validation reward
  with their accuracy on the disjoint selection set; the delivered one is marked."""
  lines = ["Each method delivers, of its top within-budget students by validation reward, the "
           "best on the selection set (validation images disjoint from the reward's).", "",
           "| method | evaluations | candidate | MACs | validation reward | selection set (%) |",
           "|---|---:|---:|---:|---:|---:|"]
  for method, s in selection.items():
    evaluations = str(s["evaluations"]) + (f" (+{s['meta_evaluations']} meta-training)"
                                           if s["meta_evaluations"] else "")
    if not s["candidates"]:
      lines.append(f"| {method} | {evaluations} | none fits the budget | | | |")
    for i, e in enumerate(s["candidates"]):
      mark = " (delivered)" if i == s["delivered"] else ""
      accuracy = ("n/a" if e["selection_accuracy"] is None
                  else f"{100 * e['selection_accuracy']:.2f}")
      lines.append(f"| {method if i == 0 else ''} | {evaluations if i == 0 else ''} | "
                   f"{i + 1}{mark} | {e['macs']:,} | {e['reward']:.4f} | {accuracy} |")
  return "\n".join(lines)


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float | None:
  """Kendall's tau-b ((concordant - discordant) pairs, ties corrected); None if one side is
  constant."""
  i, j = np.triu_indices(len(a), 1)
  da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
  pairs = np.count_nonzero(da) * np.count_nonzero(db)
  return float((da * db).sum() / np.sqrt(pairs)) if pairs else None


def proxy_agreement(selection: dict[str, dict], rows: list[dict], attack: str) -> dict:
  """Kendall tau between the distinct delivered students' proxy robust accuracy (the reward's
  validation sample) and their test accuracy after full training under `attack`."""
  trained = {row["method"]: row["results"][attack]["accuracy"] for row in rows
             if attack in row.get("results", {})}
  pairs = {}
  for method, s in selection.items():
    if s["delivered"] is not None and method in trained:
      e = s["candidates"][s["delivered"]]
      key = json.dumps(e["spec"], sort_keys=True)
      pairs.setdefault(key, (e["robust_accuracy"], trained[method]))
  proxy, full = (np.array(x) for x in zip(*pairs.values())) if pairs else ([], [])
  tau = kendall_tau_b(proxy, full) if len(pairs) >= 3 else None
  return {"attack": attack, "students": len(pairs), "kendall_tau": tau}


def agreement_line(agreement: dict) -> str:
  """One sentence: how the proxy ranked the delivered students against full training."""
  n, tau = agreement["students"], agreement["kendall_tau"]
  measured = (f"Kendall tau {tau:.2f}" if tau is not None
              else "too few distinct students, or ties, for a rank correlation")
  return (f"Proxy vs full training over the {n} distinct delivered students (proxy validation "
          f"robust accuracy against test {agreement['attack']} accuracy): {measured}. "
          "`benchmarks/proxy_fidelity.py` measures it over many random students.")


def compile_table(timings: dict, compiles: dict) -> str:
  """Per phase: wall time, XLA compiles, time compiling and tracing, persistent-cache hits."""
  lines = ["| phase | wall (s) | compiles | compiling (s) | tracing (s) | from cache |",
           "|---|---:|---:|---:|---:|---:|"]
  for phase, c in compiles.items():
    lines.append(f"| {phase} | {timings.get(phase, '')} | {c['compiles']} | "
                 f"{c['compile_seconds']:.1f} | {c['trace_seconds']:.1f} | {c['cache_hits']} |")
  total = {k: sum(c[k] for c in compiles.values())
           for k in ("compiles", "compile_seconds", "trace_seconds", "cache_hits")}
  lines.append(f"| total | {sum(timings.get(p, 0) for p in compiles):.1f} | "
               f"{total['compiles']} | {total['compile_seconds']:.1f} | "
               f"{total['trace_seconds']:.1f} | {total['cache_hits']} |")
  return "\n".join(lines)


def plot_rewards(phases: dict[str, list], path: str) -> None:
  """Mean and best reward of each update, per phase."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for phase, episodes in phases.items():
    iterations = sorted({e.iteration for e in episodes})
    rewards = [[e.reward for e in episodes if e.iteration == i] for i in iterations]
    ax.plot(iterations, [np.mean(r) for r in rewards], marker="o", label=PHASE_LABELS[phase])
  ax.set(xlabel="update", ylabel="mean reward of the M students", title="Reward per update")
  if phases:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_accuracy_vs_macs(phases: dict[str, list], budget_macs: int, path: str) -> None:
  """Validation robust accuracy of every evaluated student against its MACs."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for phase, episodes in phases.items():
    valid = [e for e in episodes if e.valid]
    ax.scatter([e.macs for e in valid], [100 * e.robust_accuracy for e in valid], s=14,
               alpha=0.7, label=PHASE_LABELS[phase])
  ax.axvline(budget_macs, color="k", linestyle="--", label="budget")
  ax.set(xlabel="MACs", ylabel="validation robust accuracy (%)", xscale="log",
         title="Evaluated students")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_topology(teacher: arch.NetworkSpec, student: arch.NetworkSpec, path: str) -> None:
  """Per-stage depth and width bars of the teacher and the student (the paper's figure)."""
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
  stages = np.arange(len(teacher.stages))
  for ax, field, label in ((axes[0], "depth", "blocks"), (axes[1], "out_channels", "channels")):
    ax.bar(stages - 0.2, [getattr(s, field) for s in teacher.stages], 0.4, label="teacher")
    ax.bar(stages + 0.2, [getattr(s, field) for s in student.stages], 0.4, label="RC-NAS student")
    for i, s in enumerate(student.stages):
      ax.text(i + 0.2, getattr(s, field), ("R" if s.block == "robust" else "B") +
              ("/2" if s.stride == 2 else ""), ha="center", va="bottom", fontsize=8)
    ax.set(xticks=stages, xticklabels=[f"stage {i + 1}" for i in stages], ylabel=label)
  axes[0].legend()
  fig.suptitle("Teacher vs student (R = robust block, B = basic, /2 = downsamples)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(workdir: str, config, target, rows: list[dict], phases: dict[str, list],
          search: dict[str, dict], timings: dict, compiles: dict | None = None,
          selection: dict | None = None, warnings: list[str] = ()) -> dict:
  """Writes report.json, report.md and the plots (process 0 only); returns the report.

  `phases` maps a phase to its episodes (`env.Episode`), `search` to its statistics
  (`search.summary`), `compiles` to its compilation.CompileStats.to_dict(), and `selection`
  each method to how its student was chosen (`pipeline.selections`); `warnings` head the
  Markdown.
  """
  report = {
      "target": target.key(), "budget_macs": target.budget_macs,
      "n_examples": rows[0]["results"][next(iter(rows[0]["results"]))]["n_examples"],
      "rows": rows,
      "search": search, "selection": selection or {}, "warnings": list(warnings),
      "proxy_agreement": proxy_agreement(selection or {}, rows, target.attack.name),
      "timings": timings, "compiles": compiles or {}, "seed": config.seed,
      "config": config.to_dict(),
  }
  if not parallel.is_primary():
    return report
  store.write_json(os.path.join(workdir, "report.json"), report)
  text = markdown(report)
  store.write_text(os.path.join(workdir, "report.md"), text)
  plot_rewards(phases, os.path.join(workdir, "rewards.png"))
  plot_accuracy_vs_macs(phases, target.budget_macs, os.path.join(workdir, "accuracy_vs_macs.png"))
  student = next((r for r in rows if r["method"] == "RC-NAS"), None)
  if student:
    plot_topology(arch.teacher(target.teacher), arch.spec_from_dict(student["spec"]),
                  os.path.join(workdir, "topology.png"))
  print("\n" + text)
  return report
