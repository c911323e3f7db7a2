"""Configs: every file loads and validates; bad values stop with one line naming the field."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from rcnas_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_validates_and_documents_its_command(path):
  config_lib.validate(_load(path), num_devices=2)
  assert f"--config=configs/{path.name}" in path.read_text()


def test_paper_recipe_in_cifar_configs():
  for name in ("cifar10", "cifar100", "tinyimagenet"):
    c = _load(ROOT / "configs" / f"{name}.py")
    t = c.training
    assert (t.method, t.trades_beta, t.epochs, t.learning_rate, t.momentum) == (
        "trades", 6.0, 100, 0.1, 0.9)
    assert (t.weight_decay, t.schedule, tuple(t.decay_points)) == (2e-4, "step", (0.75, 0.9))
    assert c.attack.eps == pytest.approx(8 / 255) and c.attack.num_steps == 10
    assert c.attack.step_size == pytest.approx(2 / 255)
    assert (c.evaluation.pgd_steps, c.evaluation.cw_steps) == (20, 40)


@pytest.mark.parametrize("field,value,needle", [
    ("dataset.name", "imagenet", "config.dataset.name='imagenet': expected one of digits"),
    ("training.method", "mart", "expected one of standard, pgd_at, trades"),
    ("model.arch", "WRN-1", "config.model.arch='WRN-1'"),
    ("attack.eps", -0.1, "config.attack.eps=-0.1: expected a number >= 0"),
    ("training.ema_decay", 1.0, "config.training.ema_decay=1.0: expected a number in [0, 1)"),
    ("evaluation.attacks", ("clean", "aa"),
     "expected a non-empty tuple of clean, fgsm, pgd, cw, apgd-ce"),
    ("evaluation.apgd_targets", 0, "config.evaluation.apgd_targets=0: expected an integer > 0"),
    ("attack.eps", float("nan"), "config.attack.eps=nan: expected a number >= 0"),
    ("search.budget_range", (0.5, 0.2), "expected (low, high) with 0 < low <= high <= 1"),
    ("search.target.attack", "pgd-0", "expected clean, fgsm, pgd-<steps>, cw-<steps> or apgd"),
    ("training.batch_size", 3, "config.training.batch_size=3: expected a multiple of the 2"),
    ("model.dtype", "float16", "config.model.dtype='float16': expected one of float32, bfloat16"),
    ("parallel.candidates", 3, "config.parallel.candidates=3: expected 0 (auto) or a divisor"),
    ("distributed.coordinator_address", "node0",
     "config.distributed.coordinator_address='node0': expected '' or host:port"),
    ("distributed.process_id", -2, "config.distributed.process_id=-2: expected an integer >= -1"),
])
def test_bad_values_name_field_value_and_allowed(field, value, needle):
  c = config_lib.base_config()
  *sections, name = field.split(".")
  node = c
  for section in sections:
    node = node[section]
  node[name] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c, num_devices=2)
  assert needle in str(error.value) and "\n" not in str(error.value)


def test_main_stops_with_one_line_before_any_compute(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "rcnas_jax.main", "--config=configs/quickstart.py",
       "--config.training.method=mart", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.training.method='mart': expected one of standard, pgd_at, trades")
  assert not (tmp_path / "checkpoints").exists()


def test_a_candidate_slice_must_split_the_proxy_batch():
  c = config_lib.base_config()
  c.parallel.candidates = 2
  c.search.proxy.batch_size = 6
  with pytest.raises(config_lib.ConfigError, match=r"config.search.proxy.batch_size=6: expected "
                     r"a multiple of the 4 devices of a slice"):
    config_lib.validate(c, num_devices=8)
  c.search.proxy.batch_size = 8
  config_lib.validate(c, num_devices=8)


def test_evaluate_mode_needs_a_checkpoint():
  c = config_lib.base_config()
  c.mode = "evaluate"
  with pytest.raises(config_lib.ConfigError, match="config.checkpoint='': expected the path"):
    config_lib.validate(c)
  c.checkpoint = "runs/export"
  config_lib.validate(c)


# ---------------------------------------------------------------------------------------------
# Every field, every kind of bad value, through the command line.
# ---------------------------------------------------------------------------------------------


def _bad_values(field: config_lib.Field) -> list[str]:
  """Command-line values the field must refuse: a wrong type, a negative, NaN, an empty tuple
  and an unknown name, where each applies to the field's kind."""
  rule, bad = field.rule, []
  if isinstance(rule, config_lib.Number):
    bad.append("abc")  # A wrong type.
    if rule.low is not None:
      bad.append(str(min(-1, int(rule.low) - 1)) if rule.integer or rule.low < 0 else "-0.5")
    if rule.high is not None:
      bad.append(str(rule.high + 1))
    bad.append("nan")
  elif isinstance(rule, config_lib.Flag):
    bad.append("maybe")
  elif isinstance(rule, (config_lib.Choice, config_lib.TaskAttack)):
    bad.append("bogus-3")
  elif isinstance(rule, config_lib.Names):
    bad += ["3", "('bogus',)", "('bogus-3',)"] + ([] if rule.allow_empty else ["()"])
  elif isinstance(rule, config_lib.Fractions):
    bad += ["3", "(nan, 0.5)", "(-0.5, 0.5)"] + (["()"] if rule.pair else [])
  else:
    assert isinstance(rule, config_lib.Text), f"{field.name}: add its rule's bad values here"
  return bad


CASES = [(f.name, v) for f in config_lib.FIELDS for v in _bad_values(f)]


@pytest.fixture
def no_compute(monkeypatch):
  """Makes reaching any job a test failure: a bad value must stop before it."""
  from rcnas_jax import pipeline

  def reached(*args, **kwargs):
    raise AssertionError("a job started with a bad config value")
  for name in ("rc_nas", "train_and_evaluate", "evaluate_export"):
    monkeypatch.setattr(pipeline, name, reached)


def _command_line(argv: list[str]):
  """What `python -m rcnas_jax.main ARGV` does up to the job, in this process."""
  from absl import flags

  from rcnas_jax import main
  flag_values = flags.FlagValues()
  main.define_flags(flag_values, argv)
  main.parse(argv, flag_values)
  main.job(flag_values.config, flag_values.workdir)


def test_every_field_is_checked_with_every_kind_of_bad_value():
  kinds = {type(f.rule).__name__ for f in config_lib.FIELDS}
  assert kinds == {"Number", "Flag", "Choice", "TaskAttack", "Names", "Fractions", "Text"}
  checked = {name for name, _ in CASES}
  unchecked = [f.name for f in config_lib.FIELDS if f.name not in checked]
  # Free text (paths, addresses) has no bad value of its own; the relations check the rest.
  assert all(isinstance(f.rule, config_lib.Text) for f in config_lib.FIELDS
             if f.name in unchecked)
  assert len(CASES) > 200


@pytest.mark.parametrize("field,value", CASES)
def test_a_bad_value_stops_with_one_error_line_before_any_compute(field, value, tmp_path,
                                                                   capsys, no_compute):
  workdir = tmp_path / "run"
  argv = ["main", "--config=configs/quickstart.py", f"--config.{field}={value}",
          f"--workdir={workdir}"]
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with pytest.raises(SystemExit) as stop:
      _command_line(argv)
  finally:
    os.chdir(cwd)
  message = str(stop.value.code)
  assert message.startswith("error: ") and "\n" not in message, message
  assert field in message or f"--config.{field}" in message, message
  assert not workdir.exists()  # Nothing was written: the run stopped before any work.
  printed = capsys.readouterr()
  assert "Traceback" not in printed.out + printed.err


def test_an_unknown_field_or_a_bad_flag_is_one_line_too(tmp_path, no_compute):
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for extra, needle in (("--config.training.nosuch=3", "no such config field 'nosuch'"),
                          ("--config.nosuch.deeper=3", "no such config field 'nosuch'"),
                          ("--nosuch=3", "Unknown command line flag 'nosuch'")):
      with pytest.raises(SystemExit) as stop:
        _command_line(["main", "--config=configs/quickstart.py", extra,
                       f"--workdir={tmp_path / 'run'}"])
      assert str(stop.value.code).startswith("error: ") and needle in str(stop.value.code)
  finally:
    os.chdir(cwd)
