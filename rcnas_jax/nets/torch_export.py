"""A PyTorch twin of a basic-block ResNet, with the Flax weights converted 1:1.

For cross-checks against PyTorch reference tools (torchattacks' APGD, APGD-T, Square): the twin
takes NCHW images in [0, 1] and returns the same logits as `models.ResNet` in eval mode (BN
running statistics). torch is imported lazily; it is a test/benchmark dependency only.
"""

from __future__ import annotations

import numpy as np

from rcnas_jax.nets import arch


def _tensor(value):
  """A float32 torch tensor of a JAX/numpy array."""
  import torch
  return torch.from_numpy(np.array(value, np.float32))


def convert(spec: arch.NetworkSpec, variables: dict, mean, std):
  """A `torch.nn.Module` computing the same logits as models.build(spec, ...) in eval mode."""
  import torch
  import torch.nn.functional as F

  if any(s.block != "basic" for s in spec.stages) or spec.activation != "relu":
    raise ValueError("torch_export converts basic-block ReLU networks only")
  params, stats = variables["params"], variables["batch_stats"]

  def conv(name_params):
    return _tensor(name_params["kernel"]).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW.

  def norm(p, s):
    return [_tensor(s["mean"]), _tensor(s["var"]), _tensor(p["scale"]), _tensor(p["bias"])]

  blocks = []
  for i, stage in enumerate(spec.stages):
    for j in range(stage.depth):
      p, s = params[f"stage{i}_block{j}"], stats[f"stage{i}_block{j}"]
      blocks.append({"stride": stage.stride if j == 0 else 1,
                     "norm1": norm(p["norm1"], s["norm1"]), "conv1": conv(p["conv1"]),
                     "norm2": norm(p["norm2"], s["norm2"]), "conv2": conv(p["conv2"]),
                     "shortcut": conv(p["shortcut"]) if "shortcut" in p else None})

  class TorchResNet(torch.nn.Module):
    """Pre-activation ResNet with fixed (converted) weights; input NCHW in [0, 1]."""

    def __init__(self):
      super().__init__()
      self.register_buffer("mean", _tensor(mean).reshape(1, -1, 1, 1))
      self.register_buffer("std", _tensor(std).reshape(1, -1, 1, 1))
      # A parameter, so torchattacks can find the module's device.
      self.stem = torch.nn.Parameter(conv(params["stem"]), requires_grad=False)
      self.head_norm = norm(params["head_norm"], stats["head_norm"])
      self.head_weight = _tensor(params["head"]["kernel"]).T.contiguous()
      self.head_bias = _tensor(params["head"]["bias"])

    def forward(self, x):
      bn = lambda x, n: F.batch_norm(x, n[0], n[1], n[2], n[3], training=False, eps=1e-5)
      pad = lambda w: w.shape[-1] // 2
      x = (x - self.mean) / self.std
      x = F.conv2d(x, self.stem, stride=spec.stem_stride, padding=pad(self.stem))
      for b in blocks:
        out = F.relu(bn(x, b["norm1"]))
        shortcut = x if b["shortcut"] is None else F.conv2d(out, b["shortcut"],
                                                            stride=b["stride"])
        out = F.conv2d(out, b["conv1"], stride=b["stride"], padding=pad(b["conv1"]))
        out = F.relu(bn(out, b["norm2"]))
        x = F.conv2d(out, b["conv2"], padding=pad(b["conv2"])) + shortcut
      x = F.relu(bn(x, self.head_norm)).mean(dim=(2, 3))
      return x @ self.head_weight.T + self.head_bias

  return TorchResNet().eval()
