"""Does meta-training pay? Evaluations to the best reward: RC-NAS fine-tuning vs R-NAS, per seed.

  python benchmarks/evaluations_to_best.py --config=configs/quickstart.py --seeds=0,1,2 \
      --config.search.finetune_updates=10 --workdir=runs/evaluations_to_best

For each seed: meta-training, then fine-tuning of the meta-trained policy on the held-out target
(RC-NAS) and the same fine-tuning from the initial policy (R-NAS), with the same evaluation
budget. Every seed shares one validation split (`dataset.split_seed`) that no teacher trains
on, and trains its own teachers (their initialisation is seeded). Prints, per seed and
method, the best validation reward, the evaluations needed
to first reach it, and those needed to reach the other method's best ('-' when never).
Resumable: each seed's workdir keeps its checkpoints and evaluation cache.
"""

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rcnas_jax import config as config_lib, pipeline  # noqa: E402
from rcnas_jax.rl import search  # noqa: E402
from rcnas_jax.rl.env import Episode  # noqa: E402
from rcnas_jax.runtime import store  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/evaluations_to_best", "One subfolder per seed.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Search seeds.")
flags.mark_flags_as_required(["config"])


def evaluations_to_reach(episodes: list[Episode], reward: float) -> int | None:
  """How many evaluations the phase needed to first reach `reward` (None: never)."""
  return next((i + 1 for i, e in enumerate(episodes) if e.reward >= reward), None)


def compare(phases: dict[str, list[Episode]]) -> dict:
  """Best reward and evaluations to it for RC-NAS and R-NAS, and to the other's best."""
  best = {name: max(e.reward for e in phases[name]) for name in ("finetune", "rnas")}
  other = {"finetune": "rnas", "rnas": "finetune"}
  return {name: {"best_reward": best[name],
                 "evaluations_to_best": search.evaluations_to_best(phases[name]),
                 "evaluations_to_other_best": evaluations_to_reach(phases[name],
                                                                   best[other[name]]),
                 "evaluations": len(phases[name])} for name in best}


def table(results: dict[int, dict]) -> str:
  """The per-seed comparison as Markdown."""
  lines = ["| seed | method | best reward | evaluations to best | to the other's best |",
           "|---|---|---|---|---|"]
  for seed, result in results.items():
    for name, method in (("finetune", "RC-NAS (meta-trained)"), ("rnas", "R-NAS (fresh)")):
      r = result[name]
      reach = r["evaluations_to_other_best"]
      lines.append(f"| {seed} | {method} | {r['best_reward']:.4f} | "
                   f"{r['evaluations_to_best']} / {r['evaluations']} | "
                   f"{'-' if reach is None else reach} |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  base = flags.FLAGS.config
  base.search.baselines = ("rnas",)
  results = {}
  for seed in map(int, flags.FLAGS.seeds):
    config = ml_collections.ConfigDict(base.to_dict())
    config.seed = seed
    config_lib.validate(config, num_devices=len(jax.devices()))
    workdir = os.path.join(flags.FLAGS.workdir, f"seed{seed}")
    os.makedirs(workdir, exist_ok=True)
    pipeline.claim_workdir(config, workdir)
    pipeline.enable_compilation_cache(os.path.join(flags.FLAGS.workdir, "jax_cache"))
    timer = pipeline.PhaseTimer(os.path.join(workdir, "timings.json"), config)
    env, target = pipeline.environment(config, workdir, timer)
    results[seed] = compare(pipeline.search_phases(env, target, workdir, timer))
    print(table(results), flush=True)
  store.write_json(os.path.join(flags.FLAGS.workdir, "summary.json"), results)
  sys.stdout.write("\n" + table(results) + "\n")


if __name__ == "__main__":
  app.run(main)
