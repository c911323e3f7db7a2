"""Network-to-network weight inheritance: a student's initial variables from its teacher's.

METHOD §5.2: the student keeps the first D_i blocks of each teacher stage and, in every layer,
the teacher's channels with the largest L1 norm; whatever has no counterpart in the teacher
(a changed block type, a new projection shortcut, channels beyond the teacher's) keeps its
fresh initialisation. The channels of a stage's residual stream are chosen once per stage, so
every block that reads or writes the stream agrees on them. A pure function of (teacher
variables, fresh student variables), computed with NumPy on the host: it is sorting and
indexing, and a jitted version compiled anew for every student shape a search meets.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from rcnas_jax.nets import arch, models

Variables = dict  # {'params': ..., 'batch_stats': ...}


def top_channels(l1_norms: np.ndarray, k: int) -> np.ndarray:
  """Indices of the min(k, C) largest norms, in increasing channel order (ties: lower first)."""
  return np.sort(np.argsort(-l1_norms, kind="stable")[:k])


def _filter_l1(kernel: np.ndarray) -> np.ndarray:
  """L1 norm of each output filter of a conv/dense kernel (last axis)."""
  return np.abs(kernel.reshape(-1, kernel.shape[-1])).sum(0)


def _leading(size: int, teacher_size: int) -> np.ndarray:
  return np.arange(min(size, teacher_size))


def paste(fresh: np.ndarray, teacher: np.ndarray, indices: tuple) -> np.ndarray:
  """`teacher` gathered at one index array per axis, written into the leading corner of a copy
  of `fresh`. An index entry of None keeps the leading min(student, teacher) positions."""
  sub = teacher
  for axis, index in enumerate(indices):
    index = _leading(fresh.shape[axis], teacher.shape[axis]) if index is None else index
    sub = np.take(sub, index, axis=axis)
  out = np.array(fresh, copy=True)
  out[tuple(slice(0, n) for n in sub.shape)] = sub
  return out


def _copy_layer(student: Variables, teacher: Variables, path: tuple[str, ...], indices) -> None:
  """Pastes every variable of the layer at `path` (params and BN statistics) in place."""
  for collection in ("params", "batch_stats"):
    s, t = student.get(collection, {}), teacher.get(collection, {})
    for key in path:
      if key not in s or key not in t:
        break
      s, t = s[key], t[key]
    else:
      for name in s:
        if name in t:
          s[name] = paste(s[name], t[name], indices(name, s[name].ndim))


def _conv(in_index, out_index):
  """Index rule of a conv kernel (kh, kw, in, out)."""
  return lambda name, ndim: (None, None, in_index, out_index)


def _channels(index):
  """Index rule of a per-channel layer (BN scale, bias, mean, var)."""
  return lambda name, ndim: (index,)


def _stream_norms(teacher_params: dict, stage: int, spec: arch.NetworkSpec) -> np.ndarray:
  """How strongly each channel of a teacher stage's residual stream is written to."""
  last = "conv3" if spec.stages[stage].block == "robust" else "conv2"
  total = 0.0
  for j in range(spec.stages[stage].depth):
    block = teacher_params[f"stage{stage}_block{j}"]
    total = total + _filter_l1(block[last]["kernel"])
    if "shortcut" in block:
      total = total + _filter_l1(block["shortcut"]["kernel"])
  return total


def _basic_block(student, teacher, path, in_index, out_index, channels: int) -> None:
  """Copies a basic block: stream channels given, inner channels by conv1's filter norms."""
  t = teacher["params"][path]
  inner = top_channels(_filter_l1(t["conv1"]["kernel"]), channels)
  _copy_layer(student, teacher, (path, "norm1"), _channels(in_index))
  _copy_layer(student, teacher, (path, "shortcut"), _conv(in_index, out_index))
  _copy_layer(student, teacher, (path, "conv1"), _conv(in_index, inner))
  _copy_layer(student, teacher, (path, "norm2"), _channels(inner))
  _copy_layer(student, teacher, (path, "conv2"), _conv(inner, out_index))


def _robust_block(student, teacher, path, in_index, out_index, channels: int) -> None:
  """Copies a RobustResBlock, keeping its 8 splits and 4 groups aligned.

  Every split conv reads and writes the same positions of every group (the splits are
  chained and the grouped kernels share their input layout), so one set of within-group
  positions is chosen from the summed filter norms of all split convs.
  """
  t = teacher["params"][path]
  width, student_width = t["split_conv0"]["kernel"].shape[-1], arch.robust_inner_width(channels)
  group, student_group = width // arch.ROBUST_CARDINALITY, student_width // arch.ROBUST_CARDINALITY
  norms = sum(_filter_l1(t[f"split_conv{s}"]["kernel"]) for s in range(arch.ROBUST_SCALES - 1))
  local = top_channels(norms.reshape(arch.ROBUST_CARDINALITY, group).sum(0), student_group)
  split = np.concatenate([g * group + local for g in range(arch.ROBUST_CARDINALITY)])
  hidden = np.concatenate([s * width + split for s in range(arch.ROBUST_SCALES)])
  _copy_layer(student, teacher, (path, "norm1"), _channels(in_index))
  _copy_layer(student, teacher, (path, "shortcut"), _conv(in_index, out_index))
  _copy_layer(student, teacher, (path, "conv1"), _conv(in_index, hidden))
  _copy_layer(student, teacher, (path, "norm2"), _channels(hidden))
  for s in range(arch.ROBUST_SCALES - 1):
    _copy_layer(student, teacher, (path, f"split_conv{s}"), _conv(local, split))
    _copy_layer(student, teacher, (path, f"split_norm{s}"), _channels(split))
  _copy_layer(student, teacher, (path, "conv3"), _conv(hidden, out_index))
  _copy_layer(student, teacher, (path, "se_norm"), _channels(out_index))
  _copy_layer(student, teacher, (path, "se", "squeeze"), lambda n, d: (out_index, None))
  _copy_layer(student, teacher, (path, "se", "excite"), lambda n, d: (None, out_index))


def inherit(teacher_variables: Variables, student_variables: Variables,
            teacher_spec: arch.NetworkSpec, student_spec: arch.NetworkSpec) -> Variables:
  """The student's fresh variables overwritten with the teacher's where they correspond."""
  teacher_variables = jax.tree.map(np.asarray, jax.device_get(teacher_variables))
  student = _unfreeze(jax.tree.map(np.asarray, jax.device_get(student_variables)))
  teacher_params = teacher_variables["params"]
  stream = top_channels(_filter_l1(teacher_params["stem"]["kernel"]), student_spec.stem_channels)
  _copy_layer(student, teacher_variables, ("stem",), _conv(None, stream))
  for i, (s_stage, t_stage) in enumerate(zip(student_spec.stages, teacher_spec.stages)):
    same_block = s_stage.block == t_stage.block
    if same_block:
      out_stream = top_channels(_stream_norms(teacher_params, i, teacher_spec),
                                s_stage.out_channels)
    else:  # Different blocks: no channel of the stream corresponds; keep the leading ones.
      out_stream = None
    copy_block = _robust_block if s_stage.block == "robust" else _basic_block
    for j in range(min(s_stage.depth, t_stage.depth) if same_block else 0):
      copy_block(student, teacher_variables, f"stage{i}_block{j}", stream if j == 0 else out_stream,
                 out_stream, s_stage.channels)
    stream = out_stream
  _copy_layer(student, teacher_variables, ("head_norm",), _channels(stream))
  _copy_layer(student, teacher_variables, ("head",),
              lambda name, ndim: (stream, None) if name == "kernel" else (None,))
  return student


def _unfreeze(tree):
  """Nested dicts we can assign into."""
  return {k: _unfreeze(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def inherited(teacher_variables: Variables, seed: int, *, model: models.ResNet,
              teacher_spec: arch.NetworkSpec, student_spec: arch.NetworkSpec,
              image_shape: Sequence[int]) -> Variables:
  """A student's initial host variables: fresh (`models.host_init`), then the teacher's
  weights wherever shapes allow. Nothing compiles."""
  fresh = models.host_init(model, image_shape, seed)
  return inherit(teacher_variables, fresh, teacher_spec, student_spec)
