"""Configs: every file loads and validates; bad values stop with one line naming the field."""

import importlib.util
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
    ("evaluation.attacks", ("clean", "aa"), "expected a tuple of clean, fgsm, pgd, cw, apgd-ce"),
    ("evaluation.apgd_targets", 0, "config.evaluation.apgd_targets=0: expected a number > 0"),
    ("training.batch_size", 3, "config.training.batch_size=3: expected a multiple of the 2"),
    ("model.dtype", "float16", "config.model.dtype='float16': expected one of float32, bfloat16"),
    ("parallel.candidates", 3, "config.parallel.candidates=3: expected 0 (auto) or a divisor"),
    ("distributed.coordinator_address", "node0",
     "config.distributed.coordinator_address='node0': expected '' or host:port"),
    ("distributed.process_id", -2, "config.distributed.process_id=-2: expected a number >= -1"),
])
def test_bad_values_name_field_value_and_allowed(field, value, needle):
  c = config_lib.base_config()
  section, name = field.split(".")
  c[section][name] = value
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
