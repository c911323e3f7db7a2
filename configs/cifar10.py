"""CIFAR-10 with the paper's recipe: TRADES (beta 6, eps 8/255, 10 steps of 2/255), 100 epochs.

  python -m rcnas_jax.main --config=configs/cifar10.py --workdir=runs/cifar10

Needs TFDS's prepared `cifar10` under $TFDS_DATA_DIR (or --config.dataset.data_dir), or
--config.dataset.download=True on a machine with network. 1,000 training images are held out
for validation. Expected cost (estimated, not measured): WRN-28-10 is 5.24 GMACs per image; a
TRADES step costs about 36 forward-equivalents, so 100 epochs are ~1.9e18 FLOPs: several hours
on one H100 in bf16, one to two days on one V100 in fp32. Published targets: shared/reference.
"""

from rcnas_jax import config as config_lib


def get_config():
  c = config_lib.paper_recipe(config_lib.base_config())
  c.dataset.name = "cifar10"
  c.model.arch = "WRN-28-10"
  return c
