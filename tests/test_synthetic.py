"""The synthetic task family: its known optimum is the true one, its reward has the structure it
claims, and the shipped learner learns on it at the shipped defaults."""

import dataclasses
import itertools

import numpy as np
import pytest

from rcnas_jax import config as config_lib
from rcnas_jax.nets import arch, space
from rcnas_jax.rl import search, synthetic
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust.attacks import ThreatModel


def _task(attack="cw-20", teacher="tiny-8", budget=0.4, dataset="synthetic-8") -> Task:
  c = synthetic.configure(config_lib.base_config())
  c.search.target.update(dataset=dataset, attack=attack, teacher=teacher, budget_fraction=budget)
  return synthetic.target_task(c)


def test_the_optimum_is_the_best_of_every_buildable_student():
  task = _task()
  teacher = arch.teacher(task.teacher)
  per_stage = [list(itertools.product(range(1, t.depth + 1), range(8, t.channels + 1, 8), (1, 2),
                                      ("basic", "robust"))) for t in teacher.stages]
  best = -np.inf
  for stages in itertools.product(*per_stage):
    spec = synthetic._student(teacher, [dict(depth=d, channels=c, stride=s, block=b)
                                        for d, c, s, b in stages])
    if arch.spatial_sizes(spec, 8)[-1] >= 2:
      best = max(best, synthetic.true_reward(task, spec, beta=2.0))
  optimum, spec = synthetic.optimum(task, 2.0)
  assert optimum == pytest.approx(best, abs=1e-12)  # Exhaustive over all 4096 students.
  assert synthetic.true_reward(task, arch.spec_from_dict(spec), 2.0) == optimum


def test_robust_blocks_are_worth_more_under_strong_attacks_and_the_budget_moves_the_optimum():
  spec = arch.teacher("WRN-16-2")
  robust = dataclasses.replace(spec, stages=tuple(
      dataclasses.replace(s, block="robust") for s in spec.stages))
  gain = lambda attack: (synthetic.accuracy(_task(attack, "WRN-16-2"), robust)
                         - synthetic.accuracy(_task(attack, "WRN-16-2"), spec))
  # Robust blocks also cost MACs (capacity), so the attack's part is the difference.
  assert gain("cw-20") - gain("fgsm") > 0.05  # 3 stages x 0.05 x (0.89 - 0.3) = 0.09 of it.
  assert synthetic.strength(ThreatModel("pgd", num_steps=5)) < synthetic.strength(
      ThreatModel("pgd", num_steps=10))
  small, large = (arch.spec_from_dict(synthetic.optimum(_task(budget=b, teacher="WRN-16-2"),
                                                        2.0)[1]) for b in (0.15, 0.6))
  macs = lambda s: arch.count_macs(s, 8, 10, 1)
  assert macs(small) <= _task(budget=0.15, teacher="WRN-16-2").budget_macs < macs(large)


def test_the_environment_scores_like_the_real_one():
  c = synthetic.configure(config_lib.base_config())
  env, task = synthetic.Environment(c), synthetic.target_task(c)
  keep = space.StageAction(depth_ratio=0.5, width_ratio=0.5, downsample=1, robust=1)
  flat = space.StageAction(depth_ratio=0.5, width_ratio=0.5, downsample=0, robust=0)
  good, again = (env.episodes(task, [[flat, keep, keep]], phase="x", iteration=i)[0]
                 for i in range(2))
  assert good.valid and good.reward == again.reward  # A student's noise is fixed, as cached.
  true = synthetic.true_reward(task, arch.spec_from_dict(good.spec), c.search.beta)
  assert abs(good.reward - true) < 4 * synthetic.DEFAULT_NOISE and good.reward != true
  assert good.macs == arch.count_macs(arch.spec_from_dict(good.spec), 8, 10, 1)
  assert good.actions == [[0.5, 0.5, 0, 0], [0.5, 0.5, 1, 1], [0.5, 0.5, 1, 1]]
  unbuildable = env.episodes(task, [[keep, keep, keep]], phase="x", iteration=0)[0]
  assert not unbuildable.valid and unbuildable.reward == -1.0  # 8x8 halved three times.
  observation = env.observe(task)
  assert int(observation.max_downsamples) == 2 and observation.task.shape == (6,)


def test_the_learner_learns_at_the_shipped_defaults():
  """R-NAS at config.base_config()'s policy settings, against random search with the same
  evaluations: its students' noise-free rewards rise, and end well above random's."""
  c = synthetic.configure(config_lib.base_config())
  task = synthetic.target_task(c)
  optimum = synthetic.optimum(task, c.search.beta)[0]
  quality = {}
  for strategy in ("rnas", "random"):
    fractions = []
    for seed in (0, 1):
      c.seed = seed
      episodes = synthetic.run(c, strategy, 90)[0]["target"]
      fractions.append(synthetic.true_rewards(task, episodes, c.search.beta) / optimum)
    quality[strategy] = np.mean(fractions, axis=0)
  m = c.search.students_per_update
  first, last = quality["rnas"][:10 * m].mean(), quality["rnas"][-10 * m:].mean()
  assert last > first + 0.1 and last > 0.65  # Measured: 0.53 -> 0.70 of the optimum.
  assert last > quality["random"][-10 * m:].mean() + 0.2  # Random stays at ~0.38.


def test_a_prior_centred_on_the_optimum_samples_it_and_errs_at_its_rate():
  """`PriorSampler` at p = 1 and a tiny spread gives the optimum every time; at p = 0.8 each
  stride and block-type choice is the optimum's 80% of the time, less what the downsample mask
  drops; at p = 0 never (where the downsample mask lets the wrong choice be built)."""
  c = synthetic.configure(config_lib.base_config())
  task = synthetic.target_task(c)
  optimum, spec = synthetic.optimum(task, c.search.beta)
  center = synthetic.optimum_actions(task, c.search.beta)
  assert space.compress(arch.teacher(task.teacher), space.stage_actions(*center), image_size=8,
                        width_multiple=c.search.width_multiple) == arch.spec_from_dict(spec)
  exact = synthetic.run_prior(c, sigma=0.01, p=1.0, num_updates=4)
  assert np.allclose(synthetic.true_rewards(task, exact, c.search.beta), optimum)
  assert synthetic.episodes_to(task, exact, c.search.beta) == 1
  right = lambda episodes: np.array([[[s[2], s[3]] == [int(center[2][i]), int(center[3][i])]
                                      for i, s in enumerate(e.actions)] for e in episodes])
  mixed = right(synthetic.run_prior(c, sigma=0.5, p=0.8, num_updates=100))  # (500, 3) pairs.
  # Both choices right with probability 0.8^2 = 0.64 in stages 0 and 1. Stage 2's wanted
  # downsample is masked when stages 0 and 1 both downsample (0.2 x 0.8), so its stride is
  # right with 0.8 x 0.84: 0.5376 with the block. 1,500 stage draws give a std of 0.013.
  assert abs(mixed.mean() - (0.64 + 0.64 + 0.8 * 0.84 * 0.8) / 3) < 0.04
  wrong = synthetic.run_prior(c, sigma=0.5, p=0.0, num_updates=4)
  assert not right(wrong).any()  # Strides 2-1-1 and basic blocks: buildable on 8x8.


def test_a_fresh_policy_starts_at_coin_flips_around_half_ratios():
  """`start_quality` of an untrained policy: every binary choice at p 0.5 and the ratio means
  at logit 0 (ratio 0.5) with std 0.5, as `policy.INITIAL_LOG_STD` sets."""
  c = synthetic.configure(config_lib.base_config())
  task = synthetic.target_task(c)
  learner = search.make_learner(c, 3)
  observation = synthetic.Environment(c).observe(task)
  params = search.fresh_state(learner, 0, observation)["params"]
  center = synthetic.optimum_actions(task, c.search.beta)  # Widths 40/88/136 of 64/128/256.
  q = synthetic.start_quality(learner, params, observation, center)
  np.testing.assert_allclose(q["p_stride"] + q["p_block"], 0.5, atol=0.02)
  np.testing.assert_allclose(q["depth_std"] + q["width_std"], 0.5, rtol=0.05)
  widths = np.array([40 / 64, 88 / 128, 136 / 256])
  np.testing.assert_allclose(q["width_offset"], np.abs(np.log(widths / (1 - widths))), atol=0.05)
  np.testing.assert_allclose(q["depth_offset"], 0.0, atol=0.05)  # Depths 1 of 2: ratio 0.5.
