"""Quickstart: TRADES on scikit-learn's real 8x8 digits, sized for 2 CPU cores.

  python -m rcnas_jax.main --config=configs/quickstart.py --workdir=workdir/quickstart

Embedded data, nothing to download. Measured here (2 cores, 2 virtual devices): under a
minute; clean ~99%, PGD-20 ~88%, CW-40 ~87% on the 359 test digits at eps 0.1.
"""

from rcnas_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset.name = "digits"
  c.model.arch = "tiny-8"
  c.attack.eps = 0.1
  c.attack.step_size = 0.025
  c.attack.num_steps = 5
  c.training.epochs = 20
  c.training.batch_size = 64
  c.training.learning_rate = 0.05
  c.training.schedule = "cosine"
  c.training.warmup_epochs = 1.0
  c.evaluation.eps = 0.1
  c.evaluation.pgd_step_size = 0.01
  c.evaluation.cw_step_size = 0.01
  return c
