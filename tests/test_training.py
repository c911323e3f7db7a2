"""Adversarial training: losses, schedules, augmentation, data parallelism and exact resume."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import arch, models
from rcnas_jax.robust import attacks, training
from rcnas_jax.runtime import metrics, parallel, preemption

SPEC = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1), arch.StageSpec(1, 16, 2)))


def _tiny_config(**training):
  c = config_lib.base_config()
  c.dataset.name = "digits"
  c.training.epochs = 2
  c.training.batch_size = 16
  c.training.learning_rate = 0.05
  c.training.log_every_steps = 1
  c.attack.eps, c.attack.step_size, c.attack.num_steps = 0.1, 0.05, 2
  c.training.update(training)
  return c


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", max_train_examples=64)


def _batch(digits, n=16):
  return jnp.asarray(digits.train.images[:n]), jnp.asarray(digits.train.labels[:n])


def test_trades_loss_decomposes(digits):
  model = models.build(SPEC, 10)
  variables = models.init(model, jax.random.key(0), (8, 8, 1))
  images, labels = _batch(digits)
  clean = images.astype(jnp.float32) / 255
  adversarial = jnp.clip(clean + 0.05, 0, 1)
  loss = lambda s, x_adv: training._loss(variables["params"], variables["batch_stats"], clean,
                                         x_adv, labels, None, model=model, settings=s)[0]
  # At adversarial == clean the KL term vanishes and TRADES is clean cross-entropy.
  logits = model.apply(variables, clean, train=True, mutable=["batch_stats"])[0]
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  np.testing.assert_allclose(loss(training.TrainSettings(method="trades"), clean), ce, rtol=1e-5)
  with_kl = loss(training.TrainSettings(method="trades", trades_beta=6.0), adversarial)
  no_kl = loss(training.TrainSettings(method="trades", trades_beta=0.0), adversarial)
  assert float(with_kl) > float(no_kl) + 1e-4
  np.testing.assert_allclose(no_kl, ce, rtol=1e-5)


def test_distillation_from_itself_only_rescales_the_loss(digits):
  model = models.build(SPEC, 10)
  variables = models.init(model, jax.random.key(0), (8, 8, 1))
  images, labels = _batch(digits)
  x = images.astype(jnp.float32) / 255
  student_logits = model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  settings = lambda w: training.TrainSettings(method="pgd_at", distill_weight=w,
                                              distill_temperature=4.0)
  loss = lambda w: training._loss(variables["params"], variables["batch_stats"], x, x, labels,
                                  student_logits, model=model, settings=settings(w))[0]
  np.testing.assert_allclose(loss(0.25), 0.75 * loss(0.0), rtol=1e-5)


def test_schedules_hit_their_milestones():
  t = _tiny_config(epochs=10, learning_rate=0.1).training
  step = training.learning_rate_schedule(t, 100)
  assert [float(step(s)) for s in (0, 74, 75, 89, 90, 99)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  t.schedule, t.warmup_epochs = "cosine", 1.0
  cosine = training.learning_rate_schedule(t, 100)
  assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(0.1)
  assert float(cosine(55)) == pytest.approx(0.05, abs=1e-6) and float(cosine(100)) < 1e-6


def test_augmentation_crops_windows_of_the_padded_image_and_flips():
  images = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.uint8).reshape(2, 5, 5, 1)
  x = images.astype(jnp.float32) / 255
  np.testing.assert_array_equal(training.augment(images, jax.random.key(0), 0, False), x)
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for seed in range(5):
    out = np.asarray(training.augment(images, jax.random.key(seed), 2, True))
    for i in range(2):
      windows = [padded[i, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
      windows += [w[:, ::-1] for w in windows]
      assert any(np.array_equal(out[i], w) for w in windows)
  flips = [np.array_equal(np.asarray(training.augment(images, jax.random.key(s), 0, True))[0],
                          np.asarray(x)[0, :, ::-1]) for s in range(20)]
  assert 3 < sum(flips) < 17


def _run_steps(mesh, digits, num_steps, settings):
  """`num_steps` jitted train steps on the given mesh; returns the final state."""
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  tx = training.optimizer(_tiny_config().training, 100)
  state = parallel.replicate(mesh, training.create_state(model, tx, jax.random.key(0), (8, 8, 1)))
  step = training.make_train_step(model, tx, settings, mesh)
  for s in range(num_steps):
    images, labels = parallel.shard_batch(mesh, *data.batch_at(digits.train, 16, seed=0, step=s))
    state, _ = step(state, images, labels, jax.random.key(1), None)
  return state


def test_eight_devices_train_the_same_parameters_as_one(digits):
  assert jax.device_count() == 8
  settings = training.TrainSettings(
      method="trades", attack=attacks.ThreatModel("pgd", eps=0.1, step_size=0.05, num_steps=2),
      crop_padding=1, ema_decay=0.9)
  one = _run_steps(parallel.data_mesh(jax.devices()[:1]), digits, 3, settings)
  eight = _run_steps(parallel.data_mesh(), digits, 3, settings)
  assert eight["params"]["head"]["kernel"].sharding.device_set == set(jax.devices())
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  assert int(eight["step"]) == 3


def test_ema_tracks_the_weights(digits):
  settings = training.TrainSettings(method="standard", ema_decay=0.75)
  mesh = parallel.data_mesh(jax.devices()[:1])
  initial = _run_steps(mesh, digits, 0, settings)
  after = _run_steps(mesh, digits, 1, settings)
  expected = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, initial["params"], after["params"])
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(after["ema_params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_attack_inside_the_step_sees_eval_mode_bn(digits, monkeypatch):
  """The attack's logits must equal the model in eval mode on the same variables."""
  model = models.build(SPEC, 10)
  tx = training.optimizer(_tiny_config().training, 10)
  state = training.create_state(model, tx, jax.random.key(0), (8, 8, 1))
  state["batch_stats"] = jax.tree.map(lambda v: v + 0.3, state["batch_stats"])
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  gaps = []
  original = attacks.pgd

  def spy(logits_fn, images, labels, key, **kwargs):
    gap = jnp.max(jnp.abs(logits_fn(images) - model.apply(variables, images)))
    jax.debug.callback(lambda g: gaps.append(float(g)), gap)
    return original(logits_fn, images, labels, key, **kwargs)

  monkeypatch.setattr(attacks, "pgd", spy)
  images, labels = _batch(digits)
  step = jax.jit(functools.partial(training.train_step, model=model, tx=tx,
                                   settings=training.TrainSettings(
                                       method="pgd_at", attack=attacks.ThreatModel(
                                           "pgd", eps=8 / 255, step_size=2 / 255, num_steps=1))))
  jax.block_until_ready(step(state, images, labels, jax.random.key(1), None))
  assert len(gaps) == 1 and gaps[0] < 1e-5


def test_training_reduces_the_loss_on_real_digits(tmp_path):
  digits = data.load("digits", max_train_examples=256)
  c = _tiny_config(method="standard", epochs=4, learning_rate=0.1)
  mesh = parallel.data_mesh(jax.devices()[:2])
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  training.train(model, digits.train, (8, 8, 1), c, str(tmp_path), mesh, progress=False)
  records = metrics.read(tmp_path / "metrics.jsonl")
  first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-4:]])
  assert last < 0.5 * first


def test_resume_after_a_stop_is_bit_identical(tmp_path, digits):
  c = _tiny_config(method="trades", checkpoint_every_steps=3)
  c.dataset.crop_padding = 1
  mesh = parallel.data_mesh(jax.devices()[:2])
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  train = functools.partial(training.train, model, digits.train, (8, 8, 1), c, mesh=mesh,
                            progress=False)
  straight = train(str(tmp_path / "straight"))
  stopped = train(str(tmp_path / "resumed"), max_steps=5)
  assert int(stopped["step"]) == 5
  resumed = train(str(tmp_path / "resumed"))
  assert int(resumed["step"]) == int(straight["step"]) == 2 * 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_truncated_newest_checkpoint_falls_back_and_ends_bit_identical(tmp_path, digits,
                                                                          caplog):
  c = _tiny_config(method="standard", checkpoint_every_steps=3)
  mesh = parallel.data_mesh(jax.devices()[:2])
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  train = functools.partial(training.train, model, digits.train, (8, 8, 1), c, str(tmp_path),
                            mesh, progress=False)
  straight = train()
  newest = tmp_path / "checkpoints" / "8"
  data_file = max((p for p in newest.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)
  data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
  again = train()  # Warns, restores step 6, and trains steps 7 and 8 again.
  assert "checkpoint 8" in caplog.text and "falling back" in caplog.text
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_non_finite_loss_stops_at_its_step_and_is_never_checkpointed(tmp_path, digits):
  c = _tiny_config(method="standard", learning_rate=1e30, grad_clip=0.0, log_every_steps=3,
                   checkpoint_every_steps=1)
  mesh = parallel.data_mesh(jax.devices()[:1])
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  with pytest.raises(training.TrainingDiverged) as error:
    training.train(model, digits.train, (8, 8, 1), c, str(tmp_path), mesh, progress=False)
  # The same steps, taken one by one here: the first non-finite loss is the one reported.
  tx = training.optimizer(c.training, 8)
  state = training.create_state(model, tx, jax.random.split(jax.random.key(0))[0], (8, 8, 1))
  step = jax.jit(functools.partial(training.train_step, model=model, tx=tx,
                                   settings=training.settings_from_config(c)))
  first_bad = None
  for i in range(8):
    images, labels = data.batch_at(digits.train, 16, seed=0, step=i)
    state, step_metrics = step(state, images, labels, jax.random.split(jax.random.key(0))[1],
                               None)
    if not np.isfinite(float(step_metrics["loss"])):
      first_bad = i + 1
      break
  assert first_bad is not None
  assert str(error.value) == f"training diverged: non-finite loss at step {first_bad}"
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert all(s < first_bad for s in saved)  # No checkpoint holds the diverged state.


def test_sigterm_saves_a_checkpoint_stops_and_resumes_bit_identically(tmp_path, digits,
                                                                    monkeypatch):
  c = _tiny_config(method="standard", checkpoint_every_steps=100)
  mesh = parallel.data_mesh(jax.devices()[:2])
  model = models.build(SPEC, 10, digits.info.mean, digits.info.std)
  train = lambda d: training.train(model, digits.train, (8, 8, 1), c, str(d), mesh,
                                   progress=False)
  straight = train(tmp_path / "straight")
  polls = []
  monkeypatch.setattr(preemption, "requested", lambda: polls.append(1) or len(polls) > 6)
  monkeypatch.setattr(preemption, "check", lambda where: (_ for _ in ()).throw(
      preemption.Stopped(where)) if preemption.requested() else None)
  with pytest.raises(preemption.Stopped, match=r"training at step \d of 8"):
    train(tmp_path / "stopped")
  monkeypatch.undo()
  saved = [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 0 < int(saved[0]) < 8  # Saved where the request arrived.
  resumed = train(tmp_path / "stopped")
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_metrics_are_written_as_jsonl_and_tensorboard_events(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(3, {"loss": 0.5, "note": "text is JSON only"})
  writer.write(4, {"loss": 0.25})
  writer.close()
  records = metrics.read(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(3, 0.5), (4, 0.25)]
  scalars = []
  for path in (tmp_path / "tensorboard").iterdir():
    scalars += [(e.step, v.tag, v.simple_value)
                for e in _read_events(path) for v in e.summary.value]
  assert sorted(scalars) == [(3, "loss", 0.5), (4, "loss", 0.25)]


def _read_events(path):
  """Event protos of a TensorBoard file (TFRecord framing: length, crc, data, crc)."""
  import struct  # noqa: PLC0415

  from tensorboardX.proto import event_pb2  # noqa: PLC0415
  raw, events, offset = path.read_bytes(), [], 0
  while offset < len(raw):
    (length,) = struct.unpack("<Q", raw[offset:offset + 8])
    events.append(event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return events


def test_a_bfloat16_step_keeps_float32_state_and_follows_the_float32_step(digits):
  mesh = parallel.data_mesh(jax.devices()[:2])
  # Clean training: the sign steps of an attack would turn rounding into different examples.
  settings = training.TrainSettings(method="standard")
  tx = training.optimizer(_tiny_config().training, 100)
  images, labels = parallel.shard_batch(mesh, *data.batch_at(digits.train, 16, seed=0, step=0))
  states = {}
  for dtype in ("float32", "bfloat16"):
    model = models.build(SPEC, 10, digits.info.mean, digits.info.std, dtype)
    state = parallel.replicate(mesh, training.create_state(model, tx, jax.random.key(0),
                                                           (8, 8, 1)))
    step = training.make_train_step(model, tx, settings, mesh)
    states[dtype], step_metrics = step(state, images, labels, jax.random.key(1), None)
    assert np.isfinite(float(step_metrics["loss"]))
  assert {x.dtype for x in jax.tree.leaves(states["bfloat16"]) if x.ndim} == {
      jnp.dtype(jnp.float32)}
  initial = parallel.to_host(training.create_state(
      models.build(SPEC, 10, digits.info.mean, digits.info.std), tx, jax.random.key(0),
      (8, 8, 1))["params"])
  update = lambda dtype: np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(parallel.to_host(states[dtype]["params"])), jax.tree.leaves(initial))])
  full, mixed = update("float32"), update("bfloat16")
  # bfloat16 keeps 8 significant bits: the update points the same way, with ~10% noise
  # (measured 0.102 of its norm on this batch).
  cosine = full @ mixed / np.linalg.norm(full) / np.linalg.norm(mixed)
  assert np.linalg.norm(full) > 0 and cosine > 0.99
  assert np.linalg.norm(full - mixed) < 0.2 * np.linalg.norm(full)
