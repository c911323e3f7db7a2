"""The PyTorch twin computes the Flax network's eval-mode logits (runs when torch is installed)."""

import jax
import numpy as np
import pytest

from rcnas_jax.nets import arch, models, torch_export

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference


def test_twin_matches_flax_logits_in_eval_mode():
  spec = arch.NetworkSpec(stages=(arch.StageSpec(2, 8, 1), arch.StageSpec(1, 16, 2),
                                  arch.StageSpec(1, 16, 2)))
  model = models.build(spec, 5, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
  variables = models.init(model, jax.random.key(0), (12, 12, 3))
  # Non-trivial BN statistics and biases, so eval mode and every parameter matter.
  variables = jax.tree.map(lambda v: v + 0.1 * jax.random.uniform(jax.random.key(1), v.shape),
                           variables)
  images = np.random.default_rng(0).uniform(size=(4, 12, 12, 3)).astype(np.float32)
  expected = model.apply(variables, images, train=False)
  twin = torch_export.convert(spec, variables, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
  with torch.no_grad():
    logits = twin(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_robust_blocks_are_refused():
  spec = arch.NetworkSpec(stages=(arch.StageSpec(1, 16, 1, "robust"),))
  with pytest.raises(ValueError, match="basic-block ReLU networks only"):
    torch_export.convert(spec, {"params": {}, "batch_stats": {}}, (0.5,), (0.5,))
