"""Tiny-ImageNet (64x64, 200 classes) with the paper's TRADES recipe, 100 epochs.

  python -m rcnas_jax.main --config=configs/tinyimagenet.py --workdir=runs/tinyimagenet

Needs the official `tiny-imagenet-200` folder (unzipped tiny-imagenet-200.zip) in
--config.dataset.data_dir. Its labelled `val` folder is our test split; 1,000 training images
are held out for validation. Expected cost (estimated, not measured): WRN-28-10 at 64x64 is
21 GMACs per image and 100k images per epoch, ~8x the CIFAR runs: about a day on one H100.
The recipe, threat model and augmentation are configs/cifar10.py's.
"""

import pathlib

from rcnas_jax import config as config_lib


def get_config():
  cifar10 = config_lib.load_file(pathlib.Path(__file__).with_name("cifar10.py"))
  c = cifar10.get_config(target_dataset="tinyimagenet")
  c.mode = "train"  # Trains config.model.arch; the RC-NAS search configs are the CIFAR ones.
  c.model.arch = "WRN-28-10"
  c.evaluation.batch_size = 128
  return c
