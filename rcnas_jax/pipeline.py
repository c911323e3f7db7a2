"""The main job, phase by phase; each phase resumes from what the workdir already holds.

mode='search' (RC-NAS): teachers -> meta-training -> fine-tuning on the held-out target ->
baselines (R-NAS, random search, regularized evolution) -> full adversarial training of each
method's delivered within-budget student and of the hand-scaled RobustResNet-style student ->
evaluation on the test split -> report -> export. mode='train': adversarial training and evaluation of one network.
mode='evaluate': the evaluation suite on an exported student, reported RobustBench-style.
"""

from __future__ import annotations

import functools
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rcnas_jax import config as config_lib, data, report
from rcnas_jax.nets import arch, export, inherit, models
from rcnas_jax.rl import env as env_lib, search, tasks
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust import evaluate, gradient_masking, robustbench, training
from rcnas_jax.runtime import artifacts, compilation, parallel, store


def enable_compilation_cache(directory: str) -> None:
  """Persists compiled programs across processes (~5x faster start on this CPU)."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_dataset(config: ml_collections.ConfigDict, name: str | None = None) -> data.Dataset:
  """The configured dataset's splits (or those of dataset `name` with the same settings)."""
  d = config.dataset
  return data.load(name or d.name, data_dir=d.data_dir or None,
                   validation_size=d.validation_size, seed=d.split_seed, download=d.download,
                   max_train_examples=d.max_train_examples or None,
                   max_image_size=d.max_image_size or None)


def training_data(config: ml_collections.ConfigDict, name: str) -> dict:
  """What decides the training examples of dataset `name` (`load_dataset`): an export records
  it, so that a teacher loaded into a search can be checked against the search's split."""
  d = config.dataset
  return {"dataset": name, "split_seed": d.split_seed, "validation_size": d.validation_size,
          "max_train_examples": d.max_train_examples, "max_image_size": d.max_image_size}


def evaluate_on_test(config, model, variables, split: data.Split, mesh,
                     progress_path: str | None = None) -> dict:
  """The configured evaluation suite on (a stratified sample of) the test split.

  With `progress_path`, per-(attack, batch) results are kept there and a rerun continues.
  """
  return evaluate.evaluate(
      model, variables, data.sample(split, config.evaluation.max_examples),
      evaluate.attacks_from_config(config.evaluation), jax.random.key(config.seed + 1), mesh,
      batch_size=config.evaluation.batch_size,
      unroll=training.unroll_attack_loops(config.evaluation.loop),
      composites=evaluate.composites_from_config(config.evaluation),
      progress_path=progress_path)


def _describe(spec: arch.NetworkSpec, info: data.DatasetInfo) -> dict:
  """Params and MACs of `spec` on this dataset's images."""
  h, _, c = info.image_shape
  return {"params": arch.count_params(spec, info.num_classes, c),
          "macs": arch.count_macs(spec, h, info.num_classes, c)}


# ---------------------------------------------------------------------------------------------
# mode='train'.
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Adversarially trains the configured network and evaluates it on the test split."""
  mesh = parallel.mesh_from_config(config)
  dataset = load_dataset(config)
  info = dataset.info
  spec = arch.teacher(config.model.arch)
  model = models.build(spec, info.num_classes, info.mean, info.std, config.model.dtype)
  sizes = _describe(spec, info)
  print(f"{config.model.arch}: {sizes['params']:,} params, {sizes['macs']:,} MACs; {info.name}: "
        f"{len(dataset.train)} train / {len(dataset.validation)} validation / "
        f"{len(dataset.test)} test; {len(jax.devices())} {jax.default_backend()} device(s)")
  timer = PhaseTimer(os.path.join(workdir, "timings.json"), config)
  key = artifacts.training(config, info.name, spec.to_dict(), start=None)
  directory = os.path.join(workdir, f"training-{key}")
  state = timer.run("training", lambda: training.train(model, dataset.train, info.image_shape,
                                                       config, directory, mesh))
  variables = training.eval_variables(state, use_ema=config.training.ema_decay > 0)
  float32 = models.build(spec, info.num_classes, info.mean, info.std)  # Attacks in full precision.
  progress = os.path.join(directory,
                          f"evaluation-{artifacts.test_evaluation(config, info.name, key)}.jsonl")
  results = timer.run("evaluation", lambda: evaluate_on_test(config, float32, variables,
                                                             dataset.test, mesh, progress))
  table = evaluate.format_table(results)
  print(f"\nTest split of {info.name}, {config.model.arch}, eval-mode BN:\n{table}")
  store.write_json(os.path.join(workdir, "results.json"),
                   {"arch": spec.to_dict(), "dataset": info.name, "results": results,
                    "training": key, "config": config.to_dict()})
  store.write_text(os.path.join(workdir, "results.md"), table + "\n")
  export.export_student(os.path.join(workdir, "export"), spec, variables,
                        num_classes=info.num_classes, image_shape=info.image_shape,
                        mean=info.mean, std=info.std, metrics={"results": results},
                        dataset=info.name, training_data=training_data(config, info.name))
  return results


# ---------------------------------------------------------------------------------------------
# mode='evaluate'.
# ---------------------------------------------------------------------------------------------


def evaluate_export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The evaluation suite on the student exported at config.checkpoint, RobustBench-style.

  Runs config.evaluation.suite (default: evaluation.attacks) on the test split in eval mode,
  then the gradient-masking checks; writes `robustness.json` and `robustness.md`. Per-(attack,
  batch) results go to `evaluation-<key>.jsonl` as they finish, named after the weights and
  every evaluation setting: run the same command again after a kill to continue.
  """
  e = config.evaluation
  student = export.load_student(config.checkpoint)
  dataset_name = student.meta.get("dataset") or config.dataset.name
  dataset = load_dataset(config, dataset_name)
  if tuple(dataset.info.image_shape) != tuple(student.meta["image_shape"]):
    raise config_lib.ConfigError(
        f"config.dataset: {dataset_name} images are {dataset.info.image_shape}, the student at "
        f"{config.checkpoint} takes {tuple(student.meta['image_shape'])} (check "
        "dataset.max_image_size)")
  model = models.build(student.spec, student.meta["num_classes"], student.meta["mean"],
                       student.meta["std"])
  split = data.sample(dataset.test, e.max_examples)
  key = jax.random.key(config.seed + 1)
  names = tuple(e.suite) or tuple(e.attacks)
  # Named after the weights and every evaluation setting, so no other run's results are reused.
  progress_key = artifacts.test_evaluation(config, dataset_name,
                                           artifacts.weights_digest(student.variables), names)
  results = evaluate.evaluate(
      model, student.variables, split, evaluate.attacks_from_config(e, names), key,
      parallel.data_mesh(), batch_size=e.batch_size,
      unroll=training.unroll_attack_loops(e.loop),
      composites=evaluate.composites_from_config(e, names),
      progress_path=os.path.join(workdir, f"evaluation-{progress_key}.jsonl"))
  warnings = []
  if e.check_examples:
    probe = data.sample(split, e.check_examples)
    logits_fn = jax.tree_util.Partial(lambda v, x: model.apply(v, x, train=False),
                                      student.variables)
    warnings = gradient_masking.run_all(
        logits_fn, np.asarray(probe.images, np.float32) / 255.0, probe.labels,
        jax.random.fold_in(key, 10_000), eps=e.eps, norm=e.norm, results=results)
  entry = robustbench.entry(student, dataset_name, results, e, warnings,
                            "/".join(os.path.normpath(config.checkpoint).split(os.sep)[-2:]))
  store.write_json(os.path.join(workdir, "robustness.json"), entry)
  text = robustbench.markdown(entry, results)
  store.write_text(os.path.join(workdir, "robustness.md"), text)
  print("\n" + text)
  return entry


# ---------------------------------------------------------------------------------------------
# mode='search': the RC-NAS pipeline.
# ---------------------------------------------------------------------------------------------


def _with_training_epochs(config: ml_collections.ConfigDict, epochs: int):
  """A copy of `config` whose training runs for `epochs`."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.training.epochs = epochs
  return c


def train_teachers(config, datasets: dict[str, data.Dataset], pairs, workdir: str, mesh) -> dict:
  """Trained variables of every (dataset, teacher) pair: loaded from exports, or trained here.

  A teacher trained here lives in teachers/<dataset>-<teacher>-<key>, its key naming exactly
  the settings it was trained with (`artifacts.teacher`).
  """
  teachers = {}
  for dataset_name, teacher_name in sorted(pairs):
    name = f"{dataset_name}-{teacher_name}"
    info = datasets[dataset_name].info
    spec = arch.teacher(teacher_name)
    if config.teacher.checkpoint_dir:
      teachers[(dataset_name, teacher_name)] = _load_teacher(
          os.path.join(config.teacher.checkpoint_dir, name), spec, info)
      if warning := teacher_data_warning(config, dataset_name, teacher_name):
        print(f"warning: {warning}")
      continue
    model = models.build(spec, info.num_classes, info.mean, info.std, config.model.dtype)
    print(f"teacher {name}: {_describe(spec, info)['macs']:,} MACs")
    directory = os.path.join(workdir, "teachers",
                             f"{name}-{artifacts.teacher(config, dataset_name, teacher_name)}")
    state = training.train(model, datasets[dataset_name].train, info.image_shape,
                           _with_training_epochs(config, config.teacher.epochs), directory, mesh,
                           name=f"teacher {name}")
    teachers[(dataset_name, teacher_name)] = training.eval_variables(
        state, config.training.ema_decay > 0)
  return teachers


def teacher_data_warning(config: ml_collections.ConfigDict, dataset: str,
                         teacher: str) -> str | None:
  """Why a teacher loaded from config.teacher.checkpoint_dir may have seen this search's
  validation images (its export does not record training on this split), or None."""
  if not config.teacher.checkpoint_dir:
    return None
  path = os.path.join(config.teacher.checkpoint_dir, f"{dataset}-{teacher}")
  recorded = (store.read_json(os.path.join(path, "student.json")) or {}).get("training_data")
  if recorded == training_data(config, dataset):
    return None
  return (f"the teacher {path} does not record training on this search's split ({recorded} vs "
          f"{training_data(config, dataset)}): it may have seen validation images, which would "
          "bias the rewards and the selection")


def _load_teacher(path: str, spec: arch.NetworkSpec, info: data.DatasetInfo) -> dict:
  """The variables of an exported teacher, after checking it is the network asked for."""
  teacher = export.load_student(path)
  if teacher.spec != spec or teacher.meta["num_classes"] != info.num_classes or tuple(
      teacher.meta["image_shape"]) != tuple(info.image_shape):
    raise config_lib.ConfigError(
        f"config.teacher.checkpoint_dir: {path} holds a {teacher.meta['num_classes']}-class "
        f"network for {tuple(teacher.meta['image_shape'])} images that is not the teacher "
        f"{info.name} needs ({info.num_classes} classes, {info.image_shape})")
  return teacher.variables


def spec_name(spec: arch.NetworkSpec) -> str:
  """A readable directory name for a student, e.g. 'd1-2-1_w8b-16r-32b_s1-2-2'."""
  depths = "-".join(str(s.depth) for s in spec.stages)
  widths = "-".join(f"{s.channels}{s.block[0]}" for s in spec.stages)
  strides = "-".join(str(s.stride) for s in spec.stages)
  return f"d{depths}_w{widths}_s{strides}"


def train_student(env: env_lib.Environment, task: Task, spec: arch.NetworkSpec, workdir: str,
                  progress: bool, mesh: Mesh) -> dict:
  """Full adversarial training of `spec` on `mesh`, starting from the task teacher's weights.

  Returns the variables to evaluate (the EMA weights when config.training.ema_decay is set).
  """
  config, dataset = env.config, env.datasets[task.dataset]
  info = dataset.info
  teacher_spec = arch.teacher(task.teacher)
  teacher_variables = env.teachers[(task.dataset, task.teacher)]
  model = models.build(spec, info.num_classes, info.mean, info.std, config.model.dtype)
  initial = inherit.inherited(teacher_variables, config.seed, model=model,
                              teacher_spec=teacher_spec, student_spec=spec,
                              image_shape=tuple(info.image_shape))
  teacher = None
  if config.training.distill_weight:
    teacher = (models.build(teacher_spec, info.num_classes, info.mean, info.std,
                            config.model.dtype),
               teacher_variables)
  state = training.train(model, dataset.train, info.image_shape, config,
                         workdir, mesh, init_variables=initial, teacher=teacher,
                         progress=progress)
  return training.eval_variables(state, config.training.ema_decay > 0)


def _train_final(env, task: Task, spec: arch.NetworkSpec, workdir: str, mesh,
                 progress: bool) -> dict:
  """Full adversarial training of one student on `mesh`, then the test-split evaluation.

  The training lives in final/<student>-<key>, keyed by its recipe and start (so methods that
  found the same student share it), and each evaluation of it in results-<key>.json.
  """
  config = env.config
  key = artifacts.training(config, task.dataset, spec.to_dict(),
                           start=env.teacher_weights[(task.dataset, task.teacher)])
  evaluation_key = artifacts.test_evaluation(config, task.dataset, key)
  directory = os.path.join(workdir, "final", f"{spec_name(spec)}-{key}")
  path = os.path.join(directory, f"results-{evaluation_key}.json")
  done = store.read_json(path)
  if done is None:
    dataset = env.datasets[task.dataset]
    print(f"final training of {spec_name(spec)}")
    variables = train_student(env, task, spec, directory, progress, mesh)
    model = models.build(spec, dataset.info.num_classes, dataset.info.mean, dataset.info.std)
    results = evaluate_on_test(config, model, variables, dataset.test, mesh,
                               os.path.join(directory, f"evaluation-{evaluation_key}.jsonl"))
    done = {"spec": spec.to_dict(), **_describe(spec, dataset.info), "results": results,
            "training": key, "evaluation": evaluation_key}
    export.export_student(os.path.join(directory, "export"), spec, variables,
                          num_classes=dataset.info.num_classes,
                          image_shape=dataset.info.image_shape, mean=dataset.info.mean,
                          std=dataset.info.std, metrics=done, dataset=task.dataset,
                          training_data=training_data(config, task.dataset))
    store.write_json(path, done)
  return done


def final_rows(env, task: Task, candidates: dict[str, arch.NetworkSpec],
               workdir: str) -> list[dict]:
  """The teacher's row, then every method's student trained in full and evaluated.

  Each distinct student trains once; the trainings and the teacher's evaluation share the
  candidate slices. The RC-NAS student is exported to <workdir>/export.
  """
  distinct = list(dict.fromkeys(candidates.values()))
  progress = len(env.slices) == 1
  teacher, *students = parallel.on_slices(env.slices, [
      functools.partial(_teacher_row, env, task, workdir)] + [
      functools.partial(_train_final, env, task, spec, workdir, progress=progress)
      for spec in distinct])
  done = dict(zip(distinct, students))
  if "RC-NAS" in candidates:
    _export(workdir, done[candidates["RC-NAS"]])
  return [teacher] + [{"method": method, **done[spec]} for method, spec in candidates.items()]


def _export(workdir: str, row: dict) -> None:
  """Copies a final training's export to <workdir>/export, unless that export is already it."""
  export_dir = os.path.join(workdir, "export")
  metrics = store.read_json(os.path.join(export_dir, "metrics.json"), {})
  same = lambda m: (m.get("training"), m.get("evaluation")) == (row["training"],
                                                                 row["evaluation"])
  if same(metrics) or not parallel.is_primary():
    return
  source = os.path.join(workdir, "final",
                        f"{spec_name(arch.spec_from_dict(row['spec']))}-{row['training']}",
                        "export")
  shutil.rmtree(export_dir + ".tmp", ignore_errors=True)  # Left by a kill mid-copy.
  shutil.copytree(source, export_dir + ".tmp")
  shutil.rmtree(export_dir, ignore_errors=True)
  os.replace(export_dir + ".tmp", export_dir)


def _teacher_row(env, task: Task, workdir: str, mesh) -> dict:
  """The teacher itself, evaluated on the test split."""
  weights = env.teacher_weights[(task.dataset, task.teacher)]
  evaluation_key = artifacts.test_evaluation(env.config, task.dataset, weights)
  directory = os.path.join(workdir, "final", f"teacher-{task.dataset}-{task.teacher}")
  path = os.path.join(directory, f"results-{evaluation_key}.json")
  done = store.read_json(path)
  if done is None:
    dataset = env.datasets[task.dataset]
    info = dataset.info
    spec = arch.teacher(task.teacher)
    model = models.build(spec, info.num_classes, info.mean, info.std)
    results = evaluate_on_test(env.config, model, env.teachers[(task.dataset, task.teacher)],
                               dataset.test, mesh,
                               os.path.join(directory, f"evaluation-{evaluation_key}.jsonl"))
    done = {"method": f"teacher ({task.teacher})", "spec": spec.to_dict(),
            **_describe(spec, info), "results": results, "evaluation": evaluation_key}
    store.write_json(path, done)
  return done


class PhaseTimer:
  """Wall time and compilations of each phase, from the run of this config that first did it.

  The file is keyed by every field but `resume` (how a run computes changes its timings too):
  a run with other settings starts afresh.
  """

  def __init__(self, path: str, config: ml_collections.ConfigDict):
    self.path = path
    fields = artifacts.flatten(config.to_dict())
    self.config = artifacts.digest({f: v for f, v in fields.items()
                                    if f != "resume" and not f.startswith("distributed.")})
    saved = store.read_json(path, {})
    if saved.get("config") != self.config:
      saved = {}
    self.times = saved.get("seconds", {})
    self.compiles = saved.get("compiles", {})

  def run(self, name: str, fn):
    started = time.perf_counter()
    with compilation.track() as compiles:
      value = fn()
    if name not in self.times:
      self.times[name] = round(time.perf_counter() - started, 1)
      self.compiles[name] = compiles.to_dict()
      store.write_json(self.path, {"config": self.config, "seconds": self.times,
                                   "compiles": self.compiles})
      print(f"{name}: {self.times[name]} s, {compiles.describe()}")
    return value


def environment(config: ml_collections.ConfigDict, workdir: str,
                timer: "PhaseTimer") -> tuple[env_lib.Environment, Task]:
  """Datasets, trained teachers, meshes and caches for the search, and the target task."""
  s = config.search
  mesh = parallel.mesh_from_config(config)
  names = sorted(set(s.datasets) | {s.target.dataset})
  datasets = timer.run("data", lambda: {n: load_dataset(config, n) for n in names})
  info = datasets[s.target.dataset].info
  target = tasks.target_task(config, info.image_shape[0], info.num_classes, info.image_shape[-1])
  pairs = {(d, t) for d in s.datasets for t in s.teachers} | {(target.dataset, target.teacher)}
  teachers = timer.run("teachers", lambda: train_teachers(config, datasets, pairs, workdir, mesh))
  env = env_lib.Environment(config, datasets, teachers, mesh,
                            env_lib.EvaluationCache(os.path.join(workdir, "evaluations.jsonl")),
                            tasks.ProbeCache(os.path.join(workdir, "probes.json")),
                            parallel.slices(mesh))
  return env, target


def search_phases(env: env_lib.Environment, target: Task, workdir: str,
                  timer: "PhaseTimer") -> dict[str, list[env_lib.Episode]]:
  """Meta-training, fine-tuning on the target and the configured baselines; their episodes.

  Each phase lives in search/<phase>-<key>, its key naming what it depends on
  (`artifacts.phase`); fine-tuning's includes the meta-trained policy's.
  """
  config, s = env.config, env.config.search
  infos = {n: d.info for n, d in env.datasets.items()}
  num_stages = len(arch.teacher(target.teacher).stages)
  learner = search.make_learner(config, num_stages)
  learned = search.PolicySampler(learner)
  fresh = search.fresh_state(learner, config.seed, env_lib.observe(env, target))
  print(f"target task: {target.key()} (held out of meta-training)")
  weights = lambda pairs: {f"{d}-{t}": env.teacher_weights[(d, t)] for d, t in pairs}
  on_target = weights([(target.dataset, target.teacher)])
  directory = lambda name, key: os.path.join(workdir, "search", f"{name}-{key}")
  meta_key = artifacts.phase(config, "meta", weights(
      (d, t) for d in s.datasets for t in s.teachers), target.key())
  phases = {}
  meta_state, phases["meta"] = timer.run("meta-training", lambda: search.run_phase(
      "meta", env, lambda i: tasks.meta_task(config, i, target, infos), s.meta_updates, fresh,
      directory("meta", meta_key), learned))
  meta_trained = search.continued_state(learner, meta_state["params"])
  finetune_key = artifacts.phase(config, "finetune", on_target, target.key(),
                                 meta=f"{meta_key}@{s.meta_updates}")
  _, phases["finetune"] = timer.run("fine-tuning", lambda: search.run_phase(
      "finetune", env, lambda i: target, s.finetune_updates, meta_trained,
      directory("finetune", finetune_key), learned))
  for phase in s.baselines:  # The same evaluations on the target, from a fresh state.
    sampler = learned if phase == "rnas" else search.make_sampler(config, phase, num_stages)
    key = artifacts.phase(config, phase, on_target, target.key())
    _, phases[phase] = timer.run(report.PHASE_LABELS[phase], lambda: search.run_phase(
        phase, env, lambda i: target, s.finetune_updates, fresh, directory(phase, key), sampler))
  return phases


# The search phase whose students each method delivers.
METHODS = {"finetune": "RC-NAS", "rnas": "R-NAS", "random": "random search",
           "evolution": "regularized evolution"}


def selections(phases: dict[str, list[env_lib.Episode]], budget_macs: int,
               top_k: int) -> dict[str, dict]:
  """Per method: its evaluations (RC-NAS's with meta-training's), its top k within-budget
  students and the one delivered (None when no student fits the budget)."""
  chosen = {}
  for phase, method in METHODS.items():
    if phase not in phases:
      continue
    top = search.top_within_budget(phases[phase], budget_macs, top_k)
    best = search.selected(top)
    chosen[method] = {
        "phase": phase, "evaluations": len(phases[phase]),
        "meta_evaluations": len(phases.get("meta", [])) if phase == "finetune" else 0,
        "candidates": [e.to_dict() for e in top],
        "delivered": None if best is None else top.index(best)}
  return chosen


def rc_nas(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole RC-NAS pipeline; returns the report."""
  s = config.search
  timer = PhaseTimer(os.path.join(workdir, "timings.json"), config)
  env, target = environment(config, workdir, timer)
  phases = search_phases(env, target, workdir, timer)
  info = env.datasets[target.dataset].info
  hand_scaled = arch.compound_scaled(target.budget_macs, info.image_shape[0], info.num_classes,
                                     info.image_shape[-1], s.width_multiple)
  candidates, none_fits = {}, {}  # method -> its student; method -> why it delivers none.
  macs = _describe(hand_scaled, info)["macs"]
  if macs <= target.budget_macs:
    candidates["hand-scaled RobustResNet"] = hand_scaled
  else:
    none_fits["hand-scaled RobustResNet"] = f"its smallest network has {macs:,} MACs"
  chosen = selections(phases, target.budget_macs, s.selection.top_k)
  for method, selection in chosen.items():
    if selection["delivered"] is None:
      none_fits[method] = f"0 of its {selection['evaluations']} students within budget"
    else:
      candidates[method] = arch.spec_from_dict(
          selection["candidates"][selection["delivered"]]["spec"])
  rows = timer.run("final trainings", lambda: final_rows(env, target, candidates, workdir))
  rows += [{"method": method, "none_fits": why} for method, why in none_fits.items()]
  warnings = [w for d, t in sorted({(d, t) for d in s.datasets for t in s.teachers}
                                    | {(target.dataset, target.teacher)})
              if (w := teacher_data_warning(config, d, t))]
  return report.write(workdir, config, target, rows, phases, search.summary(phases), timer.times,
                      timer.compiles, chosen, warnings)


# Files that describe one run's results: removed when a run with other settings starts.
RUN_FILES = ("report.md", "report.json", "rewards.png", "accuracy_vs_macs.png", "topology.png",
             "results.json", "results.md", "robustness.json", "robustness.md")


def claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Makes `workdir` this configuration's: config.json and the reports describe this run.

  A workdir made with other result fields is reused for what they share (every artifact is
  keyed by exactly its inputs); with config.resume='strict' it stops the run instead.
  """
  path = os.path.join(workdir, "config.json")
  previous = store.read_json(path)
  if jax.process_count() > 1:  # Every process reads the old config before process 0 replaces it.
    multihost_utils.sync_global_devices("claim_workdir")
  changes = artifacts.changed_fields(artifacts.flatten(previous),
                                     artifacts.flatten(config.to_dict())) if previous else []
  if changes and config.resume == "strict":
    raise config_lib.ConfigError(
        f"config.resume='strict': {workdir} was made with other settings: {', '.join(changes)} "
        "(use another workdir, or resume='auto' to reuse what they share)")
  if changes:
    print(f"{workdir} was made with other settings ({', '.join(changes)}): reusing what they "
          "share, recomputing the rest")
    for name in RUN_FILES:
      if parallel.is_primary() and os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
  store.write_text(path, config.to_json(indent=2) + "\n")


def run(config: ml_collections.ConfigDict, workdir: str):
  """Validates the config, then runs the job that `config.mode` names."""
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  claim_workdir(config, workdir)
  enable_compilation_cache(config.compilation_cache_dir or os.path.join(workdir, "jax_cache"))
  if config.mode == "train":
    return train_and_evaluate(config, workdir)
  if config.mode == "evaluate":
    return evaluate_export(config, workdir)
  return rc_nas(config, workdir)
