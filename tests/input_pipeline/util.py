"""Tiny on-disk datasets and configs for the input-pipeline tests."""
import gzip
import json
import os

import ml_collections
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


def write_coco(root, images, annotations, categories=((1, "cat"), (2, "dog")), name="ann.json",
               image_dir=".", colors=None, **extra):
  """A tiny COCO json and its PNG files under `root`; returns the json's path.

  images: [(id, width, height)] (file_name f"{image_dir}/img{id}.png"); annotations: [(id,
  image_id, category_id, [x, y, w, h])] (optionally a 5th item: iscrowd); categories: [(id,
  name)]. Each image is black with a white rectangle per annotation (its box, clipped), so a test
  can find boxes in the pixels. `extra` top-level keys (info, licenses) are written as given.
  """
  root = str(root)
  image_entries = []
  for image_id, w, h in images:
    file_name = os.path.normpath(os.path.join(image_dir, f"img{image_id}.png"))
    pixels = np.zeros((h, w, 3), np.uint8)
    for ann in annotations:
      if ann[1] == image_id:
        x, y, bw, bh = ann[3]
        x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
        x1, y1 = min(int(round(x + bw)), w), min(int(round(y + bh)), h)
        pixels[y0:y1, x0:x1] = 255
    path = os.path.join(root, file_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    image_entries.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
  data = {
      "images": image_entries,
      "annotations": [{"id": a[0], "image_id": a[1], "category_id": a[2], "bbox": list(a[3]),
                       "area": a[3][2] * a[3][3], "iscrowd": a[4] if len(a) > 4 else 0}
                      for a in annotations],
      "categories": [{"id": c, "name": n} for c, n in categories], **extra}
  path = os.path.join(root, name)
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def make_coco_config(train_json, val_json=None, **kwargs):
  """Base config on the coco source: image 16 px, 4 boxes, 3 queries; kwargs override
  config.detection keys when they are among its keys, else config keys."""
  c = make_config(None, batch=4, batch_eval=3, shuffle_buffer=50)
  c.data_source = "coco"
  c.train_split, c.eval_split = "train", "val"
  c.detection = ml_collections.ConfigDict(dict(
      train_json=train_json, val_json=val_json, test_json=None, image_root=None,
      val_image_root=None, test_image_root=None, max_boxes=4, max_queries=3, num_negatives=2,
      drop_bad_boxes=False, skip_crowd=True))
  c.pp.train = ("decode|det_crop|det_flip_lr|pad_to_square(16, pad_value=0.5)|det_queries"
                "|pad_boxes|normalize('clip')")
  c.pp.test = "decode|pad_to_square(16, pad_value=0.5)|pad_boxes|normalize('clip')"
  for k, v in kwargs.items():
    setattr(c.detection if k in c.detection else c, k, v)
  return c
