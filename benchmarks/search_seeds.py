"""The whole pipeline over several seeds: each method's test robust accuracy, mean +- std, and
RC-NAS's paired differences with the other methods.

  python benchmarks/search_seeds.py --config=configs/quickstart.py --seeds=0,1,2,3,4 \
      --workdir=runs/search_seeds

Each seed runs `pipeline.rc_nas` in its own workdir (resumable: a killed run continues where it
stopped). Every seed shares the validation split (`dataset.split_seed`), which no teacher
trains on; the seed changes the teachers' initialisation, the searches and the trainings. A
method with no within-budget student in a seed has no number there, and the table counts it.
Paired differences (RC-NAS minus a method, over the seeds where both delivered) come with a
Student-t 95% interval. Writes search_seeds.md and search_seeds.json to --out.
"""

import json
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from scipy import stats  # noqa: E402

from rcnas_jax import pipeline  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.",
                                lock_config=False)
flags.DEFINE_string("workdir", "runs/search_seeds", "One subfolder per seed.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (config.seed).")
flags.DEFINE_string("out", "benchmarks/results", "Where the table and JSON go.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS
REFERENCE = "RC-NAS"


def accuracies(report: dict) -> dict[str, dict[str, float]]:
  """Per method (students only, no teacher): test accuracy per evaluation attack."""
  return {row["method"]: {a: r["accuracy"] for a, r in row["results"].items()}
          for row in report["rows"] if "results" in row and "spec" in row
          and not row["method"].startswith("teacher")}


def mean_std(values: list[float]) -> str:
  """'mean +- std (n)' in percent; std over seeds with ddof=1."""
  if not values:
    return "none fits"
  std = np.std(values, ddof=1) if len(values) > 1 else float("nan")
  return f"{100 * np.mean(values):.1f} ± {100 * std:.1f} ({len(values)})"


def paired(differences: list[float]) -> tuple[float, float, float]:
  """Mean paired difference and its Student-t 95% interval."""
  d = np.asarray(differences)
  if len(d) < 2:
    return float(d.mean()) if len(d) else float("nan"), float("nan"), float("nan")
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def table(per_seed: dict[int, dict], attacks: list[str]) -> str:
  """Methods' accuracies over seeds, then RC-NAS's paired differences, as Markdown."""
  methods = list(dict.fromkeys(m for r in per_seed.values() for m in r["accuracy"]))
  methods += sorted({m for r in per_seed.values() for m in r["none_fits"]} - set(methods))
  lines = [f"{len(per_seed)} seeds ({', '.join(map(str, per_seed))}); test accuracy in %, "
           "mean ± std (seeds with a within-budget student).", "",
           "| method | " + " | ".join(attacks)
           + " | evaluations per seed (RC-NAS: with meta-training's) |",
           "|---|" + "---|" * (len(attacks) + 1)]
  for m in methods:
    cells = [mean_std([r["accuracy"][m][a] for r in per_seed.values() if m in r["accuracy"]])
             for a in attacks]
    evaluations = sorted({r["evaluations"].get(m, "-") for r in per_seed.values()}, key=str)
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {', '.join(map(str, evaluations))} |")
  lines += ["", f"Paired differences, {REFERENCE} minus each method, in points "
            "(mean [Student-t 95% CI], seeds where both delivered):", "",
            "| method | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
  for m in methods:
    if m == REFERENCE:
      continue
    cells = []
    for a in attacks:
      both = [r["accuracy"][REFERENCE][a] - r["accuracy"][m][a] for r in per_seed.values()
              if REFERENCE in r["accuracy"] and m in r["accuracy"]]
      mean, low, high = paired(both)
      cells.append(f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] ({len(both)})")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  base = FLAGS.config
  per_seed = {}
  for seed in map(int, FLAGS.seeds):
    config = ml_collections.ConfigDict(base.to_dict())
    config.seed = seed
    config.compilation_cache_dir = os.path.join(FLAGS.workdir, "jax_cache")  # Shared by seeds.
    workdir = os.path.join(FLAGS.workdir, f"seed{seed}")
    report = pipeline.run(config, workdir)
    per_seed[seed] = {
        "accuracy": accuracies(report),
        "none_fits": {r["method"]: r["none_fits"] for r in report["rows"] if "none_fits" in r},
        "evaluations": {m: s["evaluations"] + s["meta_evaluations"]
                        for m, s in report["selection"].items()},
        "attacks": {a: r["attack"] for a, r in report["rows"][0]["results"].items()}}
    jax.clear_caches()  # Each compiled program holds memory maps: free the finished seed's.
    print(f"seed {seed} done", flush=True)
  attacks = list(next(iter(per_seed.values()))["attacks"])
  text = table(per_seed, attacks)
  settings = next(iter(per_seed.values()))["attacks"]
  text += "\n\nAttacks: " + "; ".join(f"{a}: {s}" for a, s in settings.items())
  print("\n" + text)
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "search_seeds.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(FLAGS.out, "search_seeds.json"), "w") as f:
    json.dump(per_seed, f, indent=1)


if __name__ == "__main__":
  app.run(main)
