"""The base configuration: every field once, with its default, what it may hold and its meaning.

`configs/<name>.py` files call `base_config()` and override a few fields. `validate` checks a
config before any compute: each field against its rule, then the rules that tie fields
together. A bad value raises `ConfigError` with one line: the field, the value and what is
allowed. A new field is declared in FIELDS with a rule, so it is checked from the start.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import types
from typing import Any

import ml_collections

from rcnas_jax import data
from rcnas_jax.nets import arch
from rcnas_jax.robust import attacks
from rcnas_jax.runtime import parallel

MODES = ("search", "train", "evaluate")
RESUME = ("auto", "strict")
TRAINING_METHODS = ("standard", "pgd_at", "trades")
SCHEDULES = ("step", "cosine", "constant")
ATTACK_LOOPS = ("auto", "unrolled", "rolled")
PROXY_PROGRAMS = ("auto", "family", "student")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config field holds a value that is not allowed."""


# ---------------------------------------------------------------------------------------------
# Rules: each says, for a bad value, what is expected ('' when the value is fine).
# ---------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite number (an integer when `integer`) within optional bounds."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def expected(self, value) -> str:
    ok = (_is_number(value) and math.isfinite(value)
          and (not self.integer or isinstance(value, int))
          and (self.low is None or (value > self.low if self.low_open else value >= self.low))
          and (self.high is None or (value < self.high if self.high_open else
                                     value <= self.high)))
    if ok:
      return ""
    kind = "an integer" if self.integer else "a number"
    if self.low is not None and self.high is not None:
      return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
              f"{')' if self.high_open else ']'}")
    if self.low is not None:
      return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
    return kind


def Integer(low: int | None = 0, *, positive: bool = False) -> Number:
  """An integer >= low (> 0 when `positive`)."""
  return Number(0 if positive else low, low_open=positive, integer=True)


def Real(low: float | None = 0.0, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Number:
  """A finite number within the bounds."""
  return Number(low, high, low_open, high_open)


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of a few strings."""

  options: tuple[str, ...]

  def expected(self, value) -> str:
    return "" if value in self.options and isinstance(value, str) else (
        "one of " + ", ".join(repr(o) if o == "" else o for o in self.options))


@dataclasses.dataclass(frozen=True)
class Flag:
  """True or False."""

  def expected(self, value) -> str:
    return "" if isinstance(value, bool) else "True or False"


@dataclasses.dataclass(frozen=True)
class Text:
  """Any string (a path, an address checked below)."""

  def expected(self, value) -> str:
    return "" if isinstance(value, str) else "a string"


def task_attack(name) -> bool:
  """Whether `name` is a task's attack (attacks.TASK_ATTACK_FORMS)."""
  try:
    attacks.parse_task_attack(name, eps=0.0)
  except ValueError:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class TaskAttack:
  """A task's attack name."""

  def expected(self, value) -> str:
    return "" if task_attack(value) else attacks.TASK_ATTACK_FORMS


@dataclasses.dataclass(frozen=True)
class Names:
  """A tuple of names, each one of `options` (or a task attack); empty only when allowed."""

  options: tuple[str, ...] | None = None  # None: task attack names.
  allow_empty: bool = False

  def expected(self, value) -> str:
    ok_name = task_attack if self.options is None else (
        lambda n: isinstance(n, str) and n in self.options)
    if isinstance(value, (tuple, list)) and (value or self.allow_empty) and all(
        map(ok_name, value)):
      return ""
    names = attacks.TASK_ATTACK_FORMS if self.options is None else ", ".join(self.options)
    return f"a {'' if self.allow_empty else 'non-empty '}tuple of {names}"


@dataclasses.dataclass(frozen=True)
class Fractions:
  """A tuple of numbers in (0, 1); with `pair`, exactly (low, high) with low <= high."""

  pair: bool = False

  def expected(self, value) -> str:
    inside = Real(0.0, 1.0, low_open=True, high_open=not self.pair)
    ok = isinstance(value, (tuple, list)) and all(not inside.expected(v) for v in value)
    if self.pair:
      ok = ok and len(value) == 2 and value[0] <= value[1]
      return "" if ok else "(low, high) with 0 < low <= high <= 1"
    return "" if ok else "a tuple of fractions in (0, 1)"


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its dotted name, default, rule and meaning."""

  name: str
  default: Any
  rule: Any
  doc: str


# ---------------------------------------------------------------------------------------------
# The fields.
# ---------------------------------------------------------------------------------------------

F = Field
FIELDS: tuple[Field, ...] = (
    F("seed", 0, Integer(), "Seeds data splits, shuffling, initialisation and attacks."),
    F("mode", "search", Choice(MODES),
      "What `main` runs: 'search' = the whole RC-NAS pipeline (teachers -> meta-training -> "
      "fine-tuning -> baselines -> full training -> report -> export); 'train' = adversarially "
      "train and evaluate model.arch alone; 'evaluate' = the evaluation suite on the exported "
      "student at `checkpoint` (RobustBench-style JSON and a Markdown table)."),
    F("checkpoint", "", Text(), "mode='evaluate': a directory written by export.export_student."),
    F("compilation_cache_dir", "", Text(),
      "Where XLA's persistent compilation cache lives ('' = <workdir>/jax_cache)."),
    F("resume", "auto", Choice(RESUME),
      "A rerun in a used workdir: 'auto' reuses every artifact computed from the same fields "
      "and recomputes the rest; 'strict' stops, naming the fields that changed."),

    F("dataset.name", "digits", Choice(data.DATASETS), "The dataset of mode='train'."),
    F("dataset.data_dir", "", Text(),
      "TFDS data dir / folder holding tiny-imagenet-200 ('' = default)."),
    F("dataset.download", False, Flag(), "Only then may TFDS use the network."),
    F("dataset.validation_size", 0.1, Real(0.0, low_open=True),
      "Carved from train: a fraction in (0, 1) or a count."),
    F("dataset.split_seed", 0, Integer(),
      "Seeds which training examples are held out for validation: independent of `seed`, so "
      "no seed's teachers or students train on another seed's reward images."),
    F("dataset.max_train_examples", 0, Integer(), "Truncate the train split (0 = keep all)."),
    F("dataset.max_image_size", 0, Integer(),
      "Shrink larger images by an integer factor (0 = native size)."),
    F("dataset.crop_padding", 0, Integer(),
      "Random crop after zero padding by this many pixels (0 = off)."),
    F("dataset.flip", False, Flag(), "Random horizontal flips (off for digits)."),

    F("model.arch", "tiny-8", Choice(tuple(arch.TEACHERS)), "mode='train': a teacher's name."),
    F("model.dtype", "float32", Choice(DTYPES),
      "Compute dtype of convolutions and dense layers: 'bfloat16' is mixed precision for "
      "GPU/TPU (parameters, optimiser state and BN statistics stay float32)."),

    # Multi-process runs (jax.distributed). Launchers that set JAX_COORDINATOR_ADDRESS, Slurm
    # steps with several tasks and Open MPI start it without any of these fields.
    F("distributed.enabled", False, Flag(),
      "Initialise even without such a launcher (e.g. Cloud TPU pods)."),
    F("distributed.coordinator_address", "", Text(), "host:port of process 0 ('' = auto)."),
    F("distributed.num_processes", 0, Integer(), "0 = auto-detected."),
    F("distributed.process_id", -1, Integer(-1), "-1 = auto-detected."),

    F("teacher.epochs", 10, Integer(positive=True),
      "Teachers of the search (one per dataset and teacher name) train with `training` and "
      "`attack` for this many epochs."),
    F("teacher.checkpoint_dir", "", Text(),
      "Holds <dataset>-<teacher>/ exports to load instead ('' = train them)."),

    # The RC-NAS search (METHOD §2-6). A task is (dataset, attack, teacher, budget); attacks are
    # 'clean', 'fgsm', 'pgd-<steps>', 'cw-<steps>' or 'apgd-<steps>' (APGD-CE) at attack.eps.
    F("search.datasets", ("digits", "mnist5k"), Names(data.DATASETS),
      "Meta-training buffer of datasets."),
    F("search.attacks", ("fgsm", "pgd-5"), Names(), "Meta-training buffer of attacks."),
    F("search.teachers", ("tiny-8",), Names(tuple(arch.TEACHERS)),
      "Meta-training buffer of teachers."),
    F("search.budget_range", (0.2, 0.6), Fractions(pair=True),
      "Meta-training budgets: fractions of the task teacher's MACs."),
    F("search.target.dataset", "digits", Choice(data.DATASETS),
      "The held-out target: its (dataset, attack) pair is never meta-trained."),
    F("search.target.attack", "cw-10", TaskAttack(), "The target's attack."),
    F("search.target.teacher", "tiny-8", Choice(tuple(arch.TEACHERS)), "The target's teacher."),
    F("search.target.budget_macs", 0, Integer(), "An absolute budget in MACs, or"),
    F("search.target.budget_fraction", 0.4, Real(), "... this fraction of the teacher's MACs."),
    F("search.students_per_update", 5, Integer(positive=True), "M, students per update."),
    F("search.meta_updates", 20, Integer(), "Meta-training policy updates."),
    F("search.finetune_updates", 10, Integer(),
      "Fine-tuning updates (and those of each baseline)."),
    F("search.baselines", ("rnas", "random", "evolution"),
      Names(("rnas", "random", "evolution"), allow_empty=True),
      "Also run R-NAS, random search and regularized evolution on the target, each with "
      "fine-tuning's evaluations."),
    F("search.evolution.population", 20, Integer(positive=True),
      "Regularized evolution: the population is the last this many students (ageing)."),
    F("search.evolution.tournament", 3, Integer(positive=True),
      "Students drawn from the population; the best is the parent."),
    F("search.evolution.mutation_std", 1.0, Real(low_open=True),
      "A mutated ratio moves by N(0, this) in logit space."),
    F("search.selection.top_k", 3, Integer(positive=True),
      "Each method's best k within-budget students by reward are compared on the selection "
      "set; the best there is delivered."),
    F("search.selection.examples", 1024, Integer(),
      "Validation images of the selection set, disjoint from the reward's (0 = all the rest); "
      "every proxy evaluation also attacks them, in chunks of the reward's sample."),
    F("search.beta", 2.0, Real(), "Budget penalty exponent over budget."),
    F("search.width_multiple", 8, Integer(positive=True), "Student channels round to this."),
    F("search.probe_size", 64, Integer(positive=True),
      "Validation images (a stratified sample) for LIPS and the teacher's error."),
    F("search.lipschitz_iterations", 20, Integer(positive=True), "Power iterations for LIPS."),
    F("search.proxy.epochs", 2, Integer(positive=True),
      "The short training of each sampled student."),
    F("search.proxy.train_examples", 512, Integer(), "A fixed stratified sample (0 = all)."),
    F("search.proxy.validation_examples", 256, Integer(),
      "Likewise, evaluated as one batch (0 = all)."),
    F("search.proxy.batch_size", 64, Integer(positive=True), "The proxy's batch."),
    F("search.proxy.learning_rate", 0.05, Real(low_open=True), "The proxy's learning rate."),
    F("search.proxy.method", "", Choice(("",) + TRAINING_METHODS),
      "'standard', 'pgd_at' or 'trades' ('' = training.method)."),
    F("search.proxy.attack_steps", 3, Integer(positive=True), "The proxy's attack steps."),
    F("search.proxy.distill_weight", 0.0, Real(0.0, 1.0),
      "KL to the teacher's logits during proxy training."),
    F("search.proxy.programs", "auto", Choice(PROXY_PROGRAMS),
      "'family' runs every student on its family's masked network (nets/masked.py): one "
      "compile per (teacher, strides, blocks); 'student' compiles each student's own shape; "
      "'auto' is 'student': on 2 CPU cores a family network runs about as long as a student's "
      "programs take to compile (benchmarks/results/proxy_programs.md)."),
    F("search.proxy.cpu_optimization_level", 1, Number(0, 3, integer=True),
      "XLA:CPU's backend optimisation level for the proxy's programs (XLA's default is 2): "
      "1 compiles a new student about a quarter faster and runs as fast; 0 compiles faster "
      "still but runs rolled attack loops ~26x slower (docs/PERFORMANCE.md). Other backends "
      "ignore it."),
    F("search.policy.algorithm", "vpg", Choice(("vpg", "ppo")), "'vpg' (REINFORCE) or 'ppo'."),
    F("search.policy.baseline", "leave_one_out", Choice(("leave_one_out", "value")),
      "The advantage's baseline: the mean reward of the update's other M - 1 students, or the "
      "value head."),
    F("search.policy.normalise_advantages", True, Flag(),
      "Divide the advantages by their standard deviation over the update."),
    F("search.policy.hidden", 64, Integer(positive=True), "Width of the policy network."),
    F("search.policy.learning_rate", 3e-3, Real(low_open=True), "Adam's learning rate."),
    F("search.policy.entropy_weight", 0.01, Real(), "Weight of the entropy bonus."),
    F("search.policy.value_weight", 0.5, Real(), "Weight of the value loss."),
    F("search.policy.ppo_epochs", 4, Integer(positive=True), "PPO epochs per update."),
    F("search.policy.ppo_clip", 0.2, Real(low_open=True), "PPO's clipping range."),

    F("parallel.candidates", 0, Integer(),
      "Device meshes: a `candidate` axis of slices that evaluate different students "
      "concurrently, each slice a `data` mesh. 0 = auto: gcd(students per update, devices)."),

    # The attack used for adversarial training (and, in the search, the task's attack).
    F("attack.eps", 8 / 255, Real(), "Radius of the training attack."),
    F("attack.step_size", 2 / 255, Real(), "Its step."),
    F("attack.num_steps", 10, Integer(positive=True), "Its steps."),
    F("attack.norm", "linf", Choice(attacks.NORMS), "'linf' or 'l2'."),
    F("attack.loop", "auto", Choice(ATTACK_LOOPS),
      "'unrolled' writes attack steps out (faster on XLA:CPU); 'rolled' uses lax.fori_loop "
      "(faster compiles, fine on GPU/TPU); 'auto' unrolls on CPU only."),

    F("training.method", "trades", Choice(TRAINING_METHODS), "'standard', 'pgd_at' or 'trades'."),
    F("training.trades_beta", 6.0, Real(), "TRADES' weight of the KL term."),
    F("training.epochs", 100, Integer(positive=True), "Epochs of a full training."),
    F("training.batch_size", 128, Integer(positive=True),
      "Global batch; must divide evenly over the devices."),
    F("training.learning_rate", 0.1, Real(low_open=True), "Peak learning rate (SGD)."),
    F("training.momentum", 0.9, Real(0.0, 1.0, high_open=True), "SGD momentum."),
    F("training.nesterov", False, Flag(), "Nesterov momentum."),
    F("training.weight_decay", 2e-4, Real(), "L2 weight decay on every parameter."),
    F("training.schedule", "step", Choice(SCHEDULES),
      "'step' (x0.1 at each decay point), 'cosine' or 'constant'."),
    F("training.decay_points", (0.75, 0.9), Fractions(),
      "Fractions of training where 'step' decays."),
    F("training.warmup_epochs", 0.0, Real(), "Linear warmup."),
    F("training.grad_clip", 5.0, Real(), "Global-norm clipping (0 = off)."),
    F("training.ema_decay", 0.0, Real(0.0, 1.0, high_open=True),
      "EMA of the weights, used for evaluation (0 = off)."),
    F("training.distill_weight", 0.0, Real(0.0, 1.0),
      "Weight of KL to a teacher's logits (0 = off)."),
    F("training.distill_temperature", 1.0, Real(low_open=True), "Distillation temperature."),
    F("training.log_every_steps", 10, Integer(positive=True), "Metrics every this many steps."),
    F("training.checkpoint_every_steps", 200, Integer(positive=True),
      "Checkpoints every this many steps, and at the end of every epoch."),

    # Evaluation attacks (METHOD §7), in the model's eval mode: 'clean', 'fgsm', 'pgd', 'cw',
    # 'apgd-ce', 'apgd-dlr', 'apgd-t', 'fab-t', 'square' each run on every example;
    # 'autoattack' = AutoAttack's standard version, the point-wise worst case of APGD-CE, APGD-T,
    # FAB-T and Square, each on the points still robust, reusing those of them also listed;
    # 'aa-lite' = the same without FAB-T (cheaper; an upper bound on AutoAttack's accuracy).
    F("evaluation.attacks", ("clean", "fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "autoattack"),
      Names(attacks.EVALUATION_ATTACKS), "Run in mode='train' and in the search's final report."),
    F("evaluation.suite", (), Names(attacks.EVALUATION_ATTACKS, allow_empty=True),
      "mode='evaluate' runs these (() = evaluation.attacks)."),
    F("evaluation.eps", 8 / 255, Real(), "The evaluation radius."),
    F("evaluation.norm", "linf", Choice(attacks.NORMS), "'linf' or 'l2'."),
    F("evaluation.pgd_steps", 20, Integer(positive=True), "PGD's steps."),
    F("evaluation.pgd_step_size", 0.8 / 255, Real(), "PGD's step."),
    F("evaluation.cw_steps", 40, Integer(positive=True), "CW's steps (margin loss)."),
    F("evaluation.cw_step_size", 0.8 / 255, Real(), "CW's step."),
    F("evaluation.apgd_steps", 100, Integer(positive=True),
      "APGD-CE / APGD-DLR / APGD-T iterations (AutoAttack: 100)."),
    F("evaluation.apgd_targets", 9, Integer(positive=True),
      "APGD-T's target classes (at most num_classes - 1)."),
    F("evaluation.fab_steps", 100, Integer(positive=True), "FAB-T's iterations (AutoAttack: 100)."),
    F("evaluation.fab_targets", 9, Integer(positive=True),
      "FAB-T's target classes (at most num_classes - 1; AutoAttack: 9)."),
    F("evaluation.square_queries", 5000, Integer(positive=True),
      "Square's queries per restart (AutoAttack: 5000, with its p schedule as written; any "
      "other budget rescales the schedule, and the label says so)."),
    F("evaluation.restarts", 1, Integer(positive=True), "Random restarts per attack."),
    F("evaluation.check_examples", 256, Integer(),
      "mode='evaluate': gradient-masking checks on this many test examples (0 = off)."),
    F("evaluation.batch_size", 256, Integer(positive=True), "Evaluation batch."),
    F("evaluation.max_examples", 0, Integer(),
      "Evaluate on a fixed stratified sample of N (0 = all)."),
    F("evaluation.loop", "auto", Choice(ATTACK_LOOPS),
      "Like attack.loop, for PGD and CW; a rolled CW-40 compiles much faster. Square's loop "
      "is always rolled; on CPU APGD and FAB-T run one program per step from Python, "
      "elsewhere rolled (100 unrolled steps compile for minutes)."),
)


def base_config() -> ml_collections.ConfigDict:
  """Every field at its default (FIELDS says what each one means)."""
  c = ml_collections.ConfigDict()
  for field in FIELDS:
    *sections, name = field.name.split(".")
    node = c
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[name] = field.default
  return c


def load_file(path) -> types.ModuleType:
  """The config file at `path` as a module, so that a config can start from another one."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


def _fail(field: str, value, allowed: str):
  raise ConfigError(f"config.{field}={value!r}: expected {allowed}")


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int = 1,
             num_processes: int = 1) -> None:
  """Raises ConfigError naming the first bad field; returns None when the config is valid."""
  for field in FIELDS:
    try:
      value = _get(config, field.name)
    except (KeyError, AttributeError):
      raise ConfigError(f"config.{field.name} is missing: build configs on "
                        "config.base_config()") from None
    if expected := field.rule.expected(value):
      _fail(field.name, value, expected)
  _validate_relations(config, num_devices, num_processes)


def _validate_relations(config, num_devices: int, num_processes: int) -> None:
  """The rules that tie several fields together."""
  d, e, s = config.dataset, config.evaluation, config.search
  if d.validation_size >= 1 and d.validation_size != int(d.validation_size):
    _fail("dataset.validation_size", d.validation_size, "a fraction in (0, 1) or a count")
  if config.mode == "evaluate" and not config.checkpoint:
    _fail("checkpoint", config.checkpoint, "the path of an exported student with mode='evaluate'")
  if s.target.budget_macs <= 0 and s.target.budget_fraction <= 0:
    _fail("search.target.budget_fraction", s.target.budget_fraction,
          "a number > 0 (or set search.target.budget_macs)")
  for field in ("training.batch_size", "evaluation.batch_size"):
    if _get(config, field) % num_devices:
      _fail(field, _get(config, field), f"a multiple of the {num_devices} devices")
  if config.parallel.candidates and num_devices % config.parallel.candidates:
    _fail("parallel.candidates", config.parallel.candidates,
          f"0 (auto) or a divisor of the {num_devices} devices")
  if config.parallel.candidates > 1 and num_processes > 1:
    _fail("parallel.candidates", config.parallel.candidates,
          f"0 (auto) or 1 with {num_processes} processes: slices live within one process")
  slice_size = num_devices // parallel.candidate_slices(
      config.parallel.candidates, s.students_per_update, num_devices, num_processes)
  if config.mode == "search" and s.proxy.batch_size % slice_size:
    _fail("search.proxy.batch_size", s.proxy.batch_size,
          f"a multiple of the {slice_size} devices of a slice")
  dist = config.distributed
  if dist.coordinator_address and not _host_port(dist.coordinator_address):
    _fail("distributed.coordinator_address", dist.coordinator_address, "'' or host:port")
  if dist.num_processes and dist.process_id >= dist.num_processes:
    _fail("distributed.process_id", dist.process_id, f"-1 or a number < {dist.num_processes}")


def _host_port(address: str) -> bool:
  """Whether `address` looks like host:port."""
  host, _, port = address.rpartition(":")
  return bool(host) and port.isdigit()
