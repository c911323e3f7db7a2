"""Flax models: structure against an independent functional re-implementation, init, BN modes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcnas_jax.nets import arch, models


def _randomise(tree, key):
  """Every leaf replaced by random values (positive where it is a BN variance)."""
  leaves, treedef = jax.tree.flatten_with_path(tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    values = jax.random.normal(k, leaf.shape) * 0.3
    out.append(jnp.abs(values) + 0.5 if "var" in jax.tree_util.keystr(path) else values + (
        1.0 if "scale" in jax.tree_util.keystr(path) else 0.0))
  return jax.tree.unflatten(treedef, out)


def _bn(x, p, s):
  return (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def _conv(x, kernel, stride=1, groups=1):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def _reference_robust_block(x, p, s, stride):
  """RobustResBlock written out from METHOD §1, in eval mode."""
  width = p["split_conv0"]["kernel"].shape[-1]
  out_ch = p["conv3"]["kernel"].shape[-1]
  pre = jax.nn.relu(_bn(x, p["norm1"], s["norm1"]))
  shortcut = _conv(pre, p["shortcut"]["kernel"], stride) if "shortcut" in p else x
  h = jax.nn.relu(_bn(_conv(x, p["conv1"]["kernel"]), p["norm2"], s["norm2"]))
  splits = [h[..., i * width:(i + 1) * width] for i in range(8)]
  ys = []
  for i in range(7):
    inp = splits[i] if (i == 0 or stride > 1) else splits[i] + ys[-1]
    y = _conv(inp, p[f"split_conv{i}"]["kernel"], stride, groups=4)
    ys.append(jax.nn.relu(_bn(y, p[f"split_norm{i}"], s[f"split_norm{i}"])))
  last = splits[7]
  if stride > 1:
    padded = jnp.pad(last, ((0, 0), (1, 1), (1, 1), (0, 0)))
    last = jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1, 3, 3, 1), (1, stride, stride, 1),
                                 "VALID") / 9.0
  out = _conv(jnp.concatenate(ys + [last], -1), p["conv3"]["kernel"])
  z = _bn(out, p["se_norm"], s["se_norm"])
  gate = jax.nn.sigmoid(jax.nn.relu(z.mean((1, 2)) @ p["se"]["squeeze"]["kernel"])
                        @ p["se"]["excite"]["kernel"])
  assert out.shape[-1] == out_ch
  return out + shortcut + z * gate[:, None, None, :]


def _reference_basic_block(x, p, s, stride, act=jax.nn.relu):
  """Pre-activation basic block written out from METHOD §1, in eval mode."""
  pre = act(_bn(x, p["norm1"], s["norm1"]))
  shortcut = _conv(pre, p["shortcut"]["kernel"], stride) if "shortcut" in p else x
  h = act(_bn(_conv(pre, p["conv1"]["kernel"], stride), p["norm2"], s["norm2"]))
  return _conv(h, p["conv2"]["kernel"]) + shortcut


@pytest.mark.parametrize("block,reference", [(models.RobustBlock, _reference_robust_block),
                                              (models.BasicBlock, _reference_basic_block)])
@pytest.mark.parametrize("in_channels,channels,stride", [(64, 16, 1), (24, 16, 2), (32, 32, 1)])
def test_blocks_match_written_out_definition(block, reference, in_channels, channels, stride):
  norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)
  module = block(channels, stride, "relu", norm)
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, in_channels))
  variables = _randomise(module.init(jax.random.key(0), x), jax.random.key(2))
  ours = module.apply(variables, x)
  theirs = reference(x, variables["params"], variables["batch_stats"], stride)
  assert ours.shape == theirs.shape == (2, 8 // stride, 8 // stride, theirs.shape[-1])
  np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4)


def test_robust_block_has_projection_only_when_shape_changes():
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  x = jnp.zeros((1, 8, 8, 64))
  same = models.RobustBlock(16, 1, "relu", norm).init(jax.random.key(0), x)["params"]
  strided = models.RobustBlock(16, 2, "relu", norm).init(jax.random.key(0), x)["params"]
  assert "shortcut" not in same and "shortcut" in strided
  assert same["split_conv0"]["kernel"].shape == (3, 3, 1, 4)  # width 4, cardinality 4


def test_normalisation_happens_inside_the_model():
  spec = arch.TEACHERS["tiny-8"]
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  normalising = models.build(spec, 10, mean, std)
  plain = models.build(spec, 10)
  variables = models.init(normalising, jax.random.key(0), (16, 16, 3))
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))
  expected = plain.apply(variables, (x - jnp.array(mean)) / jnp.array(std))
  np.testing.assert_allclose(normalising.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_initialisation_follows_the_reference():
  spec = arch.wide_resnet(16, 8)
  variables = models.init(models.build(spec, 10), jax.random.key(0), (32, 32, 3))
  kernel = variables["params"]["stage2_block1"]["conv2"]["kernel"]  # 3x3, 512 -> 512
  assert abs(float(jnp.std(kernel)) - np.sqrt(2 / (9 * 512))) / np.sqrt(2 / (9 * 512)) < 0.01
  assert abs(float(jnp.mean(kernel))) < 1e-3
  bn = variables["params"]["stage1_block0"]["norm1"]
  assert np.all(bn["scale"] == 1) and np.all(bn["bias"] == 0)
  assert np.all(variables["params"]["head"]["bias"] == 0)
  bound = 1 / np.sqrt(512)
  assert float(jnp.max(jnp.abs(variables["params"]["head"]["kernel"]))) <= bound


@pytest.mark.parametrize("spec, masked, dtype", [
    (arch.wide_resnet(16, 8), False, "float32"),
    (arch.NetworkSpec(stages=(arch.StageSpec(2, 64, 1, "robust"),
                              arch.StageSpec(1, 128, 2, "robust"))), True, "bfloat16")])
def test_host_initialisation_draws_what_init_draws(spec, masked, dtype):
  model = models.build(spec, 10, dtype=dtype, masked=masked)
  reference = models.init(model, jax.random.key(0), (32, 32, 3))
  host = models.host_init(model, (32, 32, 3), seed=0)
  assert jax.tree.structure(host) == jax.tree.structure(reference)
  checked = 0
  for (path, r), h in zip(jax.tree.leaves_with_path(reference), jax.tree.leaves(host)):
    assert (h.shape, h.dtype) == (r.shape, r.dtype), path
    r = np.asarray(r)
    if np.all(r == r.flat[0]):  # BN at identity, zero biases, masks of ones: exactly.
      np.testing.assert_array_equal(h, r)
    else:  # Kernels: the same law (mean 0, the same spread and bound), other values.
      assert np.max(np.abs(h)) <= np.max(np.abs(r)) * 1.6, path
      if r.size >= 4096:
        assert abs(h.std() / r.std() - 1) < 0.05, path
        checked += 1
  assert checked >= 5
  again = models.host_init(model, (32, 32, 3), seed=0)
  other = models.host_init(model, (32, 32, 3), seed=1)
  kernel = lambda v: v["params"]["stem"]["kernel"]
  np.testing.assert_array_equal(kernel(again), kernel(host))
  assert not np.allclose(kernel(other), kernel(host))


def test_train_mode_updates_statistics_and_eval_mode_does_not():
  model = models.build(arch.TEACHERS["tiny-8"], 10)
  variables = models.init(model, jax.random.key(0), (16, 16, 3))
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = variables["batch_stats"]["head_norm"]["mean"]
  after = updated["batch_stats"]["head_norm"]["mean"]
  assert float(jnp.max(jnp.abs(after - before))) > 1e-4
  eval_logits = models.logits_fn(model, variables)(x)
  np.testing.assert_allclose(eval_logits, model.apply(variables, x), rtol=0, atol=0)
  # Eval mode is per-example: a batch of one gives the same logits.
  np.testing.assert_allclose(models.logits_fn(model, variables)(x[:1]), eval_logits[:1],
                             rtol=1e-5, atol=1e-5)


# The activations in closed form; flax's gelu is the tanh approximation (as PyTorch's
# approximate='tanh').
CLOSED_FORMS = {
    "relu": lambda x: jnp.maximum(x, 0.0),
    "silu": lambda x: x / (1.0 + jnp.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1.0 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "softplus": lambda x: jnp.log1p(jnp.exp(x)),
}


@pytest.mark.parametrize("activation", arch.ACTIVATIONS)
def test_every_activation_is_the_named_function(activation):
  spec = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1),), activation=activation)
  model = models.build(spec, 3)
  variables = _randomise(models.init(model, jax.random.key(0), (8, 8, 1)), jax.random.key(2))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  p, s, act = variables["params"], variables["batch_stats"], CLOSED_FORMS[activation]
  h = _reference_basic_block(_conv(x, p["stem"]["kernel"]), p["stage0_block0"],
                             s["stage0_block0"], 1, act)
  pooled = act(_bn(h, p["head_norm"], s["head_norm"])).mean((1, 2))
  expected = pooled @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [arch.TEACHERS["tiny-8"], arch.NetworkSpec(
    stages=(arch.StageSpec(1, 16, 1, "robust"), arch.StageSpec(1, 32, 2, "robust")))])
def test_bfloat16_compute_keeps_float32_weights_and_statistics(spec):
  full = models.build(spec, 10, (0.3,), (0.4,))
  mixed = models.build(spec, 10, (0.3,), (0.4,), dtype="bfloat16")
  variables = _randomise(models.init(full, jax.random.key(0), (8, 8, 1)), jax.random.key(1))
  assert jax.tree.structure(models.init(mixed, jax.random.key(0), (8, 8, 1))) == (
      jax.tree.structure(variables))
  assert {x.dtype for x in jax.tree.leaves(models.init(mixed, jax.random.key(0), (8, 8, 1)))} == {
      jnp.dtype(jnp.float32)}
  images = jax.random.uniform(jax.random.key(2), (32, 8, 8, 1))
  reference = full.apply(variables, images)
  logits = mixed.apply(variables, images)
  assert logits.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits: logits agree to a few percent of their scale.
  scale = float(jnp.max(jnp.abs(reference)))
  assert 0 < float(jnp.max(jnp.abs(logits - reference))) < 0.05 * scale
  _, updated = mixed.apply(variables, images, train=True, mutable=["batch_stats"])
  _, updated_full = full.apply(variables, images, train=True, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(updated), jax.tree.leaves(updated_full)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)
