"""Artifact keys: stable, and changed by exactly the fields each artifact is computed from."""

import jax.numpy as jnp
import pytest

from rcnas_jax import config as config_lib
from rcnas_jax.runtime import artifacts

GROUPS = (artifacts.DATA + artifacts.RECIPE + artifacts.PROXY + artifacts.PROBE
          + artifacts.SEARCH + artifacts.POLICY + artifacts.EVOLUTION + artifacts.META_TASKS
          + artifacts.TEST_EVALUATION + ("training.method", "training.epochs", "teacher.epochs"))


def test_every_field_is_keyed_execution_only_or_reaches_keys_indirectly():
  fields = artifacts.flatten(config_lib.base_config().to_dict())
  homeless = [f for f in fields if not artifacts._within(f, GROUPS + artifacts.EXECUTION_ONLY
                                                         + artifacts.INDIRECT)]
  assert homeless == []  # A new field must say what it changes.


def test_digest_is_stable_and_ignores_dict_order():
  assert artifacts.digest({"a": 1, "b": (2, 3)}) == artifacts.digest({"b": [2, 3], "a": 1})
  assert artifacts.digest({"a": 1}) != artifacts.digest({"a": 2})
  assert len(artifacts.digest({})) == 16
  tree = {"w": jnp.ones((2, 3))}
  assert artifacts.weights_digest(tree) == artifacts.weights_digest({"w": jnp.ones((2, 3))})
  assert artifacts.weights_digest(tree) != artifacts.weights_digest({"w": jnp.ones((3, 2))})
  assert artifacts.weights_digest(tree) != artifacts.weights_digest(
      {"w": jnp.ones((2, 3)).at[0, 0].set(1.0 + 1e-7)})


def _changed(field: str, value):
  c = config_lib.base_config()
  *sections, name = field.split(".")
  node = c
  for section in sections:
    node = node[section]
  node[name] = value
  return c


KEYS = {
    "teacher": lambda c: artifacts.teacher(c, "digits", "tiny-8"),
    "probe": lambda c: artifacts.probe(c, "task", "weights"),
    "evaluation": lambda c: artifacts.evaluation(c, "task", {"spec": 1}, "weights"),
    "meta": lambda c: artifacts.phase(c, "meta", {"digits-tiny-8": "w"}, "task"),
    "random": lambda c: artifacts.phase(c, "random", {"digits-tiny-8": "w"}, "task"),
    "evolution": lambda c: artifacts.phase(c, "evolution", {"digits-tiny-8": "w"}, "task"),
    "training": lambda c: artifacts.training(c, "digits", {"spec": 1}, "weights"),
    "test-evaluation": lambda c: artifacts.test_evaluation(c, "digits", "weights"),
}


@pytest.mark.parametrize("field,value,changes", [
    ("seed", 3, set(KEYS)),
    ("training.epochs", 7, {"training"}),
    ("teacher.epochs", 7, {"teacher"}),
    ("training.learning_rate", 0.2, {"teacher", "training"}),  # Proxies have their own.
    # The validation split is carved by split_seed, never by seed; the test split is fixed.
    ("dataset.split_seed", 1, set(KEYS) - {"test-evaluation"}),
    ("training.method", "pgd_at", {"teacher", "training", "evaluation", "meta", "random",
                                   "evolution"}),
    ("search.proxy.epochs", 3, {"evaluation", "meta", "random", "evolution"}),
    ("search.selection.examples", 512, {"evaluation", "meta", "random", "evolution"}),
    ("search.selection.top_k", 1, set()),  # It only chooses among finished evaluations.
    ("search.beta", 3.0, {"meta", "random", "evolution"}),
    ("search.policy.learning_rate", 0.1, {"meta"}),  # Random search has no policy.
    ("search.evolution.tournament", 5, {"evolution"}),
    ("search.datasets", ("digits",), {"meta"}),
    ("search.probe_size", 32, {"probe", "meta"}),
    ("evaluation.eps", 0.05, {"test-evaluation"}),
    ("evaluation.attacks", ("clean",), {"test-evaluation"}),
    ("evaluation.check_examples", 3, set()),
    ("attack.loop", "rolled", set()),  # Rolled and unrolled loops run the same attack.
    ("parallel.candidates", 1, set()),
    ("training.log_every_steps", 1, set()),
])
def test_a_field_changes_exactly_the_keys_of_what_is_computed_from_it(field, value, changes):
  base = {name: key(config_lib.base_config()) for name, key in KEYS.items()}
  after = {name: key(_changed(field, value)) for name, key in KEYS.items()}
  assert {name for name in KEYS if base[name] != after[name]} == changes


def test_the_training_method_keys_a_proxy_only_when_the_proxy_inherits_it():
  c = _changed("search.proxy.method", "pgd_at")
  d = _changed("search.proxy.method", "pgd_at")
  d.training.method = "standard"
  assert artifacts.evaluation(c, "t", {}, "w") == artifacts.evaluation(d, "t", {}, "w")


def test_changed_fields_names_each_change_and_ignores_execution_only_ones():
  before = artifacts.flatten(config_lib.base_config().to_dict())
  c = _changed("training.epochs", 12)
  c.evaluation.eps = 0.05
  c.parallel.candidates = 1
  c.resume = "strict"
  assert artifacts.changed_fields(before, artifacts.flatten(c.to_dict())) == [
      "evaluation.eps (0.03137254901960784 -> 0.05)", "training.epochs (100 -> 12)"]
