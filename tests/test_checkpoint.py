"""Orbax checkpoints: exact round trip, latest-wins, metadata, nothing to restore."""

import jax
import jax.numpy as jnp
import numpy as np

from rcnas_jax import checkpoint


def test_round_trip_is_bit_identical_and_latest_wins(tmp_path):
  tree = {"w": jax.random.normal(jax.random.key(0), (3, 4)), "step": jnp.int32(7),
          "nested": {"b": jnp.arange(5, dtype=jnp.bfloat16)}}
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  assert checkpoint.restore_latest(mngr, tree) is None
  for step in (1, 2, 3):
    checkpoint.save(mngr, step, jax.tree.map(lambda x: x + step, tree), meta={"step": step})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2, 3]
  restored = checkpoint.restore_latest(mngr, tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.tree.map(lambda x: x + 3, tree))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert checkpoint.restore_meta(mngr) == {"step": 3}
  mngr.close()
