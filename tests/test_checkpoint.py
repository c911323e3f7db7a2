"""Orbax checkpoints: exact round trip, concurrent saves, damaged and full-disk checkpoints."""

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from orbax.checkpoint._src.multihost import multihost

from rcnas_jax import data
from rcnas_jax.nets import arch, models
from rcnas_jax.robust import training
from rcnas_jax.runtime import checkpoint, parallel


def test_round_trip_is_bit_identical_and_latest_wins(tmp_path):
  tree = {"w": jax.random.normal(jax.random.key(0), (3, 4)), "step": jnp.int32(7),
          "nested": {"b": jnp.arange(5, dtype=jnp.bfloat16)}}
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  assert checkpoint.restore_latest(mngr, tree) is None
  for step in (1, 2, 3):
    checkpoint.save(mngr, step, jax.tree.map(lambda x: x + step, tree))
  checkpoint.wait(mngr)
  assert mngr.all_steps() == [2, 3]
  restored = checkpoint.restore_latest(mngr, tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.tree.map(lambda x: x + 3, tree))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(checkpoint.restore_latest(mngr, tree, max_step=2)["w"][0, 0]) == float(
      tree["w"][0, 0] + 2)
  mngr.close()


@pytest.fixture
def short_orbax_timeout(monkeypatch):
  """A lost Orbax signal fails in 20 s instead of 300 s."""
  monkeypatch.setattr(multihost, "_DEFAULT_BARRIER_TIMEOUT", 20)


def test_managers_saving_from_threads_do_not_collide(tmp_path, short_orbax_timeout):
  # Without the process-wide save lock this fails in most runs within a second, with
  # FileExistsError, "Directory not empty" or a signal timeout (Orbax's global operation id).
  errors = []

  def saver(name: str) -> None:
    try:
      mngr = checkpoint.manager(str(tmp_path / name), keep=2)
      for step in range(1, 31):
        checkpoint.save(mngr, step, {"w": jnp.full((32, 32), step), "b": jnp.arange(4.0)})
      checkpoint.wait(mngr)
      assert mngr.all_steps() == [29, 30]
      mngr.close()
    except Exception as error:  # noqa: BLE001  (collected and asserted below)
      errors.append(f"{name}: {type(error).__name__}: {error}")

  threads = [threading.Thread(target=saver, args=(f"t{i}",)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []


def _training_config() -> ml_collections.ConfigDict:
  """Clean training, batches of 16, a checkpoint at every step."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.training = dict(method="standard", trades_beta=6.0, epochs=1, batch_size=16,
                    learning_rate=0.05, momentum=0.9, nesterov=False, weight_decay=0.0,
                    schedule="constant", decay_points=(), warmup_epochs=0.0, grad_clip=0.0,
                    ema_decay=0.0, distill_weight=0.0, distill_temperature=1.0,
                    log_every_steps=100, checkpoint_every_steps=1)
  c.attack = dict(eps=0.1, step_size=0.05, num_steps=1, norm="linf", loop="unrolled")
  c.dataset = dict(crop_padding=0, flip=False)
  return c


@pytest.mark.slow
def test_concurrent_trainings_on_two_slices_checkpoint_every_step(tmp_path, short_orbax_timeout):
  """Several trainings at once, one thread per candidate slice, a checkpoint at every step."""
  digits = data.load("digits")
  split = data.Split(digits.train.images[:192], digits.train.labels[:192])  # 12 steps of 16.
  spec = arch.NetworkSpec(stages=(arch.StageSpec(1, 8, 1),))
  model = models.build(spec, 10, digits.info.mean, digits.info.std)
  config = _training_config()
  slices = parallel.candidate_meshes(2, jax.devices()[:2])
  for attempt in range(2):
    jobs = [lambda mesh, i=i: training.train(model, split, (8, 8, 1), config,
                                              str(tmp_path / f"{attempt}-{i}"), mesh,
                                              progress=False)
            for i in range(4)]
    states = parallel.on_slices(slices, jobs)
    for i, state in enumerate(states):
      assert int(state["step"]) == 12
      steps = sorted(int(os.path.basename(p)) for p in glob.glob(
          str(tmp_path / f"{attempt}-{i}" / "checkpoints" / "[0-9]*")))
      assert steps == [11, 12]
    for a, b in zip(jax.tree.leaves(states[0]["params"]), jax.tree.leaves(states[3]["params"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Same run, same result.


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  tree = {"w": jnp.arange(1000.0).reshape(10, 100)}
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  for step in (1, 2):
    checkpoint.save(mngr, step, jax.tree.map(lambda x: x + step, tree))
  checkpoint.wait(mngr)
  mngr.close()
  data_files = [p for p in glob.glob(str(tmp_path / "2" / "**" / "d" / "*"), recursive=True)
                if os.path.isfile(p)]
  largest = max(data_files, key=os.path.getsize)
  with open(largest, "r+b") as f:  # Cut short, as a kill or a full disk leaves it.
    f.truncate(os.path.getsize(largest) // 2)
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  restored = checkpoint.restore_latest(mngr, tree)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"] + 1))
  assert "checkpoint 2" in caplog.text and "falling back to the previous one" in caplog.text
  assert mngr.all_steps() == [1]  # The damaged one is gone, so step 2 can be written again.
  checkpoint.save(mngr, 2, jax.tree.map(lambda x: x + 2, tree))
  checkpoint.wait(mngr)
  assert mngr.all_steps() == [1, 2]


FULL_DISK_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from rcnas_jax.runtime import checkpoint
    root = sys.argv[1]
    mngr = checkpoint.manager(os.path.join(root, "checkpoints"))
    tree = {"w": jnp.arange(20_000.0)}
    checkpoint.save(mngr, 1, tree)
    checkpoint.wait(mngr)
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    with open(os.path.join(root, "filler"), "wb") as f:  # Leaves room for less than a checkpoint.
      f.write(b"x" * (free - 20_000))
    try:
      for step in (2, 3):
        checkpoint.save(mngr, step, {"w": tree["w"] + step})
        checkpoint.wait(mngr)
    except checkpoint.CheckpointError as error:
      print("error:", error)
    os.remove(os.path.join(root, "filler"))
    mngr = checkpoint.manager(os.path.join(root, "checkpoints"))
    print("restored", mngr.all_steps(), float(checkpoint.restore_latest(mngr, tree)["w"][1]))
""")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_a_full_disk_gives_one_clear_error_and_keeps_the_last_checkpoint(tmp_path):
  """A real full disk: a 400 KiB tmpfs in a private mount namespace."""
  mount = tmp_path / "disk"
  mount.mkdir()
  probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          f"mount -t tmpfs -o size=400k tmpfs {mount}"], capture_output=True)
  if probe.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
  script = tmp_path / "full_disk.py"
  script.write_text(FULL_DISK_SCRIPT)
  result = subprocess.run(
      ["unshare", "-m", "--propagation", "private", "sh", "-c",
       f"mount -t tmpfs -o size=400k tmpfs {mount} && {sys.executable} {script} {mount}"],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  lines = result.stdout.splitlines()
  assert result.returncode == 0, result.stderr[-2000:]
  assert lines[0] == (f"error: could not write a checkpoint in {mount}/checkpoints: the disk is "
                      "full; checkpoint 1 is the last good one (make room, then run the same "
                      "command again to resume)")
  assert lines[1] == "restored [1] 1.0"
