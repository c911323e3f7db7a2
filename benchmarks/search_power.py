"""Search power on the synthetic task family, where the optimum is known (`rl/synthetic.py`).

  python benchmarks/search_power.py                  # 10 seeds of every strategy, ~6 min
  python benchmarks/search_power.py --sweep          # the policy-settings sweep of DESIGN.md
  python benchmarks/search_power.py --prior_bound --seeds=40   # how good a prior must be, ~3 min

Every strategy runs the real search code (`search.run_phase`, the shipped samplers and learner
at `config.base_config()`'s settings) on the held-out synthetic target, with the same number of
evaluations: random search, regularized evolution, R-NAS (a fresh policy) and RC-NAS (the
policy meta-trained on the other synthetic tasks first; its meta-training evaluations are
counted in their own column). Per strategy it reports:
- episodes to 95% of the optimum: the first sampled student whose noise-free reward reaches
  95% of the optimum's; the median over seeds with a bootstrap 95% interval (a seed that never
  reaches it counts as more than the horizon);
- the final regret of the student each strategy would deliver (its within-budget student of
  best *observed* reward), mean with a bootstrap 95% interval;
and the goals: R-NAS in at most half of random search's episodes, RC-NAS in at most a third of
R-NAS's. Writes search_power.md, search_power.json and search_power.png (regret curves with
bootstrap 95% bands) to --out.

--prior_bound samples the target with no learning from fixed priors centred on its optimum
(`synthetic.PriorSampler`: ratio spread sigma in logit space, each stride and block-type choice
right with probability p), and writes search_power_prior.md: the episodes a meta-trained
policy's starting point of that quality would need.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from rcnas_jax import config as config_lib  # noqa: E402
from rcnas_jax.rl import synthetic  # noqa: E402

flags.DEFINE_integer("seeds", 10, "Seeds per strategy.")
flags.DEFINE_integer("updates", 100, "Updates on the target per strategy (M students each).")
flags.DEFINE_integer("meta_updates", 1000, "RC-NAS's meta-training updates.")
flags.DEFINE_list("strategies", list(synthetic.STRATEGIES), "Strategies to run.")
flags.DEFINE_bool("sweep", False, "Sweep R-NAS's policy settings (and evolution's) instead.")
flags.DEFINE_bool("prior_bound", False, "Score fixed priors around the optimum instead.")
flags.DEFINE_string("out", "benchmarks/results", "Where the table, JSON and plot go.")
FLAGS = flags.FLAGS

LABELS = {"random": "random search", "evolution": "regularized evolution",
          "rnas": "R-NAS (fresh policy)", "rcnas": "RC-NAS (meta-trained)"}
BOOTSTRAP = 2000


def run_strategy(config, strategy: str, seeds: int, updates: int, meta_updates: int) -> dict:
  """Per seed: episodes to 95% of the optimum (None: never) and the regret curve."""
  to95, regrets, meta, starts = [], [], [], []
  for seed in range(seeds):
    c = synthetic.configure(config)
    c.seed = seed
    target = synthetic.target_task(c)
    phases, start = synthetic.run(c, strategy, updates, meta_updates)
    starts.append(start)
    to95.append(synthetic.episodes_to(target, phases["target"], c.search.beta))
    regrets.append(synthetic.incumbent_regret(target, phases["target"], c.search.beta).tolist())
    meta.append(len(phases.get("meta", [])))
  return {"episodes_to_95": to95, "regret": regrets, "meta_evaluations": meta[0],
          "horizon": updates * config.search.students_per_update,
          "start": None if starts[0] is None else starts}


def bootstrap(values: np.ndarray, statistic, rng: np.random.Generator) -> tuple[float, float]:
  """The 95% percentile-bootstrap interval of `statistic` over `values`."""
  samples = [statistic(rng.choice(values, len(values))) for _ in range(BOOTSTRAP)]
  return tuple(float(x) for x in np.percentile(samples, [2.5, 97.5], method="nearest"))


def summarise_to95(episodes_to_95: list, rng: np.random.Generator) -> dict:
  """Median episodes to 95% with its interval (inf = never), and how many seeds reached it."""
  to95 = np.array([np.inf if n is None else n for n in episodes_to_95], float)
  return {"median_to_95": float(np.median(to95)), "to_95_ci": bootstrap(to95, np.median, rng),
          "reached": int(np.isfinite(to95).sum()), "seeds": len(to95)}


def summarise(result: dict, rng: np.random.Generator) -> dict:
  """`summarise_to95`, and the final regret's mean and interval."""
  final = np.array([curve[-1] for curve in result["regret"]])
  return {**summarise_to95(result["episodes_to_95"], rng),
          "final_regret": float(final.mean()), "final_regret_ci": bootstrap(final, np.mean, rng),
          "meta_evaluations": result["meta_evaluations"], "horizon": result["horizon"],
          "start": result.get("start")}


def _episodes(value: float, horizon: int) -> str:
  return f"> {horizon}" if not np.isfinite(value) else f"{value:.0f}"


def table(summaries: dict[str, dict], optimum: float) -> str:
  """The strategies as Markdown, then the two goals."""
  lines = [f"Held-out synthetic target (optimum noise-free reward {optimum:.4f}).", "",
           "| strategy | episodes to 95% of optimum, median [95% CI] | seeds reaching it | "
           "final regret, mean [95% CI] | meta-training evaluations |",
           "|---|---|---:|---|---:|"]
  for strategy, s in summaries.items():
    low, high = s["to_95_ci"]
    lines.append(
        f"| {LABELS[strategy]} | {_episodes(s['median_to_95'], s['horizon'])} "
        f"[{_episodes(low, s['horizon'])}, {_episodes(high, s['horizon'])}] | "
        f"{s['reached']}/{s['seeds']} | {s['final_regret']:.3f} [{s['final_regret_ci'][0]:.3f}, "
        f"{s['final_regret_ci'][1]:.3f}] | {s['meta_evaluations']} |")
  lines += [""] + goals(summaries) + starts(summaries)
  return "\n".join(lines)


def _spread(values: np.ndarray) -> str:
  """Per stage, the mean over seeds and its range."""
  return ", ".join(f"{m:.2f} ({lo:.2f}-{hi:.2f})"
                   for m, lo, hi in zip(values.mean(0), values.min(0), values.max(0)))


def starts(summaries: dict[str, dict]) -> list[str]:
  """Where each policy strategy starts on the target, in the prior bound's terms
  (`--prior_bound`): per stage, mean (range) over seeds."""
  rows = [(strategy, {k: np.array([seed[k] for seed in s["start"]]) for k in s["start"][0]})
          for strategy, s in summaries.items() if s.get("start")]
  if not rows:
    return []
  lines = ["", "The policy at the start of the target phase, per stage, mean (range) over seeds "
           "(compare `--prior_bound`):", "",
           "| strategy | P(optimum's stride) | P(optimum's block type) | ratio mean's offset "
           "(logit), depth / width | ratio std, depth / width |", "|---|---|---|---|---|"]
  for strategy, q in rows:
    lines.append(f"| {LABELS[strategy]} | {_spread(q['p_stride'])} | {_spread(q['p_block'])} | "
                 f"{q['depth_offset'].mean():.2f} / {q['width_offset'].mean():.2f} | "
                 f"{q['depth_std'].mean():.2f} / {q['width_std'].mean():.2f} |")
  return lines


def goals(summaries: dict[str, dict]) -> list[str]:
  """Whether R-NAS needs at most 1/2 of random's episodes and RC-NAS at most 1/3 of R-NAS's."""
  lines = []
  for better, worse, fraction in (("rnas", "random", 1 / 2), ("rcnas", "rnas", 1 / 3)):
    if better in summaries and worse in summaries:
      a, b = summaries[better]["median_to_95"], summaries[worse]["median_to_95"]
      met = np.isfinite(a) and a <= fraction * b
      horizon = summaries[worse]["horizon"]
      if not np.isfinite(a):
        ratio = f"undefined ({LABELS[better]}'s median is beyond {horizon} episodes)"
      elif not np.isfinite(b):
        ratio = f"< {a / horizon:.2f} ({LABELS[worse]}'s median is beyond {horizon} episodes)"
      else:
        ratio = f"{a / b:.2f}"
      lines.append(f"- goal {LABELS[better]} <= {fraction:.2f} x {LABELS[worse]}: ratio of "
                   f"medians {ratio}: {'met' if met else 'NOT met'}")
  return lines


def plot(results: dict[str, dict], path: str, rng: np.random.Generator) -> None:
  """Mean regret of the delivered student against episodes, with bootstrap 95% bands."""
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for strategy, result in results.items():
    curves = np.array(result["regret"])
    means = np.array([curves[rng.integers(len(curves), size=len(curves))].mean(0)
                      for _ in range(500)])
    x = np.arange(1, curves.shape[1] + 1)
    ax.plot(x, curves.mean(0), label=LABELS[strategy])
    ax.fill_between(x, *np.percentile(means, [2.5, 97.5], axis=0), alpha=0.2)
  ax.axhline(0.05, color="k", linestyle=":", label="95% of the optimum")
  ax.set(xlabel="episodes (evaluations) on the target", ylabel="regret of the delivered student",
         ylim=(0, 1), title=f"Synthetic suite, {len(curves)} seeds (bands: bootstrap 95%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# The sweep: R-NAS's learner settings, and evolution's, on the same target and seeds.
SWEEP = {"rnas": {"search.policy.learning_rate": (1e-3, 3e-3, 1e-2),
                  "search.students_per_update": (5, 10),
                  "search.policy.entropy_weight": (0.0, 0.01, 0.05)},
         "evolution": {"search.evolution.population": (10, 20, 50),
                       "search.evolution.tournament": (3, 5),
                       "search.evolution.mutation_std": (0.5, 1.0)}}


def _set(config, field: str, value) -> None:
  """config.<field> = value, for a dotted field name."""
  *sections, name = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[name] = value


def sweep(seeds: int, evaluations: int, rng: np.random.Generator) -> str:
  """Every combination of SWEEP's settings at a fixed number of evaluations on the target."""
  lines = [f"Sweep on the held-out synthetic target, {seeds} seeds, {evaluations} evaluations "
           "each.", "", "| strategy | settings | episodes to 95%, median [95% CI] | reached | "
           "final regret, mean |", "|---|---|---|---:|---:|"]
  for strategy, grid in SWEEP.items():
    for values in itertools.product(*grid.values()):
      settings = dict(zip(grid, values))
      c = config_lib.base_config()
      for field, value in settings.items():
        _set(c, field, value)
      updates = evaluations // c.search.students_per_update
      s = summarise(run_strategy(c, strategy, seeds, updates, 0), rng)
      low, high = s["to_95_ci"]
      text = ", ".join(f"{f.rsplit('.', 1)[1]}={v}" for f, v in settings.items())
      lines.append(f"| {LABELS[strategy]} | {text} | {_episodes(s['median_to_95'], evaluations)}"
                   f" [{_episodes(low, evaluations)}, {_episodes(high, evaluations)}] | "
                   f"{s['reached']}/{seeds} | {s['final_regret']:.3f} |")
      print(lines[-1], flush=True)
  return "\n".join(lines)


# The prior bound's grid: the ratio heads' spread (logit space) and the binary heads' accuracy.
PRIOR_SIGMAS = (1.0, 0.5, 0.25)
PRIOR_PS = (0.5, 0.8, 0.95)


def prior_bound(seeds: int, updates: int, rng: np.random.Generator) -> str:
  """Episodes to 95% of the optimum under each fixed prior of the grid, `seeds` draws each."""
  config = synthetic.configure(config_lib.base_config())
  horizon = updates * config.search.students_per_update
  target = synthetic.target_task(config)
  lines = [f"Fixed priors centred on the held-out target's optimum, no learning, {seeds} draws "
           f"each, {horizon} episodes.", "", "| ratio spread sigma | binary choices right "
           "with p | episodes to 95%, median [95% CI] | draws reaching it |", "|---:|---:|---|---:|"]
  for sigma, p in itertools.product(PRIOR_SIGMAS, PRIOR_PS):
    to95 = []
    for seed in range(seeds):
      config.seed = seed
      episodes = synthetic.run_prior(config, sigma, p, updates)
      to95.append(synthetic.episodes_to(target, episodes, config.search.beta))
    s = summarise_to95(to95, rng)
    low, high = s["to_95_ci"]
    lines.append(f"| {sigma} | {p} | {_episodes(s['median_to_95'], horizon)} "
                 f"[{_episodes(low, horizon)}, {_episodes(high, horizon)}] | "
                 f"{s['reached']}/{seeds} |")
    print(lines[-1], flush=True)
  return "\n".join(lines)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  os.makedirs(FLAGS.out, exist_ok=True)
  config = config_lib.base_config()
  if FLAGS.sweep or FLAGS.prior_bound:
    name, text = (("search_power_sweep.md",
                   sweep(FLAGS.seeds, FLAGS.updates * config.search.students_per_update, rng))
                  if FLAGS.sweep else
                  ("search_power_prior.md", prior_bound(FLAGS.seeds, FLAGS.updates, rng)))
    with open(os.path.join(FLAGS.out, name), "w") as f:
      f.write(text + "\n")
    return
  results, summaries = {}, {}
  for strategy in FLAGS.strategies:
    started = time.perf_counter()
    results[strategy] = run_strategy(config, strategy, FLAGS.seeds, FLAGS.updates,
                                     FLAGS.meta_updates)
    summaries[strategy] = summarise(results[strategy], rng)
    print(f"{LABELS[strategy]}: episodes to 95% {results[strategy]['episodes_to_95']} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
  target = synthetic.target_task(synthetic.configure(config))
  text = table(summaries, synthetic.optimum(target, config.search.beta)[0])
  print("\n" + text)
  with open(os.path.join(FLAGS.out, "search_power.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(FLAGS.out, "search_power.json"), "w") as f:
    json.dump(json.loads(json.dumps({"summaries": summaries, "results": results}),
                         parse_constant=lambda _: None), f, indent=1)
  plot(results, os.path.join(FLAGS.out, "search_power.png"), rng)


if __name__ == "__main__":
  app.run(main)
