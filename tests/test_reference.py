"""Cross-checks against torchattacks 3.5.1 (AutoAttack's reference algorithms in PyTorch).

Runs only where torch and torchattacks are importable (`make test` installs them); installs
nothing. A ResNet of the repo trained for a few steps on the digits is converted to PyTorch
(`torch_export`), and both implementations attack the same test digits.
"""

import functools
import time

import jax
import numpy as np
import pytest

import helpers
from rcnas_jax import data
from rcnas_jax.nets import arch, models, torch_export
from rcnas_jax.robust import attacks

torch = pytest.importorskip("torch")
torchattacks = pytest.importorskip("torchattacks")
pytestmark = pytest.mark.reference

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2)))
EPS = 0.08


def train_digits_network(steps: int = 80):
  """The SPEC network after `steps` Adam steps on the digits: (model, variables, info)."""
  digits = data.load("digits")
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  variables = models.init(model, jax.random.key(0), digits.info.image_shape)
  return model, helpers.fit(model, variables, digits.train, steps), digits


@pytest.fixture(scope="module")
def setup():
  model, variables, digits = train_digits_network()
  # Every digit the network never trained on: validation and test, 503 images.
  images = np.concatenate([digits.validation.images, digits.test.images]).astype(np.float32) / 255
  labels = np.concatenate([digits.validation.labels, digits.test.labels])
  twin = torch_export.convert(SPEC, variables, digits.info.mean, digits.info.std)
  return models.logits_fn(model, variables), twin, images, labels


def _ours(logits_fn, attack, images, labels, eps=EPS, **kwargs):
  started = time.perf_counter()
  adversarial = jax.jit(functools.partial(attack, logits_fn, eps=eps, **kwargs))(
      images, labels, jax.random.key(0))
  print(f" ours {time.perf_counter() - started:.1f} s", end="")
  return float(np.mean(np.argmax(logits_fn(adversarial), 1) == labels))


def _theirs(twin, attack, images, labels, eps=EPS):
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels.astype(np.int64))
  started = time.perf_counter()
  adversarial = attack(x, y).detach()
  print(f" torchattacks {time.perf_counter() - started:.1f} s", end="")
  assert float((adversarial - x).abs().max()) <= eps + 1e-6
  with torch.no_grad():
    return float((twin(adversarial).argmax(1) == y).float().mean())


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "square"])
def test_robust_accuracy_matches_torchattacks(setup, name):
  logits_fn, twin, images, labels = setup
  clean = float(np.mean(np.argmax(logits_fn(images), 1) == labels))
  started = time.perf_counter()
  if name == "apgd-ce":
    ours = _ours(logits_fn, attacks.apgd, images, labels, num_steps=50)
    theirs = _theirs(twin, torchattacks.APGD(twin, eps=EPS, steps=50, loss="ce"), images, labels)
  elif name == "apgd-t":
    ours = _ours(logits_fn, attacks.apgd_targeted, images, labels, num_steps=50, num_targets=9)
    theirs = _theirs(twin, torchattacks.APGDT(twin, eps=EPS, steps=50, n_classes=10), images,
                     labels)
  else:
    ours = _ours(logits_fn, attacks.square, images, labels, num_queries=1000)
    theirs = _theirs(twin, torchattacks.Square(twin, eps=EPS, n_queries=1000), images, labels)
  print(f"\n{name}: clean {100 * clean:.2f}%, ours {100 * ours:.2f}%, torchattacks "
        f"{100 * theirs:.2f}% on {len(labels)} held-out digits, eps {EPS} "
        f"({time.perf_counter() - started:.1f} s)")
  assert 0.2 < theirs < clean - 0.2, "the comparison needs a non-trivial robust accuracy"
  assert abs(ours - theirs) <= 0.01


def test_apgd_targeted_and_torchattacks_match_the_exact_linear_robust_accuracy():
  rng = np.random.default_rng(0)
  dim, classes, n, eps = 36, 4, 400, 0.05
  weights = rng.normal(size=(dim, classes)).astype(np.float32) * 0.2
  bias = rng.normal(size=classes).astype(np.float32) * 0.1
  # Points in [0.25, 0.75]: the [0, 1] box never binds, so the closed form is exact.
  images = rng.uniform(0.25, 0.75, size=(n, 6, 6, 1)).astype(np.float32)
  logits = images.reshape(n, dim) @ weights + bias
  labels = np.argmax(logits, 1)
  gaps = logits[np.arange(n), labels][:, None] - logits
  norms = np.abs(weights[:, labels].T[:, :, None] - weights[None]).sum(1)
  exact = float(np.mean(np.all((gaps > eps * norms) | (np.arange(classes) == labels[:, None]),
                               axis=1)))
  assert 0.2 < exact < 0.8
  linear = torch.nn.Linear(dim, classes)
  linear.weight.data, linear.bias.data = torch.from_numpy(weights.T.copy()), torch.from_numpy(bias)
  twin = torch.nn.Sequential(torch.nn.Flatten(), linear).eval()
  ours = _ours(lambda x: x.reshape(x.shape[0], -1) @ weights + bias, attacks.apgd_targeted,
               images, labels, eps=eps, num_steps=50)
  # torchattacks flattens NCHW; with one channel it equals our NHWC flattening.
  theirs = _theirs(twin, torchattacks.APGDT(twin, eps=eps, steps=50, n_classes=classes), images,
                   labels, eps=eps)
  assert abs(ours - exact) <= 0.005 and abs(theirs - exact) <= 0.005
