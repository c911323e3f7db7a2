"""A synthetic task family with a known optimum: the search, tested where the answer is known.

A synthetic task is a real `Task` (dataset, attack, teacher, budget) over made-up datasets. Its
observation comes from the real `tasks.observe`, fed made-up probe statistics; its students
come from the real `space.compress`, with real MAC counts and the real reward of METHOD §5.
Only the proxy's robust accuracy is a formula, of the student and of the task's features:

  acc = floor + (top - floor) * capacity * balance + robust + strides + noise

- capacity = (student MACs / teacher MACs)^0.3: compute helps, with diminishing returns, so
  the best student fills the budget and its ratios move with it;
- balance = exp(-(rho - rho*)^2 / (2 * 0.15^2)), where rho = mean depth ratio / (mean depth
  ratio + mean width ratio) says how the student splits its compression, and the best split
  rho* moves with the budget and with LIPS;
- robust: each robust-block stage adds 0.05 * (strength - 0.5): a loss under a weak attack
  (FGSM), a gain under a strong one (CW), where `strength` grows with the attack's steps;
- strides: each stage whose stride differs from the teacher's costs 0.03;
- noise: N(0, noise^2), fixed per (seed, task, student) as a cached evaluation is, of the
  size of the real proxy's (a 144-image validation sample alone has a standard error of ~0.04).

LIPS and the teacher's error grow with the attack's strength and the data's complexity, so the
observation tells the agent what the reward depends on. An action that cannot be built scores
-1, as in the real environment. `optimum` finds the best noise-free reward by coordinate ascent
over every buildable student from many starts, so a search is scored by its regret.
`PriorSampler` and `start_quality` say how good a starting policy must be: a fixed prior
around the optimum, and how far a (meta-trained) policy is from one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rcnas_jax import data
from rcnas_jax.nets import arch, space
from rcnas_jax.rl import env as env_lib, policy, search, tasks
from rcnas_jax.rl.env import Episode
from rcnas_jax.rl.policy import Observation
from rcnas_jax.rl.tasks import Task
from rcnas_jax.robust import attacks

# name -> (image shape, classes, complexity in [0, 1]).
DATASETS = {
    "synthetic-8": ((8, 8, 1), 10, 0.1),
    "synthetic-14": ((14, 14, 1), 10, 0.3),
    "synthetic-32": ((32, 32, 3), 10, 0.6),
    "synthetic-32-100": ((32, 32, 3), 100, 0.9),
}
ATTACKS = ("fgsm", "pgd-5", "pgd-10", "cw-10", "cw-20")
TEACHERS = ("tiny-8", "WRN-10-2", "WRN-16-2", "WRN-16-4")
# Held out of meta-training: its (dataset, attack) pair is never met there.
TARGET = dict(dataset="synthetic-8", attack="cw-20", teacher="WRN-16-4", budget_fraction=0.3)
DEFAULT_NOISE = 0.04


def configure(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `base` (e.g. `config.base_config()`) with the synthetic buffers and target; its
  search settings (M, the policy, evolution, beta) are kept."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.search.update(datasets=tuple(DATASETS), attacks=ATTACKS, teachers=TEACHERS,
                  budget_range=(0.1, 0.6))
  c.search.target.update(**TARGET)
  return c


def infos() -> dict[str, data.DatasetInfo]:
  """DatasetInfo of each synthetic dataset (what `tasks.meta_task` reads)."""
  return {name: data.DatasetInfo(name, classes, shape, (0.5,) * shape[-1], (0.25,) * shape[-1])
          for name, (shape, classes, _) in DATASETS.items()}


def target_task(config: ml_collections.ConfigDict) -> Task:
  """The held-out synthetic target of `config`."""
  shape, classes, _ = DATASETS[config.search.target.dataset]
  return tasks.target_task(config, shape[0], classes, shape[-1])


def strength(attack: attacks.ThreatModel) -> float:
  """How strong the attack is, in (0, 1): FGSM 0.3, rising with PGD's and CW's steps."""
  if attack.name == "fgsm":
    return 0.3
  saturation = 1.0 - math.exp(-attack.num_steps / 10)
  return (0.4 if attack.name == "pgd" else 0.5) + 0.45 * saturation


@dataclasses.dataclass(frozen=True)
class Features:
  """What the synthetic reward depends on, read off a task."""

  budget: float  # Budget / teacher MACs.
  log_lips: float  # log1p(LIPS).
  strength: float
  complexity: float


def features(task: Task) -> Features:
  """The task's features; LIPS has a small teacher-specific part, as a real probe's has."""
  shape, classes, complexity = DATASETS[task.dataset]
  s = strength(task.attack)
  wobble = (zlib.crc32(task.teacher.encode()) % 1000) / 1000 - 0.5
  return Features(task.budget_macs / _teacher_macs(task), 0.6 + 1.4 * s + 0.5 * complexity
                  + 0.2 * wobble, s, complexity)


def probe(task: Task) -> dict:
  """The probe statistics a real teacher would give: LIPS and its robust error."""
  f = features(task)
  return {"lips": math.expm1(f.log_lips),
          "teacher_error": min(0.95, 0.1 + 0.5 * f.strength + 0.2 * f.complexity)}


def _teacher_macs(task: Task) -> int:
  shape, classes, _ = DATASETS[task.dataset]
  return _macs(arch.teacher(task.teacher), shape, classes)


@functools.lru_cache(maxsize=1 << 16)
def _macs(spec: arch.NetworkSpec, shape: tuple, classes: int) -> int:
  return arch.count_macs(spec, shape[0], classes, shape[-1])


def accuracy(task: Task, spec: arch.NetworkSpec) -> float:
  """The noise-free robust accuracy of `spec` on `task` (the formula of the module docstring)."""
  f = features(task)
  teacher = arch.teacher(task.teacher)
  shape, classes, _ = DATASETS[task.dataset]
  capacity = (_macs(spec, shape, classes) / _teacher_macs(task)) ** 0.3
  depth = np.mean([s.depth / t.depth for s, t in zip(spec.stages, teacher.stages)])
  width = np.mean([s.channels / t.channels for s, t in zip(spec.stages, teacher.stages)])
  best_split = float(np.clip(0.45 + 0.5 * (f.budget - 0.35) + 0.15 * (f.log_lips - 1.7),
                             0.2, 0.8))
  balance = math.exp(-(depth / (depth + width) - best_split) ** 2 / (2 * 0.15**2))
  floor, top = 0.05, 0.8 - 0.25 * f.complexity - 0.25 * f.strength
  robust = sum(s.block == "robust" for s in spec.stages) * 0.05 * (f.strength - 0.5)
  strides = sum(s.stride != t.stride for s, t in zip(spec.stages, teacher.stages)) * 0.03
  return floor + (top - floor) * capacity * balance + robust - strides


def true_reward(task: Task, spec: arch.NetworkSpec, beta: float) -> float:
  """The noise-free reward of METHOD §5 (accuracy, penalised over budget)."""
  shape, classes, _ = DATASETS[task.dataset]
  return env_lib.reward(accuracy(task, spec), _macs(spec, shape, classes), task.budget_macs, beta)


def _noise(seed: int, task: Task, spec: arch.NetworkSpec, scale: float) -> float:
  """The evaluation noise of one student: the same each time it is asked for (a cache hit)."""
  key = zlib.crc32(f"{seed}|{task.key()}|{spec.to_dict()}".encode())
  return scale * float(np.random.default_rng(key).normal())


@dataclasses.dataclass
class Environment:
  """`env.Environment`'s interface, with the formula in place of proxy training."""

  config: ml_collections.ConfigDict
  noise: float = DEFAULT_NOISE

  def observe(self, task: Task) -> Observation:
    """The real observation of `task`, from its made-up probe statistics."""
    shape, classes, _ = DATASETS[task.dataset]
    return tasks.observe(task, probe(task), classes, shape)

  def episodes(self, task: Task, actions: list, *, phase: str,
               iteration: int) -> list[Episode]:
    """One update's students, scored by the formula plus noise (invalid ones -1)."""
    return [self._episode(task, a, phase, iteration, i) for i, a in enumerate(actions)]

  def _episode(self, task: Task, stage_actions, phase: str, iteration: int, i: int) -> Episode:
    shape, classes, _ = DATASETS[task.dataset]
    chosen = env_lib.chosen(stage_actions)
    try:
      spec = space.compress(arch.teacher(task.teacher), stage_actions, image_size=shape[0],
                            width_multiple=self.config.search.width_multiple)
    except space.InvalidStudentError as error:
      return Episode(phase, iteration, i, task.key(), reward=-1.0, valid=False,
                     reason=str(error), actions=chosen)
    robust_accuracy = accuracy(task, spec) + _noise(self.config.seed, task, spec, self.noise)
    macs = _macs(spec, shape, classes)
    return Episode(phase, iteration, i, task.key(),
                   reward=env_lib.reward(robust_accuracy, macs, task.budget_macs,
                                         self.config.search.beta),
                   valid=True, robust_accuracy=robust_accuracy, macs=macs,
                   params=arch.count_params(spec, classes, shape[-1]), spec=spec.to_dict(),
                   attack=task.attack.describe(), actions=chosen)


# ---------------------------------------------------------------------------------------------
# The known optimum.
# ---------------------------------------------------------------------------------------------


def _choices(t: arch.StageSpec, width_multiple: int) -> list[list[dict]]:
  """Per field of one teacher stage, every value a student's stage can take."""
  return [[{"depth": d} for d in range(1, t.depth + 1)],
          [{"channels": c} for c in range(width_multiple, t.channels + 1, width_multiple)],
          [{"stride": 1}, {"stride": 2}], [{"block": "basic"}, {"block": "robust"}]]


def _student(teacher: arch.NetworkSpec, stages: list[dict]) -> arch.NetworkSpec:
  """The student of per-stage field values, as `space.compress` would build it."""
  built = [arch.StageSpec(s["depth"], max(s["channels"], 16) if s["block"] == "robust"
                          else s["channels"], s["stride"], s["block"]) for s in stages]
  return dataclasses.replace(teacher, stages=tuple(built))


@functools.lru_cache(maxsize=None)
def optimum(task: Task, beta: float, width_multiple: int = 8, starts: int = 24,
            seed: int = 0) -> tuple[float, dict]:
  """The best noise-free reward over every buildable student, and that student's spec.

  Coordinate ascent over the per-stage fields (depth, channels, stride, block), from `starts`
  random students and from the teacher, each sweep trying every value of every field.
  """
  teacher = arch.teacher(task.teacher)
  shape = DATASETS[task.dataset][0]
  rng = np.random.default_rng(seed)
  per_stage = [[list(field) for field in _choices(t, width_multiple)] for t in teacher.stages]

  def score(stages):
    spec = _student(teacher, stages)
    if arch.spatial_sizes(spec, shape[0])[-1] < 2:
      return -1.0
    return true_reward(task, spec, beta)

  best = (-math.inf, None)
  first = [{"depth": t.depth, "channels": t.channels, "stride": t.stride, "block": t.block}
           for t in teacher.stages]
  for start in range(starts + 1):
    stages = first if start == 0 else [
        {k: v for field in fields for k, v in field[rng.integers(len(field))].items()}
        for fields in per_stage]
    current = score(stages)
    improved = True
    while improved:
      improved = False
      for i, fields in enumerate(per_stage):
        for field in fields:
          for value in field:
            trial = [dict(s) for s in stages]
            trial[i].update(value)
            trial_score = score(trial)
            if trial_score > current + 1e-12:
              stages, current, improved = trial, trial_score, True
    if current > best[0]:
      best = (current, _student(teacher, stages).to_dict())
  return best


def optimum_actions(task: Task, beta: float) -> tuple[np.ndarray, ...]:
  """The optimum as per-stage actions (depth ratio, width ratio, downsample, robust), which
  `space.compress` turns back into the optimum's spec."""
  teacher = arch.teacher(task.teacher)
  spec = arch.spec_from_dict(optimum(task, beta)[1])
  pairs = list(zip(spec.stages, teacher.stages))
  return (np.array([s.depth / t.depth for s, t in pairs]),
          np.array([s.channels / t.channels for s, t in pairs]),
          np.array([int(s.stride == 2) for s, _ in pairs]),
          np.array([int(s.block == "robust") for s, _ in pairs]))


def _logit(ratio: np.ndarray) -> np.ndarray:
  """The unconstrained logit of a ratio in (0, 1], kept finite (a whole stage is ratio 1)."""
  r = np.clip(ratio, 1e-3, 1 - 1e-3)
  return np.log(r) - np.log1p(-r)


@dataclasses.dataclass(frozen=True)
class PriorSampler:
  """A fixed prior centred on the optimum, with no learning: how good a meta-trained policy's
  starting point must be for a search to reach the optimum in a given number of episodes.

  Ratios are drawn around the optimum's with spread `sigma` in logit space (the policy's
  Gaussian heads); each stride and block-type choice is the optimum's with probability `p`
  (its Bernoulli heads), downsampling masked as the policy's.
  """

  center: tuple[np.ndarray, ...]  # `optimum_actions`.
  sigma: float
  p: float

  def sample(self, state, observation, key, num_students, history):
    del state, history
    rng = np.random.default_rng(jax.random.key_data(key).tolist())
    depth, width, downsample, robust = self.center
    shape = (num_students, len(depth))
    ratio = lambda r: _logit(r) + self.sigma * rng.normal(size=shape)
    choice = lambda right: np.where(rng.random(shape) < self.p, right, 1 - right)
    masked = jax.vmap(policy.mask_downsample, in_axes=(0, None))(
        jnp.asarray(choice(downsample)), observation.max_downsamples)
    return policy.Action(jnp.asarray(ratio(depth), jnp.float32),
                         jnp.asarray(ratio(width), jnp.float32), masked,
                         jnp.asarray(choice(robust), jnp.int32))

  def learn(self, state, observation, actions, rewards):
    return state, {}


def run_prior(config: ml_collections.ConfigDict, sigma: float, p: float,
              num_updates: int) -> list[Episode]:
  """The held-out target's episodes under `PriorSampler` (`config.seed` draws them)."""
  env, target = Environment(config), target_task(config)
  sampler = PriorSampler(optimum_actions(target, config.search.beta), sigma, p)
  _, episodes = search.run_phase("prior", env, lambda i: target, num_updates,
                                 {"iteration": 0}, None, sampler)
  return episodes


# ---------------------------------------------------------------------------------------------
# Strategies on the suite, scored against the optimum.
# ---------------------------------------------------------------------------------------------

# strategy -> (phase on the target, sampler kind, meta-trained first).
STRATEGIES = {"random": ("random", "random", False), "evolution": ("evolution", "evolution", False),
              "rnas": ("rnas", "policy", False), "rcnas": ("finetune", "policy", True)}


def run(config: ml_collections.ConfigDict, strategy: str, num_updates: int,
        meta_updates: int = 0) -> tuple[dict[str, list[Episode]], dict | None]:
  """One strategy's episodes on the held-out target ('target') and, for RC-NAS, those of its
  meta-training on the other tasks ('meta'), through `search.run_phase` in memory; and, for the
  policy strategies, `start_quality` of the policy the target phase started from."""
  phase, kind, meta_trained = STRATEGIES[strategy]
  env, target = Environment(config), target_task(config)
  num_stages = len(arch.teacher(target.teacher).stages)
  learner = search.make_learner(config, num_stages)
  state = search.fresh_state(learner, config.seed, env.observe(target))
  phases = {}
  if meta_trained:
    state, phases["meta"] = search.run_phase(
        "meta", env, lambda i: tasks.meta_task(config, i, target, infos()), meta_updates, state,
        None, search.PolicySampler(learner))
    state = search.continued_state(learner, state["params"])
  quality = (start_quality(learner, state["params"], env.observe(target),
                           optimum_actions(target, config.search.beta))
             if kind == "policy" else None)
  _, phases["target"] = search.run_phase(phase, env, lambda i: target, num_updates, state, None,
                                         search.make_sampler(config, kind, num_stages))
  return phases, quality


def start_quality(learner: search.Learner, params: dict, observation: Observation,
                  center: tuple[np.ndarray, ...]) -> dict[str, list[float]]:
  """How close a policy is to the optimum, in `PriorSampler`'s terms: per stage, the
  probability of the optimum's stride and of its block type; how far the ratio means are from
  the optimum's ratios, and the ratios' spread (both in logit space, as `PriorSampler`'s sigma)."""
  out = jax.tree.map(np.asarray, policy.apply(learner.network, params, observation))
  # P(choice = 1) = sigmoid(logit), so P(choice = wanted) = sigmoid(+-logit).
  right = lambda logit, wanted: 1.0 / (1.0 + np.exp(np.where(wanted, -logit, logit)))
  return {"p_stride": right(out.downsample_logit, center[2]).tolist(),
          "p_block": right(out.robust_logit, center[3]).tolist(),
          "depth_offset": np.abs(out.depth_mean - _logit(center[0])).tolist(),
          "width_offset": np.abs(out.width_mean - _logit(center[1])).tolist(),
          "depth_std": np.exp(out.depth_log_std).tolist(),
          "width_std": np.exp(out.width_log_std).tolist()}


def true_rewards(task: Task, episodes: list[Episode], beta: float) -> np.ndarray:
  """The noise-free reward of each episode's student (-1 for one that could not be built)."""
  return np.array([true_reward(task, arch.spec_from_dict(e.spec), beta) if e.spec else -1.0
                   for e in episodes])


def episodes_to(task: Task, episodes: list[Episode], beta: float, fraction: float = 0.95,
                reference: float | None = None) -> int | None:
  """How many episodes a search needed to first sample a student within `fraction` of the
  optimum (by its noise-free reward); None when it never did."""
  goal = fraction * (reference if reference is not None else optimum(task, beta)[0])
  hits = np.flatnonzero(true_rewards(task, episodes, beta) >= goal)
  return int(hits[0]) + 1 if hits.size else None


def incumbent_regret(task: Task, episodes: list[Episode], beta: float,
                     reference: float | None = None) -> np.ndarray:
  """After each episode, 1 - (noise-free reward of the student the search would deliver) /
  optimum: the delivered student is the within-budget one of best *observed* reward."""
  best = reference if reference is not None else optimum(task, beta)[0]
  true = true_rewards(task, episodes, beta)
  regret, incumbent = [], None
  for i, e in enumerate(episodes):
    if env_lib.within_budget(e, task.budget_macs) and (
        incumbent is None or e.reward > episodes[incumbent].reward):
      incumbent = i
    regret.append(1.0 if incumbent is None else 1.0 - true[incumbent] / best)
  return np.array(regret)
