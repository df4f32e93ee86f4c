"""idx (MNIST-format) source: the real Fashion-MNIST files, and broken files."""
import gzip
import os

import numpy as np
import pytest

from tests.input_pipeline import util
from vit_jax.input_pipeline import sources


@pytest.mark.skipif(not os.path.isdir(util.FASHION_MNIST), reason="dataset-fashion-mnist missing")
def test_real_fashion_mnist_counts_and_labels():
  config = util.make_config(None, dataset="fashion_mnist")  # data_dir None: the bundled default
  train, test = sources.get_source(config, "train"), sources.get_source(config, "test")
  assert (train.num_examples, test.num_examples) == (60000, 10000)
  example = train.load(np.int64(123))
  assert example["image"].shape == (28, 28, 1) and example["image"].dtype.name == "uint8"
  # Independent reference: parse the label file with a plain byte offset.
  with gzip.open(os.path.join(util.FASHION_MNIST, "t10k-labels-idx1-ubyte.gz")) as f:
    reference = np.frombuffer(f.read()[8:], np.uint8)
  labels = test.load(np.arange(10000))["label"].numpy()
  np.testing.assert_array_equal(labels, reference)
  assert labels.min() == 0 and labels.max() == 9
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)  # balanced by construction
  assert sources.get_source(config, "train[:98%]").num_examples == 58800
  assert sources.get_source(config, "train[98%:]+test[:10]").num_examples == 1210


def test_split_slicing_matches_tfds_semantics(tmp_path):
  config = util.make_config(util.make_idx_dir(tmp_path, n_train=40, n_test=23))
  source = sources.get_source(config, "train[10%:25%]+test[-3:]")
  ids = util.image_index(source.load(np.arange(source.num_examples))["image"].numpy())
  np.testing.assert_array_equal(ids, [4, 5, 6, 7, 8, 9, 20, 21, 22])
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    sources.get_source(config, "validation")
  with pytest.raises(ValueError, match="cannot read split"):
    sources.get_source(config, "train[:200]")


def test_missing_dir_and_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    sources.get_source(util.make_config(str(tmp_path / "nope")), "train")
  root = util.make_idx_dir(tmp_path)
  os.remove(os.path.join(root, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
    sources.get_source(util.make_config(root), "test")


@pytest.mark.parametrize("damage, message", [
    ("magic", r"corrupt: magic number 0x00000805, expected 0x00000803"),
    ("truncate", r"truncated: header dims \[40, 8, 8\] need 2560 data bytes, found 2500"),
    ("extra", r"corrupt: header dims \[40, 8, 8\] need 2560 data bytes, found 2561"),
    ("gzip_cut", r"corrupt or truncated"),
    ("not_gzip", r"corrupt or truncated"),
])
def test_broken_idx_file_names_file(tmp_path, damage, message):
  root = util.make_idx_dir(tmp_path, n_train=40)
  path = os.path.join(root, "train-images-idx3-ubyte.gz")
  with gzip.open(path) as f:
    raw = f.read()
  if damage == "magic":
    raw = raw[:3] + b"\x05" + raw[4:]
  elif damage == "truncate":
    raw = raw[:-60]
  elif damage == "extra":
    raw = raw + b"\x00"
  if damage == "gzip_cut":
    with open(path, "rb") as f:
      packed = f.read()
    with open(path, "wb") as f:
      f.write(packed[:len(packed) // 2])
  elif damage == "not_gzip":
    with open(path, "wb") as f:
      f.write(raw)
  else:
    with gzip.open(path, "wb") as f:
      f.write(raw)
  with pytest.raises(ValueError, match=message) as e:
    sources.get_source(util.make_config(root), "train")
  assert path in str(e.value)


def test_label_outside_num_classes(tmp_path):
  root = util.make_idx_dir(tmp_path, num_classes=12)
  with pytest.raises(ValueError, match=r"label 10 \(example 10\) is outside \[0, num_classes=10\)"):
    sources.get_source(util.make_config(root), "train")
