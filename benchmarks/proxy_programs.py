"""Seconds per new student in the proxy: each on its own programs, or on its family's masked ones.

  python benchmarks/proxy_programs.py --config=configs/quickstart.py --students=16

(the command behind benchmarks/results/proxy_programs.md). Draws `students` distinct valid
students of the config's target task from uniform random actions, as random search samples
them, in two layouts: 'random' keeps their strides and blocks (so nearly every student is a new
family), 'one family' gives them all the first student's strides and blocks (a converged
policy's regime, or any depth-and-width search). Each `search.proxy.programs` mode evaluates
them in a fresh process, one after another on one device, with no persistent compilation
cache, from the same (untrained) teacher. Per mode and layout: median and mean seconds per new
student, XLA compiles and their seconds, and the largest difference of a reward between modes.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rcnas_jax import pipeline
from rcnas_jax.nets import arch, models, space
from rcnas_jax.rl import proxy, search, tasks
from rcnas_jax.runtime import compilation, parallel, store

config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.",
                                lock_config=False)
flags.DEFINE_integer("students", 16, "Distinct valid students per layout.")
flags.DEFINE_string("out", "benchmarks/results", "Where the table and JSON go.")
flags.DEFINE_string("run", "", "Internal: 'mode,layout' runs one measurement and prints JSON.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS
MODES = ("student", "family")
LAYOUTS = ("random", "one family")


def students(config, target, info, count: int, layout: str) -> list[arch.NetworkSpec]:
  """`count` distinct valid students of the target's teacher, in the given layout."""
  teacher = arch.teacher(target.teacher)
  actions = search.random_actions(jax.random.key(0), len(teacher.stages), 50 * count,
                                  arch.max_downsamples(teacher, info.image_shape[0]))
  found = []
  for i in range(50 * count):
    chosen = search.stage_actions(actions, i)
    if layout == "one family" and found:
      first = found[0]
      chosen = tuple(dataclasses.replace(a, downsample=s.stride == 2, robust=s.block == "robust")
                     for a, s in zip(chosen, first.stages))
    try:
      spec = space.compress(teacher, chosen, image_size=info.image_shape[0],
                            width_multiple=config.search.width_multiple)
    except space.InvalidStudentError:
      continue
    if spec not in found:
      found.append(spec)
    if len(found) == count:
      return found
  raise SystemExit(f"--students={count}: only {len(found)} distinct students found")


def measure(config, mode: str, layout: str, count: int) -> dict:
  """Every student's proxy evaluation in `mode`, timed, with the compiles it took."""
  config.search.proxy.programs = mode
  dataset = pipeline.load_dataset(config, config.search.target.dataset)
  info = dataset.info
  target = tasks.target_task(config, info.image_shape[0], info.num_classes, info.image_shape[-1])
  teacher = models.build(arch.teacher(target.teacher), info.num_classes, info.mean, info.std)
  teacher_variables = jax.device_get(models.init(teacher, jax.random.key(1), info.image_shape))
  mesh = parallel.data_mesh(jax.devices()[:1])
  rows = []
  for spec in students(config, target, info, count, layout):
    with compilation.track() as stats:
      record = proxy.evaluate_student(config, dataset, teacher_variables, target, spec, mesh)
    proxy.release_programs(config)
    rows.append({"spec": spec.to_dict(), "seconds": record["seconds"],
                 "reward": record.get("robust_accuracy"), "compiles": stats.compiles,
                 "compile_seconds": stats.compile_seconds,
                 "family": [(s.stride, s.block) for s in spec.stages]})
  return {"mode": mode, "layout": layout, "rows": rows, "target": target.key(),
          "attack": target.attack.describe()}


def summary(result: dict) -> dict:
  """Median and mean seconds, compiles and families of one measurement."""
  rows = result["rows"]
  seconds = [r["seconds"] for r in rows]
  return {"median": statistics.median(seconds), "mean": statistics.mean(seconds),
          "compiles": sum(r["compiles"] for r in rows),
          "compile_seconds": sum(r["compile_seconds"] for r in rows),
          "families": len({json.dumps(r["family"]) for r in rows})}


def main(_):
  if FLAGS.run:
    mode, layout = FLAGS.run.split(",")
    print("RESULT " + json.dumps(measure(FLAGS.config, mode, layout, FLAGS.students)))
    return
  results = {}
  for layout in LAYOUTS:
    for mode in MODES:
      command = [sys.executable, __file__, f"--config={FLAGS['config'].config_filename}",
                 f"--students={FLAGS.students}", f"--run={mode},{layout}"]
      output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
      results[(mode, layout)] = json.loads(output.split("RESULT ", 1)[1])
      print(mode, layout, summary(results[(mode, layout)]), flush=True)
  any_result = next(iter(results.values()))
  lines = ["# Proxy programs: seconds per new student", "",
           f"`python benchmarks/proxy_programs.py --config={FLAGS['config'].config_filename} "
           f"--students={FLAGS.students}`", "",
           f"Target {any_result['target']}, attack {any_result['attack']}; {jax.device_count()} "
           f"CPU devices of {os.cpu_count()} cores, one device per evaluation, no persistent "
           "compilation cache, an untrained teacher.", "",
           "| layout | programs | families | median s / student | mean s | compiles | "
           "compile s | largest reward difference |", "|---|---|---|---|---|---|---|---|"]
  for layout in LAYOUTS:
    rewards = [np.array([r["reward"] for r in results[(m, layout)]["rows"]], float)
               for m in MODES]
    difference = float(np.nanmax(np.abs(rewards[0] - rewards[1])))
    for mode in MODES:
      s = summary(results[(mode, layout)])
      lines.append(f"| {layout} | {mode} | {s['families']} | {s['median']:.2f} | "
                   f"{s['mean']:.2f} | {s['compiles']} | {s['compile_seconds']:.1f} | "
                   f"{difference:.4f} |")
  os.makedirs(FLAGS.out, exist_ok=True)
  store.write_text(os.path.join(FLAGS.out, "proxy_programs.md"), "\n".join(lines) + "\n")
  store.write_json(os.path.join(FLAGS.out, "proxy_programs.json"),
                   {f"{m}|{l}": r for (m, l), r in results.items()})
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
