"""The base configuration, every field documented once, and its validation.

`configs/<name>.py` files call `base_config()` and override a few fields. `validate` checks a
config before any compute and raises `ConfigError` with one line: the field, the value and
what is allowed.
"""

from __future__ import annotations

import math

import ml_collections

from rcnas_jax import arch, data

MODES = ("search", "train", "evaluate")
TRAINING_METHODS = ("standard", "pgd_at", "trades")
SCHEDULES = ("step", "cosine", "constant")
ATTACK_LOOPS = ("auto", "unrolled", "rolled")
EVALUATION_ATTACKS = ("clean", "fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "square",
                      "aa-lite")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config field holds a value that is not allowed."""


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default and its meaning."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds data splits, shuffling, initialisation and attacks.
  # What `main` runs: 'search' = the whole RC-NAS pipeline (teachers -> meta-training ->
  # fine-tuning -> baselines -> full training -> report -> export); 'train' = adversarially
  # train and evaluate config.model.arch alone; 'evaluate' = the evaluation suite on the exported
  # student at `checkpoint` (RobustBench-style JSON and a Markdown table in the workdir).
  c.mode = "search"
  c.checkpoint = ""  # mode='evaluate': a directory written by export.export_student.
  # Where XLA's persistent compilation cache lives ('' = <workdir>/jax_cache).
  c.compilation_cache_dir = ""

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"  # One of data.DATASETS.
  c.dataset.data_dir = ""  # TFDS data dir / folder holding tiny-imagenet-200 ('' = default).
  c.dataset.download = False  # Only then may TFDS use the network.
  c.dataset.validation_size = 0.1  # Carved from train: a fraction in (0, 1) or a count.
  c.dataset.max_train_examples = 0  # Truncate the train split (0 = keep all).
  c.dataset.max_image_size = 0  # Shrink larger images by an integer factor (0 = native size).
  c.dataset.crop_padding = 0  # Random crop after zero padding by this many pixels (0 = off).
  c.dataset.flip = False  # Random horizontal flips (off for digits).

  c.model = ml_collections.ConfigDict()
  c.model.arch = "tiny-8"  # mode='train': a name of arch.TEACHERS.
  # Compute dtype of convolutions and dense layers: 'bfloat16' is mixed precision for GPU/TPU
  # (parameters, optimiser state and BN statistics stay float32; logits are float32).
  c.model.dtype = "float32"

  # Multi-process runs (jax.distributed). Launchers that set JAX_COORDINATOR_ADDRESS, Slurm
  # steps with several tasks and Open MPI start it without any of these fields.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False  # Initialise even without such a launcher (e.g. Cloud TPU pods).
  c.distributed.coordinator_address = ""  # host:port of process 0 ('' = auto-detected).
  c.distributed.num_processes = 0  # 0 = auto-detected.
  c.distributed.process_id = -1  # -1 = auto-detected.

  # Teachers of the search (one per dataset and teacher name), trained with config.training
  # and config.attack for `epochs`, or loaded from exported checkpoints.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.epochs = 10
  c.teacher.checkpoint_dir = ""  # Holds <dataset>-<teacher>/ exports to load ('' = train).

  # The RC-NAS search (SPEC §2-6). A task is (dataset, attack, teacher, budget); attacks are
  # 'clean', 'fgsm', 'pgd-<steps>', 'cw-<steps>' or 'apgd-<steps>' (APGD-CE) at config.attack.eps.
  c.search = ml_collections.ConfigDict()
  c.search.datasets = ("digits", "mnist5k")  # Meta-training buffer of datasets.
  c.search.attacks = ("fgsm", "pgd-5")  # Meta-training buffer of attacks.
  c.search.teachers = ("tiny-8",)  # Meta-training buffer of teachers.
  c.search.budget_range = (0.2, 0.6)  # Meta budgets: fractions of the teacher's MACs.
  c.search.target = ml_collections.ConfigDict()  # Held out: (dataset, attack) never meta-trained.
  c.search.target.dataset = "digits"
  c.search.target.attack = "cw-10"
  c.search.target.teacher = "tiny-8"
  c.search.target.budget_macs = 0  # Absolute budget, or
  c.search.target.budget_fraction = 0.4  # ... this fraction of the teacher's MACs.
  c.search.students_per_update = 5  # M.
  c.search.meta_updates = 20
  c.search.finetune_updates = 10
  c.search.baselines = ("rnas", "random")  # Also run R-NAS and random search on the target.
  c.search.beta = 2.0  # Budget penalty exponent over budget.
  c.search.width_multiple = 8
  c.search.probe_size = 64  # Validation images (a stratified sample) for LIPS and error.
  c.search.lipschitz_iterations = 20
  c.search.proxy = ml_collections.ConfigDict()  # Short training of each sampled student.
  c.search.proxy.epochs = 2
  c.search.proxy.train_examples = 512  # A fixed stratified sample of N (0 = all).
  c.search.proxy.validation_examples = 256  # Likewise; evaluated as one batch.
  c.search.proxy.batch_size = 64
  c.search.proxy.learning_rate = 0.05
  c.search.proxy.method = ""  # 'standard', 'pgd_at' or 'trades' ('' = training.method).
  c.search.proxy.attack_steps = 3
  c.search.proxy.distill_weight = 0.0  # KL to the teacher's logits during proxy training.
  c.search.policy = ml_collections.ConfigDict()
  c.search.policy.algorithm = "vpg"  # 'vpg' (REINFORCE + value baseline) or 'ppo'.
  c.search.policy.hidden = 64
  c.search.policy.learning_rate = 3e-3
  c.search.policy.entropy_weight = 0.01
  c.search.policy.value_weight = 0.5
  c.search.policy.ppo_epochs = 4
  c.search.policy.ppo_clip = 0.2

  # Device meshes: a `candidate` axis of slices that evaluate different students concurrently,
  # each slice a `data` mesh. 0 = auto: gcd(search.students_per_update, number of devices).
  c.parallel = ml_collections.ConfigDict()
  c.parallel.candidates = 0

  # The attack used for adversarial training (and, in the search, the task's attack).
  c.attack = ml_collections.ConfigDict()
  c.attack.eps = 8 / 255
  c.attack.step_size = 2 / 255
  c.attack.num_steps = 10
  c.attack.norm = "linf"  # 'linf' or 'l2'.
  # 'unrolled' writes attack steps out (faster on XLA:CPU); 'rolled' uses lax.fori_loop
  # (faster compiles, fine on GPU/TPU); 'auto' unrolls on CPU only.
  c.attack.loop = "auto"

  c.training = ml_collections.ConfigDict()
  c.training.method = "trades"  # 'standard', 'pgd_at' or 'trades'.
  c.training.trades_beta = 6.0
  c.training.epochs = 100
  c.training.batch_size = 128  # Global batch; must divide evenly over the devices.
  c.training.learning_rate = 0.1
  c.training.momentum = 0.9
  c.training.nesterov = False
  c.training.weight_decay = 2e-4
  c.training.schedule = "step"  # 'step' (x0.1 at each decay point), 'cosine' or 'constant'.
  c.training.decay_points = (0.75, 0.9)  # Fractions of training where 'step' decays.
  c.training.warmup_epochs = 0.0
  c.training.grad_clip = 5.0  # Global-norm clipping (0 = off).
  c.training.ema_decay = 0.0  # EMA of the weights, used for evaluation (0 = off).
  c.training.distill_weight = 0.0  # Weight of KL to a teacher's logits (0 = off).
  c.training.distill_temperature = 1.0
  c.training.log_every_steps = 10
  c.training.checkpoint_every_steps = 200  # Also at the end of every epoch.

  # Evaluation attacks (SPEC §7), in the model's eval mode: 'clean', 'fgsm', 'pgd', 'cw',
  # 'apgd-ce', 'apgd-dlr', 'apgd-t', 'square' each run on every example; 'aa-lite' = the
  # point-wise worst case of APGD-CE, APGD-T and Square, each on the points still robust
  # (AutoAttack's standard mode), reusing those of the three that are also listed.
  c.evaluation = ml_collections.ConfigDict()
  # These run in mode='train' and in the search's final report; mode='evaluate' runs `suite`
  # (() = the same attacks).
  c.evaluation.attacks = ("clean", "fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "aa-lite")
  c.evaluation.suite = ()
  c.evaluation.eps = 8 / 255
  c.evaluation.norm = "linf"
  c.evaluation.pgd_steps = 20
  c.evaluation.pgd_step_size = 0.8 / 255
  c.evaluation.cw_steps = 40
  c.evaluation.cw_step_size = 0.8 / 255
  c.evaluation.apgd_steps = 100  # APGD-CE / APGD-DLR / APGD-T iterations (AutoAttack: 100).
  c.evaluation.apgd_targets = 9  # APGD-T's target classes (at most num_classes - 1).
  c.evaluation.square_queries = 5000  # Square's queries per restart (AutoAttack: 5000).
  c.evaluation.restarts = 1
  # mode='evaluate': gradient-masking checks (gradient_masking.py) on this many test examples.
  c.evaluation.check_examples = 256  # 0 = off.
  c.evaluation.batch_size = 256
  c.evaluation.max_examples = 0  # Evaluate on a fixed stratified sample of N (0 = all).
  # Like attack.loop, for PGD and CW; a rolled CW-40 compiles much faster. APGD and Square loops
  # are always rolled (100 unrolled steps compile for minutes).
  c.evaluation.loop = "auto"
  return c


def paper_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's full training (SPEC §6): TRADES beta 6, 100 epochs, eps 8/255, 10 x 2/255."""
  c.attack.update(eps=8 / 255, step_size=2 / 255, num_steps=10, norm="linf")
  c.training.update(method="trades", trades_beta=6.0, epochs=100, batch_size=128,
                    learning_rate=0.1, momentum=0.9, weight_decay=2e-4, schedule="step",
                    decay_points=(0.75, 0.9), grad_clip=5.0)
  c.evaluation.update(eps=8 / 255, pgd_steps=20, cw_steps=40)
  c.dataset.update(crop_padding=4, flip=True, validation_size=1000)
  return c


def paper_search(c: ml_collections.ConfigDict, target_dataset: str) -> ml_collections.ConfigDict:
  """The paper-scale search: WRN teachers, CIFAR-10/100 buffers, a 5-GMAC held-out target."""
  c = paper_recipe(c)
  c.mode = "search"
  c.dataset.name = target_dataset
  c.model.arch = "WRN-34-10"  # mode='train' only.
  c.teacher.epochs = 100
  c.search.update(datasets=("cifar10", "cifar100"), attacks=("fgsm", "pgd-10", "cw-20"),
                  teachers=("WRN-28-10", "WRN-34-10", "WRN-46-14", "WRN-70-16"),
                  budget_range=(0.1, 0.6), students_per_update=5, meta_updates=20,
                  finetune_updates=10, probe_size=256)
  c.search.target.update(dataset=target_dataset, attack="pgd-20", teacher="WRN-34-10",
                         budget_macs=5_000_000_000)
  c.search.proxy.update(epochs=5, train_examples=10_000, validation_examples=1000,
                        batch_size=128, learning_rate=0.1, attack_steps=5)
  return c


def _fail(field: str, value, allowed: str):
  raise ConfigError(f"config.{field}={value!r}: expected {allowed}")


def _one_of(config, field: str, choices) -> None:
  value = _get(config, field)
  if value not in choices:
    _fail(field, value, "one of " + ", ".join(map(str, choices)))


def _at_least(config, field: str, low, *, strict: bool = False) -> None:
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      value <= low if strict else value < low):
    _fail(field, value, f"a number {'>' if strict else '>='} {low}")


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def _attack_names(value) -> bool:
  """Whether every entry is 'clean', 'fgsm', 'pgd-<steps>', 'cw-<steps>' or 'apgd-<steps>'."""
  def ok(name):
    kind, _, steps = name.partition("-")
    return (kind in ("clean", "fgsm") and not steps) or (
        kind in ("pgd", "cw", "apgd") and steps.isdigit() and int(steps) > 0)
  return all(isinstance(n, str) and ok(n) for n in value)


def _validate_search(config) -> None:
  """The search section: buffers, target, budgets, learning settings."""
  s = config.search
  for field, names, allowed in (("datasets", s.datasets, data.DATASETS),
                                ("teachers", s.teachers, tuple(arch.TEACHERS))):
    if not names or any(n not in allowed for n in names):
      _fail(f"search.{field}", tuple(names), "a non-empty tuple of " + ", ".join(allowed))
  if not s.attacks or not _attack_names(s.attacks):
    _fail("search.attacks", tuple(s.attacks),
          "a non-empty tuple of clean, fgsm, pgd-<steps>, cw-<steps>, apgd-<steps>")
  if not _attack_names((s.target.attack,)):
    _fail("search.target.attack", s.target.attack,
          "clean, fgsm, pgd-<steps>, cw-<steps> or apgd-<steps>")
  _one_of(config, "search.target.dataset", data.DATASETS)
  _one_of(config, "search.target.teacher", tuple(arch.TEACHERS))
  _one_of(config, "search.policy.algorithm", ("vpg", "ppo"))
  _one_of(config, "search.proxy.method", ("",) + TRAINING_METHODS)
  low, high = s.budget_range
  if not 0 < low <= high:
    _fail("search.budget_range", tuple(s.budget_range), "(low, high) with 0 < low <= high")
  if s.target.budget_macs <= 0 and s.target.budget_fraction <= 0:
    _fail("search.target.budget_fraction", s.target.budget_fraction,
          "a number > 0 (or set search.target.budget_macs)")
  for name in s.baselines:
    if name not in ("rnas", "random"):
      _fail("search.baselines", tuple(s.baselines), "a tuple of rnas, random")
  for field in ("search.students_per_update", "search.width_multiple", "search.probe_size",
                "search.lipschitz_iterations", "search.proxy.epochs", "search.proxy.batch_size",
                "search.proxy.learning_rate", "search.proxy.attack_steps",
                "search.policy.hidden", "search.policy.learning_rate", "search.policy.ppo_epochs",
                "teacher.epochs"):
    _at_least(config, field, 0, strict=True)
  for field in ("search.meta_updates", "search.finetune_updates", "search.beta",
                "search.proxy.train_examples", "search.proxy.validation_examples",
                "search.proxy.distill_weight", "search.policy.entropy_weight",
                "search.policy.value_weight", "search.policy.ppo_clip"):
    _at_least(config, field, 0)


def validate(config: ml_collections.ConfigDict, num_devices: int = 1,
             num_processes: int = 1) -> None:
  """Raises ConfigError naming the first bad field; returns None when the config is valid."""
  _one_of(config, "mode", MODES)
  _validate_search(config)
  _one_of(config, "dataset.name", data.DATASETS)
  _one_of(config, "model.arch", tuple(arch.TEACHERS))
  _one_of(config, "model.dtype", DTYPES)
  _one_of(config, "attack.norm", ("linf", "l2"))
  _one_of(config, "attack.loop", ATTACK_LOOPS)
  _one_of(config, "evaluation.loop", ATTACK_LOOPS)
  _one_of(config, "training.method", TRAINING_METHODS)
  _one_of(config, "training.schedule", SCHEDULES)
  _one_of(config, "evaluation.norm", ("linf", "l2"))
  for field in ("evaluation.attacks", "evaluation.suite"):
    if config.evaluation.norm == "l2" and {"square", "aa-lite"} & set(_get(config, field)):
      _fail(field, tuple(_get(config, field)), "no square or aa-lite with evaluation.norm='l2' "
            "(our Square attack is L-inf only)")
  for field in ("evaluation.attacks", "evaluation.suite"):
    if any(name not in EVALUATION_ATTACKS for name in _get(config, field)):
      _fail(field, tuple(_get(config, field)), "a tuple of " + ", ".join(EVALUATION_ATTACKS))
  for field in ("attack.eps", "attack.step_size", "evaluation.eps", "training.weight_decay",
                "dataset.validation_size",
                "training.grad_clip", "training.trades_beta", "training.distill_weight",
                "training.warmup_epochs", "dataset.max_train_examples", "dataset.crop_padding",
                "dataset.max_image_size",
                "evaluation.max_examples", "evaluation.pgd_step_size",
                "evaluation.check_examples",
                "evaluation.cw_step_size"):
    _at_least(config, field, 0)
  for field in ("training.epochs", "training.batch_size", "training.learning_rate",
                "attack.num_steps", "evaluation.pgd_steps", "evaluation.cw_steps",
                "evaluation.restarts", "evaluation.batch_size", "training.log_every_steps",
                "evaluation.apgd_steps", "evaluation.apgd_targets", "evaluation.square_queries",
                "training.checkpoint_every_steps", "training.distill_temperature"):
    _at_least(config, field, 0, strict=True)
  if config.mode == "evaluate" and not config.checkpoint:
    _fail("checkpoint", config.checkpoint, "the path of an exported student with mode='evaluate'")
  if not 0 <= config.training.ema_decay < 1:
    _fail("training.ema_decay", config.training.ema_decay, "a number in [0, 1)")
  if not 0 <= config.training.momentum < 1:
    _fail("training.momentum", config.training.momentum, "a number in [0, 1)")
  if not all(0 < p < 1 for p in config.training.decay_points):
    _fail("training.decay_points", tuple(config.training.decay_points),
          "fractions in (0, 1)")
  for field in ("training.batch_size", "evaluation.batch_size"):
    if _get(config, field) % num_devices:
      _fail(field, _get(config, field), f"a multiple of the {num_devices} devices")
  _at_least(config, "parallel.candidates", 0)
  if config.parallel.candidates and num_devices % config.parallel.candidates:
    _fail("parallel.candidates", config.parallel.candidates,
          f"0 (auto) or a divisor of the {num_devices} devices")
  if config.parallel.candidates > 1 and num_processes > 1:
    _fail("parallel.candidates", config.parallel.candidates,
          f"0 (auto) or 1 with {num_processes} processes: slices live within one process")
  slice_size = num_devices // candidate_slices(config, num_devices, num_processes)
  if config.mode == "search" and config.search.proxy.batch_size % slice_size:
    _fail("search.proxy.batch_size", config.search.proxy.batch_size,
          f"a multiple of the {slice_size} devices of a slice")
  _validate_distributed(config)


def candidate_slices(config: ml_collections.ConfigDict, num_devices: int,
                     num_processes: int = 1) -> int:
  """How many students of one update are evaluated concurrently (config.parallel.candidates).

  Auto: gcd(M, devices) in one process; 1 across processes, where every program spans all.
  """
  if config.parallel.candidates:
    return config.parallel.candidates
  if num_processes > 1:
    return 1
  return math.gcd(config.search.students_per_update, num_devices)


def _validate_distributed(config) -> None:
  """The multi-process fields."""
  d = config.distributed
  if not isinstance(d.enabled, bool):
    _fail("distributed.enabled", d.enabled, "True or False")
  if d.coordinator_address and not _host_port(d.coordinator_address):
    _fail("distributed.coordinator_address", d.coordinator_address, "'' or host:port")
  _at_least(config, "distributed.num_processes", 0)
  _at_least(config, "distributed.process_id", -1)
  if d.num_processes and d.process_id >= d.num_processes:
    _fail("distributed.process_id", d.process_id, f"-1 or a number < {d.num_processes}")


def _host_port(address: str) -> bool:
  """Whether `address` looks like host:port."""
  host, _, port = address.rpartition(":")
  return bool(host) and port.isdigit()
