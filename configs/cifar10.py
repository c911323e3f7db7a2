"""RC-NAS on CIFAR-10 at the paper's scale; full training with the paper's TRADES recipe.

  python -m rcnas_jax.main --config=configs/cifar10.py --workdir=runs/cifar10
  python -m rcnas_jax.main --config=configs/cifar10.py --workdir=runs/cifar10_10g \
      --config.search.target.budget_macs=10_000_000_000

Target: (CIFAR-10, PGD-20, WRN-34-10, 5 GMACs), held out of meta-training over CIFAR-10/100 x
{FGSM, PGD-10, CW-20} x {WRN-28-10, WRN-34-10, WRN-46-14, WRN-70-16} x 10-60% budgets.
Needs TFDS's prepared `cifar10` and `cifar100` under $TFDS_DATA_DIR (or
--config.dataset.data_dir), or --config.dataset.download=True on a machine with network; 1,000
training images are held out for validation. Published targets:
rcnas_jax/reference/results.json.

Expected cost (estimated from FLOPs, not measured): a TRADES step costs ~36 forward passes, so one
100-epoch WRN-28-10 training is ~1.9e18 FLOPs (several hours on one H100 in bf16). Teachers: 8
such trainings, up to 7x larger (WRN-70-16), unless --config.teacher.checkpoint_dir points at
exported teachers. Search: (20 + 3 x 10) x 5 = 250 proxy trainings of 5 epochs on 10k images
(~1/100 of a full training each). End to end, days on one GPU.
"""

from rcnas_jax import config as config_lib


def get_config():
  return config_lib.paper_search(config_lib.base_config(), "cifar10")
