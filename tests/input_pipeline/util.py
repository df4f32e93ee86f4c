"""Tiny on-disk datasets and configs for the input-pipeline tests."""
import gzip
import os

import numpy as np
from PIL import Image

from vit_jax.configs import common

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def write_idx(path: str, array: np.ndarray):
  """Writes a uint8 array as an MNIST-format idx file (gzip if path ends in .gz)."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def tagged_images(n: int, size: int = 8) -> np.ndarray:
  """uint8 [n, size, size]: pixel (0, 0) and (0, 1) hold the example's index (little end first),
  so a test can tell which example it got from the pixels alone."""
  rng = np.random.default_rng(n)
  images = rng.integers(0, 256, (n, size, size), np.uint8)
  images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
  return images


def image_index(images: np.ndarray) -> np.ndarray:
  """Inverse of tagged_images for uint8 [b, h, w, c] batches."""
  return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def write_png(path: str, index: int):
  """8x8 RGB PNG whose pixels encode `index` (PNG is lossless; see image_index)."""
  image = np.repeat(tagged_images(index + 1)[index][..., None], 3, -1)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def make_idx_dir(root, n_train=40, n_test=23, size=8, num_classes=10):
  """train/t10k idx files of tagged images, labels = index % num_classes; returns the dir."""
  root = str(root)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), tagged_images(n, size))
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % num_classes)
  return root


def make_config(data_dir=None, **kwargs):
  """Base config on the idx source with small batches; kwargs override (pp_train, pp_test too)."""
  c = common.get_base_config()
  c.data_source = "idx"
  c.data_dir = data_dir
  c.batch, c.batch_eval, c.shuffle_buffer, c.prefetch = 4, 6, 100, 1
  c.pp.train = kwargs.pop("pp_train", "decode|onehot(10)")
  c.pp.test = kwargs.pop("pp_test", "decode|onehot(10)")
  for k, v in kwargs.items():
    setattr(c, k, v)
  return c
