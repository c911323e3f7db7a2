"""Search-space specs and analytic counting against published sizes and the real models."""

import json

import jax
import numpy as np
import pytest

from rcnas_jax import reference
from rcnas_jax.nets import arch, models

REFERENCE = reference.load("architectures")


def _reference_entries():
  """(name, source, params_m, gmacs) for every target of the reference file."""
  for name, entry in REFERENCE.items():
    if name.startswith("_"):
      continue
    for source in ("published", "reference_code"):
      if source in entry:
        yield name, source, entry[source]["params_m"], entry[source]["gmacs"]


@pytest.mark.parametrize("name,source,params_m,gmacs", list(_reference_entries()))
def test_counts_match_reference_within_2_percent(name, source, params_m, gmacs):
  spec = arch.TEACHERS[name]
  assert abs(arch.count_params(spec) / 1e6 - params_m) / params_m < 0.02
  assert abs(arch.count_macs(spec) / 1e9 - gmacs) / gmacs < 0.02


def test_reference_zoo_matches_file_configuration():
  assert len(REFERENCE) > 10
  for name, entry in REFERENCE.items():
    if name.startswith("_"):
      continue
    spec = arch.TEACHERS[name]
    assert spec.depths == tuple(entry["depth"])
    assert spec.widths == tuple(16 * 2**i * w for i, w in enumerate(entry["width"]))
    assert {s.block for s in spec.stages} == {entry["block"]}


def test_wrn_28_10_exact_count():
  # Hand count: stem 432; stage convs and BN; head 640*10 + 10 + BN 1280.
  spec = arch.wide_resnet(28, 10)
  assert arch.count_params(spec) == 36_479_194


def _macs_of_eqns(eqns) -> int:
  """Conv and dense multiply-accumulates of a jaxpr's equations, nested ones included."""
  total = 0
  for eqn in eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kh, kw, cin_per_group, cout = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      total += out[1] * out[2] * kh * kw * cin_per_group * cout
    elif eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      total += int(np.prod(lhs)) * rhs[-1]
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        total += _macs_of_eqns(inner.eqns)
  return total


def _macs_from_jaxpr(fn, *args) -> int:
  """MACs read off the traced program of one image (an independent count)."""
  return _macs_of_eqns(jax.make_jaxpr(fn)(*args).jaxpr.eqns)


SMALL_SPECS = [
    arch.TEACHERS["tiny-8"],
    arch.residual_network((2, 1, 2), (1, 2, 1), block="robust"),
    arch.NetworkSpec(stages=(arch.StageSpec(1, 16, 1, "basic"), arch.StageSpec(2, 32, 2, "robust"),
                             arch.StageSpec(1, 24, 2, "basic")), stem_stride=2),
]


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=lambda s: str(s.depths))
@pytest.mark.parametrize("image_size,num_classes,in_channels", [(32, 10, 3), (28, 7, 1)])
def test_counts_equal_the_flax_model(spec, image_size, num_classes, in_channels):
  model = models.build(spec, num_classes)
  shape = (image_size, image_size, in_channels)
  variables = jax.eval_shape(lambda: models.init(model, jax.random.key(0), shape))
  n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert arch.count_params(spec, num_classes, in_channels) == n_params
  images = jax.ShapeDtypeStruct((1, *shape), np.float32)
  macs = _macs_from_jaxpr(model.apply, variables, images)
  assert arch.count_macs(spec, image_size, num_classes, in_channels) == macs


def test_spec_is_hashable_and_round_trips():
  spec = arch.TEACHERS["RRN-A1"]
  assert hash(spec) == hash(arch.spec_from_dict(spec.to_dict()))
  assert arch.spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  assert len({spec, arch.spec_from_dict(spec.to_dict())}) == 1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(stages=(arch.StageSpec(1, 8, 1, "robust"),)), "at least 16 base channels"),
    (dict(stages=(arch.StageSpec(1, 16, 3),)), "stride 1 or 2"),
    (dict(stages=(arch.StageSpec(1, 16, 1, "dense"),)), "expected one of basic, robust"),
    (dict(stages=(arch.StageSpec(1, 16),), activation="tanh"), "expected one of relu"),
])
def test_invalid_specs_name_the_field(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    arch.NetworkSpec(**kwargs)


def test_unknown_teacher_lists_the_zoo():
  with pytest.raises(ValueError, match="WRN-28-10"):
    arch.teacher("WRN-1-1")


def test_spatial_sizes_follow_strides():
  spec = arch.wide_resnet(16, 2)
  assert arch.spatial_sizes(spec, 32) == (32, 16, 8)
  assert arch.spatial_sizes(spec, 7) == (7, 4, 2)


@pytest.mark.parametrize("gmacs", [5.0, 10.0])
def test_compound_scaling_fills_the_budget_like_robustresnet(gmacs):
  spec = arch.compound_scaled(int(gmacs * 1e9))
  macs = arch.count_macs(spec)
  assert 0.85 * gmacs * 1e9 <= macs <= gmacs * 1e9
  d = spec.depths[2]
  assert spec.depths == (2 * d, 2 * d, d) and {s.block for s in spec.stages} == {"robust"}
  assert 6 <= d <= 9  # RRN-A1 (5G) has d = 7, RRN-A2 (10G) d = 8.
