"""RC-NAS on CIFAR-100 at the paper's scale; full training with the paper's TRADES recipe.

  python -m rcnas_jax.main --config=configs/cifar100.py --workdir=runs/cifar100

The search of configs/cifar10.py (buffers, teachers, budgets, proxy, expected cost), with
CIFAR-100 as the held-out target: (CIFAR-100, PGD-20, WRN-34-10, 5 GMACs).
"""

import pathlib

from rcnas_jax import config as config_lib


def get_config():
  cifar10 = config_lib.load_file(pathlib.Path(__file__).with_name("cifar10.py"))
  return cifar10.get_config(target_dataset="cifar100")
