"""A searched student in plain PyTorch: this file imports torch only, and is copied as it is
into every PyTorch export (`rcnas_jax.export_torch`), so a user needs nothing from rcnas_jax.

  import student                                  # the student.py of an export directory
  model = student.load("path/to/export_dir")      # an eval-mode torch.nn.Module
  logits = model(images)                          # NCHW float images in [0, 1]

The network is the pre-activation ResNet of `rcnas_jax.nets.models`, basic and robust
(RobustResBlock: Res2Net bottleneck with squeeze-excitation) blocks, with the same module names
as the Flax parameters (`stem`, `stage{i}_block{j}`, `head_norm`, `head`), so its state_dict is
the Flax variables renamed. The input is normalised inside, as in the Flax model; BN uses its
running statistics in eval mode. `config.json` holds the architecture, `state_dict.pt` the weights.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "softplus": F.softplus,
               "gelu": lambda x: F.gelu(x, approximate="tanh")}  # Flax's nn.gelu is the tanh one.


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
  """A bias-free conv with symmetric padding kernel // 2."""
  return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


def norm(channels: int) -> nn.BatchNorm2d:
  """Batch norm with Flax's epsilon."""
  return nn.BatchNorm2d(channels, eps=1e-5)


class BasicBlock(nn.Module):
  """act(BN(x)) -> conv3x3(stride) -> act(BN) -> conv3x3, plus the (projected) shortcut."""

  def __init__(self, cin: int, stage: dict, stride: int, activation: str):
    super().__init__()
    cout = stage["channels"]
    self.act = ACTIVATIONS[activation]
    self.norm1, self.conv1 = norm(cin), conv(cin, cout, 3, stride)
    self.norm2, self.conv2 = norm(cout), conv(cout, cout, 3)
    self.shortcut = conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

  def forward(self, x):
    out = self.act(self.norm1(x))
    shortcut = x if self.shortcut is None else self.shortcut(out)
    out = self.conv2(self.act(self.norm2(self.conv1(out))))
    return out + shortcut


class SqueezeExcitation(nn.Module):
  """z * sigmoid(W2 relu(W1 avgpool(z))), both bias-free."""

  def __init__(self, channels: int, reduction: int):
    super().__init__()
    self.squeeze = nn.Linear(channels, channels // reduction, bias=False)
    self.excite = nn.Linear(channels // reduction, channels, bias=False)

  def forward(self, z):
    s = torch.sigmoid(self.excite(F.relu(self.squeeze(z.mean(dim=(2, 3))))))
    return z * s[:, :, None, None]


class RobustBlock(nn.Module):
  """RobustResBlock (Huang et al., CVPR 2023): Res2Net bottleneck with SE on a BN'd output."""

  def __init__(self, cin: int, stage: dict, stride: int, activation: str):
    super().__init__()
    width, scales = stage["inner_width"], stage["scales"]
    cout = stage["channels"] * stage["expansion"]
    self.act, self.stride, self.width, self.scales = ACTIVATIONS[activation], stride, width, scales
    self.norm1 = norm(cin)  # Feeds only a projection shortcut, as in the reference block.
    self.shortcut = conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None
    self.conv1, self.norm2 = conv(cin, width * scales, 1), norm(width * scales)
    for s in range(scales - 1):
      setattr(self, f"split_conv{s}", conv(width, width, 3, stride, stage["cardinality"]))
      setattr(self, f"split_norm{s}", norm(width))
    self.conv3 = conv(width * scales, cout, 1)
    self.se_norm, self.se = norm(cout), SqueezeExcitation(cout, stage["se_reduction"])

  def forward(self, x):
    shortcut = x if self.shortcut is None else self.shortcut(self.act(self.norm1(x)))
    splits = torch.split(self.act(self.norm2(self.conv1(x))), self.width, dim=1)
    outputs = []
    for s in range(self.scales - 1):
      inp = splits[s] if (s == 0 or self.stride > 1) else splits[s] + outputs[-1]
      split_conv, split_norm = getattr(self, f"split_conv{s}"), getattr(self, f"split_norm{s}")
      outputs.append(self.act(split_norm(split_conv(inp))))
    last = splits[-1]
    if self.stride > 1:
      last = F.avg_pool2d(last, 3, self.stride, padding=1, count_include_pad=True)
    out = self.conv3(torch.cat(outputs + [last], dim=1))
    return out + shortcut + self.se(self.se_norm(out))


BLOCKS = {"basic": BasicBlock, "robust": RobustBlock}


class Student(nn.Module):
  """The pre-activation ResNet of `config` (config.json of an export); NCHW input in [0, 1]."""

  def __init__(self, config: dict):
    super().__init__()
    net = config["network"]
    self.act = ACTIVATIONS[net["activation"]]
    self.register_buffer("mean", torch.tensor(config["mean"]).reshape(1, -1, 1, 1), False)
    self.register_buffer("std", torch.tensor(config["std"]).reshape(1, -1, 1, 1), False)
    channels = config["image_shape"][-1]
    self.stem = conv(channels, net["stem_channels"], 3, net["stem_stride"])
    channels, self.blocks = net["stem_channels"], []
    for i, stage in enumerate(net["stages"]):
      for j in range(stage["depth"]):
        block = BLOCKS[stage["block"]](channels, stage, stage["stride"] if j == 0 else 1,
                                       net["activation"])
        setattr(self, f"stage{i}_block{j}", block)
        self.blocks.append(f"stage{i}_block{j}")
        channels = stage["out_channels"]
    self.head_norm = norm(channels)
    self.head = nn.Linear(channels, config["num_classes"])

  def forward(self, images):
    x = self.stem((images - self.mean) / self.std)
    for name in self.blocks:
      x = getattr(self, name)(x)
    return self.head(self.act(self.head_norm(x)).mean(dim=(2, 3)))


def load(directory: str) -> Student:
  """The exported student in `directory` (config.json, state_dict.pt), in eval mode."""
  with open(os.path.join(directory, "config.json")) as f:
    model = Student(json.load(f))
  state = torch.load(os.path.join(directory, "state_dict.pt"), map_location="cpu",
                     weights_only=True)
  model.load_state_dict(state)
  return model.eval()
