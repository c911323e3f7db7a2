"""Cross-checks against torchattacks 3.5.1, at AutoAttack's standard settings.

Runs only where torch and torchattacks are importable (`make test` installs them); installs
nothing. A ResNet of the repo with a robust (RobustResBlock) stage, trained for a few steps on
the digits, is exported to PyTorch (`torch_export`), and both implementations attack the same
held-out digits: APGD-CE (100 steps), APGD-T (9 targets x 100), FAB-T (9 targets x 100) and
Square (5,000 queries, the unrescaled schedule), each on every image, then AutoAttack's
standard version (their point-wise worst case, as `evaluate` composes it).

torchattacks' own `AutoAttack(version='standard')` is not the reference's standard version (see
`robust/torch_reference.py`: 10 steps, rescaled Square). Its number is printed and checked as an
upper bound only; the reference composition is built from torchattacks' attacks at the
reference settings.
"""

import functools

import jax
import numpy as np
import pytest

import helpers
from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import arch, models, torch_export
from rcnas_jax.robust import attacks, evaluate, torch_reference
from rcnas_jax.runtime import parallel

torch = pytest.importorskip("torch")
torchattacks = pytest.importorskip("torchattacks")
pytestmark = pytest.mark.reference

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2, "robust")))
EPS = 0.08
EXAMPLES = 200


def train_digits_network(spec=SPEC, steps: int = 80):
  """`spec` after `steps` Adam steps on the digits: (model, variables, digits)."""
  digits = data.load("digits")
  model = models.build(spec, 10, digits.info.mean, digits.info.std)
  variables = models.init(model, jax.random.key(0), digits.info.image_shape)
  return model, helpers.fit(model, variables, digits.train, steps), digits


@pytest.fixture(scope="module")
def network():
  """(model, variables, its PyTorch twin, EXAMPLES held-out digits as uint8, labels)."""
  torch.set_num_threads(1)
  model, variables, digits = train_digits_network()
  images = np.concatenate([digits.validation.images, digits.test.images])[:EXAMPLES]
  labels = np.concatenate([digits.validation.labels, digits.test.labels])[:EXAMPLES]
  twin = torch_export.convert(SPEC, variables, digits.info.mean, digits.info.std)
  return model, variables, twin, images, labels


def _within_one_point(ours: float, theirs: float) -> bool:
  return round(abs(ours - theirs), 6) <= 0.01


# Square is a random search: on this network and these 200 digits its robust accuracy over four
# keys was 25.0-29.0% (ours) and 26.0-28.5% over three seeds (torchattacks), so one run of each
# can differ by two points or more without any difference between the implementations.
SQUARE_SEED_SPREAD = 0.04


@pytest.fixture(scope="module")
def standard(network):
  """Robust accuracies (and seconds) of every attack and of AutoAttack, ours and torchattacks'."""
  model, variables, twin, images, labels = network
  floats = images.astype(np.float32) / 255
  threats = {name: evaluate.settings_for(name, _standard_config())
             for name in torch_reference.STANDARD}
  ours = evaluate.evaluate(model, variables, data.Split(images, labels),
                           (attacks.ThreatModel("clean"),) + tuple(threats.values()),
                           jax.random.key(0), parallel.data_mesh(), batch_size=EXAMPLES,
                           unroll=False, composites={"autoattack": tuple(threats.values())})
  theirs = torch_reference.autoattack(twin, floats, labels, EPS)
  print(f"\nStandard settings, L-inf eps={EPS}, {len(labels)} held-out digits, clean "
        f"{100 * ours['clean']['accuracy']:.2f}% (torch {100 * theirs.pop('clean')[0]:.2f}%):")
  for name, (accuracy, seconds) in theirs.items():
    mine = ours.get(name)
    line = f"  {name}: torchattacks {100 * accuracy:.2f}% ({seconds:.1f} s)"
    if mine:
      line += f", ours {100 * mine['accuracy']:.2f}% ({mine['seconds']:.1f} s)"
    print(line)
  return ours, theirs


def _standard_config():
  """config.evaluation at its defaults (AutoAttack's standard settings), at EPS."""
  e = config_lib.base_config().evaluation
  e.eps = EPS
  return e


def test_standard_attacks_match_torchattacks(standard):
  """Within a point, Square within its seed-to-seed spread; AutoAttack no weaker than theirs."""
  # One test, not one per attack: each xdist worker would compute the costly fixture again.
  ours, theirs = standard
  clean = ours["clean"]["accuracy"]
  for name in torch_reference.STANDARD + ("autoattack",):
    assert 0.1 < theirs[name][0] < clean - 0.2, f"{name}: needs a non-trivial accuracy"
    tolerance = SQUARE_SEED_SPREAD if name == "square" else 0.01
    assert round(abs(ours[name]["accuracy"] - theirs[name][0]), 6) <= tolerance, (
        name, ours[name], theirs[name])
  assert ours["autoattack"]["standard"] and ours["autoattack"]["attack"].startswith(
      "AutoAttack (standard version)")
  # torchattacks' AutoAttack (10 steps, rescaled Square) is no stronger than the standard one,
  # and on this network still within a point of it.
  shipped = theirs["torchattacks.AutoAttack"][0]
  assert ours["autoattack"]["accuracy"] <= shipped + 1e-6
  assert _within_one_point(ours["autoattack"]["accuracy"], shipped)


@pytest.mark.parametrize("name", ["fab-t", "square"])
def test_l2_fab_and_square_match_torchattacks(network, name):
  model, variables, twin, images, labels = network
  floats = images.astype(np.float32) / 255
  eps, logits_fn = 0.5, models.logits_fn(model, variables)
  threat = attacks.ThreatModel(name, eps=eps, num_steps=100 if name == "fab-t" else 5000,
                               norm="l2")
  adversarial = jax.jit(lambda x, y, k: attacks.run(threat, logits_fn, x, y, k, False))(
      floats, labels, jax.random.key(0))
  ours = float(np.mean(np.argmax(logits_fn(adversarial), 1) == labels))
  flags, _ = torch_reference.correct(twin, torch_reference.attack(name, twin, eps, "l2"), floats,
                                     labels, eps, "l2")
  theirs = float(np.mean(flags))
  print(f"\nL2 {threat.describe()}: ours {100 * ours:.2f}%, torchattacks {100 * theirs:.2f}%")
  norms = np.linalg.norm((np.asarray(adversarial) - floats).reshape(len(labels), -1), axis=1)
  assert np.all(norms <= eps + 1e-5)
  assert 0.05 < theirs < 0.8 and _within_one_point(ours, theirs)


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
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights + bias
  for ours_attack, their_attack in [
      (attacks.apgd_targeted, torchattacks.APGDT(twin, eps=eps, steps=50, n_classes=classes)),
      (attacks.fab_targeted, torchattacks.FAB(twin, eps=eps, steps=100, multi_targeted=True,
                                              n_classes=classes))]:
    adversarial = jax.jit(functools.partial(ours_attack, logits_fn, eps=eps))(
        images, labels, jax.random.key(0))
    ours = float(np.mean(np.argmax(logits_fn(adversarial), 1) == labels))
    # torchattacks flattens NCHW; with one channel it equals our NHWC flattening.
    theirs = float(np.mean(torch_reference.correct(twin, their_attack, images, labels, eps)[0]))
    assert abs(ours - exact) <= 0.01 and abs(theirs - exact) <= 0.01, (ours, theirs, exact)
