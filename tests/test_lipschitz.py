"""Lipschitz estimates against exact SVDs of full Jacobians and of dense conv matrices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipschitz_bound
from rcnas_jax.nets import arch, models
from rcnas_jax.robust import lipschitz

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(depth=1, channels=8, stride=1),
                                arch.StageSpec(1, 16, 2)))


def _exact_sigma(logits_fn, images):
  """Top singular value of each example's full input Jacobian, by SVD."""
  single = lambda x: logits_fn(x[None])[0]
  out = []
  for x in images:
    jac = np.asarray(jax.jacobian(single)(x), np.float64).reshape(-1, x.size)
    out.append(np.linalg.svd(jac, compute_uv=False)[0])
  return np.array(out)


def _randomise_bn(variables, key):
  """BN scales, biases and running statistics drawn at random (variances positive)."""
  def leaf(path, x, k):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return jax.random.uniform(k, x.shape, minval=0.3, maxval=2.0)
    if "scale" in name:
      return jax.random.uniform(k, x.shape, minval=-1.5, maxval=1.5)
    if "mean" in name or ("bias" in name and "norm" in name):
      return 0.2 * jax.random.normal(k, x.shape)
    return x
  leaves, treedef = jax.tree.flatten_with_path(variables)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [leaf(p, x, k) for (p, x), k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def resnet():
  """A tiny ResNet on 6x6x1 images with random BN statistics, and its exact sigmas."""
  model = models.build(SPEC, num_classes=5, mean=(0.5,), std=(0.25,))
  variables = _randomise_bn(models.init(model, jax.random.key(0), (6, 6, 1)), jax.random.key(1))
  logits_fn = models.logits_fn(model, variables)
  images = jax.random.uniform(jax.random.key(2), (4, 6, 6, 1))
  return model, variables, logits_fn, images, _exact_sigma(logits_fn, images)


@pytest.fixture(scope="module")
def mlp():
  """A two-layer tanh MLP on 8x8x3 images with 10 logits, and its exact sigmas."""
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  w1 = jax.random.normal(k1, (192, 32)) / np.sqrt(192)
  w2 = jax.random.normal(k2, (32, 10)) / np.sqrt(32)
  logits_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + 0.1) @ w2
  images = jax.random.uniform(k3, (4, 8, 8, 3))
  return logits_fn, images, _exact_sigma(logits_fn, images)


@pytest.mark.parametrize("net", ["resnet", "mlp"])
def test_matches_exact_svd(net, request):
  logits_fn, images, exact = request.getfixturevalue(net)[-3:]
  # 20 iterations: the MLP has an example with close top singular values (measured up to 5%).
  for num_iters, tolerance in [(100, 0.01), (20, 0.06)]:
    sigma = lipschitz.jacobian_spectral_norm(logits_fn, images, jax.random.key(4), num_iters)
    assert sigma.shape == (len(images),)
    assert np.max(np.abs(np.asarray(sigma) / exact - 1)) < tolerance, (num_iters, sigma, exact)
    assert np.all(np.asarray(sigma) <= exact * (1 + 1e-4))  # Power iteration approaches from below.


def test_warm_start_continues_the_iteration(mlp):
  logits_fn, images, exact = mlp
  start = jax.random.normal(jax.random.key(5), images.shape)
  sigma1, vectors1 = lipschitz.power_iteration(logits_fn, images, start, 1)
  sigma50, vectors50 = lipschitz.power_iteration(logits_fn, images, start, 50)
  sigma_more, vectors_more = lipschitz.power_iteration(logits_fn, images, vectors50, 50)
  sigma100, vectors100 = lipschitz.power_iteration(logits_fn, images, start, 100)
  np.testing.assert_allclose(sigma_more, sigma100, rtol=1e-5)
  np.testing.assert_allclose(jnp.abs(jnp.sum(vectors_more * vectors100, axis=(1, 2, 3))), 1.0,
                             atol=1e-4)
  norms = jnp.sqrt(jnp.sum(vectors50 ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  assert np.all(sigma1 <= sigma50 * (1 + 1e-5)) and np.all(sigma50 <= sigma100 * (1 + 1e-5))
  np.testing.assert_allclose(sigma100, exact, rtol=1e-3)


def test_linear_model_gives_top_singular_value_of_weights():
  weights = jax.random.normal(jax.random.key(6), (36, 4))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights
  images = jax.random.uniform(jax.random.key(7), (5, 6, 6, 1))
  sigma = lipschitz.jacobian_spectral_norm(logits_fn, images, jax.random.key(8), 100)
  top = np.linalg.svd(np.asarray(weights, np.float64), compute_uv=False)[0]
  np.testing.assert_allclose(sigma, np.full(5, top), rtol=1e-4)


def test_zero_jacobian_gives_zero_without_nan():
  images = jax.random.uniform(jax.random.key(9), (3, 4, 4, 2))
  for logits_fn in [lambda x: jnp.zeros((x.shape[0], 3)), lambda x: 0.0 * x[:, 0, 0, :]]:
    sigma = lipschitz.jacobian_spectral_norm(logits_fn, images, jax.random.key(10), 5)
    np.testing.assert_array_equal(sigma, np.zeros(3))
  # A zero start vector is replaced by a unit one; the returned vectors stay finite.
  weights = jnp.arange(32.0).reshape(32, 1)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights
  sigma, vectors = lipschitz.power_iteration(logits_fn, images, jnp.zeros_like(images), 3)
  np.testing.assert_allclose(sigma, np.linalg.norm(np.arange(32.0)), rtol=1e-5)
  assert np.all(np.isfinite(vectors))


def test_works_under_jit(resnet):
  logits_fn, images, exact = resnet[-3:]
  run = jax.jit(functools.partial(lipschitz.jacobian_spectral_norm, logits_fn, num_iters=30))
  sigma = run(images, jax.random.key(11))
  np.testing.assert_allclose(sigma, exact, rtol=1e-2)
  warm = jax.jit(lambda x, v: lipschitz.power_iteration(logits_fn, x, v, 10))
  sigma, vectors = warm(images, jax.random.normal(jax.random.key(12), images.shape))
  assert sigma.shape == (4,) and vectors.shape == images.shape


class _OneConv(nn.Module):
  """A single biased conv, so the layer bound is that conv's operator norm."""

  stride: int
  groups: int
  padding: object

  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3), strides=self.stride, padding=self.padding,
                   feature_group_count=self.groups, name="conv")(x)


def _exact_operator_norm(fn, input_shape):
  """Top singular value of the dense matrix of the linear map fn - fn(0) on input_shape."""
  x = jax.random.normal(jax.random.key(13), input_shape)
  jac = np.asarray(jax.jacobian(fn)(x), np.float64).reshape(-1, int(np.prod(input_shape)))
  return np.linalg.svd(jac, compute_uv=False)[0]


@pytest.mark.parametrize("stride,groups,padding", [
    (1, 1, "SAME"), (2, 1, ((1, 1), (1, 1))), (2, 2, "VALID")])
def test_single_conv_bound_is_its_operator_norm(stride, groups, padding):
  model = _OneConv(stride, groups, padding)
  shape = (1, 7, 7, 2)
  variables = model.init(jax.random.key(14), jnp.zeros(shape))
  exact = _exact_operator_norm(lambda x: model.apply(variables, x), shape)
  bound = lipschitz_bound.layer_lipschitz_bound(model, variables, shape[1:], jax.random.key(15),
                                               100)
  assert list(bound["layers"]) == ["conv"] and bound["residual"] is None
  assert abs(bound["product"] / exact - 1) < 0.01, (bound, exact)
  # The kernel-matrix norm is a different number: the operator's own map matters.
  kernel = np.asarray(variables["params"]["conv"]["kernel"]).reshape(-1, 4)
  assert abs(np.linalg.svd(kernel, compute_uv=False)[0] / exact - 1) > 0.02


def test_network_bound_covers_every_layer_and_bounds_the_jacobian(resnet):
  model, variables, logits_fn, images, exact = resnet
  bound = lipschitz_bound.layer_lipschitz_bound(model, variables, (6, 6, 1), jax.random.key(16),
                                               100)
  norms = bound["layers"]
  convs = ["stem"] + [f"stage{i}_block0/{c}" for i in (0, 1)
                      for c in ("shortcut", "conv1", "conv2")]
  bns = [f"stage{i}_block0/norm{j}" for i in (0, 1) for j in (1, 2)] + ["head_norm"]
  assert sorted(norms) == sorted(convs + bns + ["head", "input_normalisation"])
  np.testing.assert_allclose(norms["input_normalisation"], 4.0)
  # BN factor in closed form; a stride-2 conv on its real (1, 6, 6, 8) input; the dense head.
  p, s = variables["params"]["head_norm"], variables["batch_stats"]["head_norm"]
  np.testing.assert_allclose(norms["head_norm"],
                             np.max(np.abs(p["scale"] / np.sqrt(s["var"] + 1e-5))), rtol=1e-5)
  kernel = variables["params"]["stage1_block0"]["conv1"]["kernel"]
  conv = lambda x: jax.lax.conv_general_dilated(x, kernel, (2, 2), [(1, 1)] * 2,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(norms["stage1_block0/conv1"],
                             _exact_operator_norm(conv, (1, 6, 6, 8)), rtol=0.01)
  head = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  np.testing.assert_allclose(norms["head"], np.linalg.svd(head, compute_uv=False)[0], rtol=1e-3)
  np.testing.assert_allclose(bound["product"], np.prod(list(norms.values())), rtol=1e-6)
  assert bound["residual"] >= exact.max() and bound["product"] >= exact.max()
