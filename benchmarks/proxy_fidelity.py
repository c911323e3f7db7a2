"""Does the proxy rank students as full training does? Kendall tau and Spearman rho on the target.

  python benchmarks/proxy_fidelity.py --config=configs/quickstart.py --students=12 \
      --workdir=runs/proxy_fidelity

(the command behind benchmarks/results/proxy_fidelity.md; --variants replaces the default
proxies, VARIANTS).

Draws `students` distinct within-budget students of the config's target task, spread evenly
over their MACs, from uniform random actions (as random search samples them). Each is trained
in full (config.training from the teacher's weights, as the final trainings are) and attacked
with the task's attack on the whole validation split, in eval mode. Each proxy variant (the
config with `field:value` overrides, `;`-separated) then scores every student: within budget
its reward is the proxy's validation robust accuracy. Per variant: Kendall tau-b and Spearman
rho between that reward and the fully trained validation robust accuracy, with percentile
bootstrap 95% intervals over students, and the proxy's seconds per student (compile included,
on one slice). Writes proxy_fidelity.md and proxy_fidelity.json to --out. Resumable: full
trainings and proxy evaluations are cached in the workdir, keyed by their inputs.
"""

import ast
import dataclasses
import functools
import json
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from scipy import stats  # noqa: E402

from rcnas_jax import config as config_lib, pipeline, report  # noqa: E402
from rcnas_jax.nets import arch, space  # noqa: E402
from rcnas_jax.rl import env as env_lib, proxy, search  # noqa: E402
from rcnas_jax.runtime import artifacts, parallel, store  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.",
                                lock_config=False)
flags.DEFINE_string("workdir", "runs/proxy_fidelity", "Teachers, full trainings, caches.")
flags.DEFINE_integer("students", 12, "Distinct within-budget students.")
flags.DEFINE_integer("draws", 2000, "Random actions drawn to choose the students from.")
# The proxies compared by default: the config's own, and the old 2-epoch default with one change.
VARIANTS = [
    "config as given=",
    "2 epochs=search.proxy.epochs:2",
    "2 epochs, all train images=search.proxy.epochs:2;search.proxy.train_examples:0",
    "2 epochs, distillation 0.5=search.proxy.epochs:2;search.proxy.distill_weight:0.5",
    '2 epochs, TRADES 3 steps=search.proxy.epochs:2;search.proxy.method:"trades";'
    "search.proxy.attack_steps:3",
]
flags.DEFINE_multi_string("variants", VARIANTS,
                          "name=field:value;field:value (the proxy settings to compare).")
flags.DEFINE_string("out", "benchmarks/results", "Where the table and JSON go.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS
BOOTSTRAP = 2000


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks."""
  return float(stats.spearmanr(a, b).statistic)


def bootstrap(a: np.ndarray, b: np.ndarray, statistic, rng: np.random.Generator):
  """The percentile-bootstrap 95% interval of statistic(a, b) over resampled pairs."""
  samples = []
  for _ in range(BOOTSTRAP):
    idx = rng.integers(len(a), size=len(a))
    if len(np.unique(a[idx])) > 1 and len(np.unique(b[idx])) > 1:
      samples.append(statistic(a[idx], b[idx]))
  return tuple(float(x) for x in np.percentile(samples, [2.5, 97.5]))


def draw_students(env: env_lib.Environment, target, count: int, draws: int,
                  seed: int) -> list[tuple]:
  """`count` distinct within-budget (actions, spec) pairs, evenly spaced in MACs."""
  teacher = arch.teacher(target.teacher)
  info = env.datasets[target.dataset].info
  actions = search.random_actions(jax.random.key(seed), len(teacher.stages), draws,
                                  env.observe(target).max_downsamples)
  found = {}
  for i in range(draws):
    chosen = search.stage_actions(actions, i)
    try:
      spec = space.compress(teacher, chosen, image_size=info.image_shape[0],
                            width_multiple=env.config.search.width_multiple)
    except space.InvalidStudentError:
      continue
    macs = arch.count_macs(spec, info.image_shape[0], info.num_classes, info.image_shape[-1])
    if macs <= target.budget_macs:
      found.setdefault(spec, (macs, chosen))
  if len(found) < count:
    raise SystemExit(f"--students={count}: only {len(found)} distinct within-budget students "
                     f"in {draws} draws (raise --draws)")
  by_macs = sorted(found.items(), key=lambda item: item[1][0])
  picks = np.unique(np.linspace(0, len(by_macs) - 1, count).round().astype(int))
  return [(by_macs[i][1][1], by_macs[i][0]) for i in picks]


def trained_in_full(env: env_lib.Environment, target, spec: arch.NetworkSpec, workdir: str,
                    mesh) -> dict:
  """Full adversarial training of `spec`, then its robust accuracy on the whole validation
  split under the task's attack; cached in <workdir>/full/<key>.json."""
  config = env.config
  key = artifacts.training(config, target.dataset, spec.to_dict(),
                           start=env.teacher_weights[(target.dataset, target.teacher)])
  path = os.path.join(workdir, "full", f"{key}.json")
  done = store.read_json(path)
  if done is None:
    dataset = env.datasets[target.dataset]
    started = time.perf_counter()
    variables = pipeline.train_student(env, target, spec, os.path.join(workdir, "full", key),
                                       False, mesh)
    accuracy = proxy.robust_accuracy(config, dataset.info, dataset.validation, target, spec,
                                     variables, mesh,
                                     chunk=config.search.proxy.validation_examples)
    done = {"spec": spec.to_dict(), "validation_robust_accuracy": accuracy,
            "n_validation": len(dataset.validation), "attack": target.attack.describe(),
            "seconds": time.perf_counter() - started}
    store.write_json(path, done)
  return done


def variant(config: ml_collections.ConfigDict, overrides: str) -> ml_collections.ConfigDict:
  """`config` with 'field:value;field:value' applied (values as Python literals)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for item in filter(None, overrides.split(";")):
    field, _, value = item.partition(":")
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    c.update_from_flattened_dict({field.strip(): parsed})
  config_lib.validate(c, num_devices=jax.device_count())
  return c


def fidelity(proxy_rewards: np.ndarray, full: np.ndarray, rng: np.random.Generator) -> dict:
  """Kendall tau-b and Spearman rho with their bootstrap intervals, and tau among the better
  half by full training (where a search's choice is made)."""
  top = np.argsort(full)[len(full) // 2:]
  return {"kendall_tau": report.kendall_tau_b(proxy_rewards, full),
          "kendall_tau_ci": bootstrap(proxy_rewards, full, report.kendall_tau_b, rng),
          "spearman_rho": spearman(proxy_rewards, full),
          "spearman_rho_ci": bootstrap(proxy_rewards, full, spearman, rng),
          "kendall_tau_top_half": report.kendall_tau_b(proxy_rewards[top], full[top])}


def table(students: list[dict], variants: dict[str, dict]) -> str:
  """The variants' rank correlations, then every student's numbers, as Markdown."""
  first = students[0]
  lines = [f"{len(students)} within-budget students; full training: validation robust "
           f"accuracy on {first['n_validation']} images under {first['attack']}.", "",
           "| proxy variant | overrides | Kendall tau [95% CI] | Spearman rho [95% CI] | "
           "tau, better half | proxy s per student |", "|---|---|---|---|---:|---:|"]
  for name, v in variants.items():
    overrides = v["overrides"] or "(none: the config as given)"
    lines.append(f"| {name} | `{overrides}` | {v['kendall_tau']:.2f} "
                 f"[{v['kendall_tau_ci'][0]:.2f}, {v['kendall_tau_ci'][1]:.2f}] | "
                 f"{v['spearman_rho']:.2f} [{v['spearman_rho_ci'][0]:.2f}, "
                 f"{v['spearman_rho_ci'][1]:.2f}] | {v['kendall_tau_top_half']:.2f} | "
                 f"{v['seconds_per_student']:.1f} |")
  lines += ["", "Proxy seconds include compiling, with the persistent compilation cache as each "
            "evaluation found it (the first variant evaluated starts cold).",
            "", "| student | MACs | full training | " + " | ".join(variants) + " |",
            "|---|---:|---:|" + "---:|" * len(variants)]
  for i, s in enumerate(students):
    lines.append(f"| `{s['name']}` | {s['macs']:,} | {s['validation_robust_accuracy']:.3f} | "
                 + " | ".join(f"{v['rewards'][i]:.3f}" for v in variants.values()) + " |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  config_lib.validate(config, num_devices=jax.device_count())
  os.makedirs(FLAGS.workdir, exist_ok=True)
  pipeline.enable_compilation_cache(os.path.join(FLAGS.workdir, "jax_cache"))
  timer = pipeline.PhaseTimer(os.path.join(FLAGS.workdir, "timings.json"), config)
  env, target = pipeline.environment(config, FLAGS.workdir, timer)
  info = env.datasets[target.dataset].info
  drawn = draw_students(env, target, FLAGS.students, FLAGS.draws, config.seed)
  print(f"target {target.key()}: {len(drawn)} students, full training on "
        f"{len(env.slices)} slice(s)", flush=True)
  full = parallel.on_slices(env.slices, [
      functools.partial(trained_in_full, env, target, spec, FLAGS.workdir) for _, spec in drawn])
  students = [{"name": pipeline.spec_name(spec), "spec": spec.to_dict(),
               "macs": arch.count_macs(spec, info.image_shape[0], info.num_classes,
                                       info.image_shape[-1]), **f}
              for (_, spec), f in zip(drawn, full)]
  accuracy = np.array([s["validation_robust_accuracy"] for s in students])
  rng = np.random.default_rng(0)
  variants = {}
  for item in FLAGS.variants:
    name, _, overrides = item.partition("=")
    variant_env = dataclasses.replace(env, config=variant(config, overrides))
    episodes = variant_env.episodes(target, [a for a, _ in drawn], phase="fidelity",
                                    iteration=0)
    if any(not e.valid for e in episodes):
      raise SystemExit(f"variant {name}: {[e.reason for e in episodes if not e.valid]}")
    rewards = np.array([e.reward for e in episodes])
    weights = env.teacher_weights[(target.dataset, target.teacher)]
    seconds = np.mean([variant_env.cache.get(artifacts.evaluation(
        variant_env.config, target.key(), e.spec, weights))["seconds"] for e in episodes])
    variants[name] = {"overrides": overrides, "rewards": rewards.tolist(),
                      "seconds_per_student": seconds, **fidelity(rewards, accuracy, rng)}
    print(f"{name}: tau {variants[name]['kendall_tau']:.2f}, rho "
          f"{variants[name]['spearman_rho']:.2f}, {seconds:.1f} s per student", flush=True)
  text = table(students, variants)
  print("\n" + text)
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "proxy_fidelity.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(FLAGS.out, "proxy_fidelity.json"), "w") as f:
    json.dump({"target": target.key(), "students": students, "variants": variants}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
