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

configs/cifar100.py and configs/tinyimagenet.py start from this file. Every field not set
here keeps the default documented in rcnas_jax/config.py.
"""

from rcnas_jax import config as config_lib


def get_config(target_dataset: str = "cifar10"):
  """The paper's search and recipe, with `target_dataset` as the held-out target."""
  c = config_lib.base_config()
  c.mode = "search"
  c.dataset.name = target_dataset
  c.model.arch = "WRN-34-10"  # Trained by mode='train' only; the search trains its students.

  # The threat model and training attack of the paper's full training (METHOD §6): L-inf,
  # eps 8/255 on [0, 1] images, 10 PGD steps of 2/255 (Madry et al.; TRADES' inner maximiser).
  c.attack.update(eps=8 / 255, step_size=2 / 255, num_steps=10, norm="linf")
  # TRADES with beta 6, as RobustResNet and the paper train every model; SGD 0.1, momentum 0.9,
  # weight decay 2e-4, x0.1 at 75% and 90% of 100 epochs (Rice et al.'s robust-overfitting
  # schedule); clipping at 5 keeps the first TRADES steps of inherited weights stable.
  c.training.update(method="trades", trades_beta=6.0, epochs=100, batch_size=128,
                    learning_rate=0.1, momentum=0.9, weight_decay=2e-4, schedule="step",
                    decay_points=(0.75, 0.9), grad_clip=5.0)
  # The paper's table columns: PGD-20 and CW-40 at the training radius (METHOD §7).
  c.evaluation.update(eps=8 / 255, pgd_steps=20, cw_steps=40)
  # Standard CIFAR augmentation (4-pixel padded crops, flips); 1,000 training images are held
  # out, so the search selects on validation data and never on the test split.
  c.dataset.update(crop_padding=4, flip=True, validation_size=1000)
  c.teacher.epochs = 100  # Teachers train with the students' full recipe.

  # The meta-training buffers of the paper's Table 1 setting: two datasets, three attacks, four
  # WRN teachers, budgets drawn from 10-60% of the task teacher's MACs (METHOD §2).
  c.search.update(datasets=("cifar10", "cifar100"), attacks=("fgsm", "pgd-10", "cw-20"),
                  teachers=("WRN-28-10", "WRN-34-10", "WRN-46-14", "WRN-70-16"),
                  budget_range=(0.1, 0.6),
                  # M = 5 students per update, 20 meta-training and 10 fine-tuning updates.
                  students_per_update=5, meta_updates=20, finetune_updates=10,
                  probe_size=256)  # LIPS on 256 validation images: a stable mean at low cost.
  # The held-out target: the paper's headline (dataset, PGD-20, WRN-34-10, 5 GMACs) task.
  c.search.target.update(dataset=target_dataset, attack="pgd-20", teacher="WRN-34-10",
                         budget_macs=5_000_000_000)
  # The proxy: 5 epochs on a fixed 10k-image subset and 1,000 validation images, PGD-5 (about
  # 1/100 of a full training), which the paper leaves open (METHOD §5).
  c.search.proxy.update(epochs=5, train_examples=10_000, validation_examples=1000,
                        batch_size=128, learning_rate=0.1, attack_steps=5)
  return c
