"""The demo detection set's builder: exact boxes, stamp-disjoint splits, a valid COCO json."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from vit_jax.demos import tuxpaint_detection as demo


def _stamp(path, size, shape="square"):
  """An RGBA stamp: opaque white `shape` inside transparent margins."""
  h, w = size
  a = np.zeros((h, w, 4), np.uint8)
  if shape == "square":
    a[2:h - 3, 4:w - 1] = 255
  else:  # a disc
    yy, xx = np.mgrid[:h, :w]
    a[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 2 - 2) ** 2] = 255
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(a, "RGBA").save(path)


def test_compose_boxes_are_the_pasted_pixels(tmp_path):
  background = np.zeros((200, 300, 3), np.uint8)  # black: the stamps are the only white pixels
  stamps_dir = str(tmp_path)
  _stamp(f"{stamps_dir}/a.png", (40, 30))
  for seed in range(5):
    rng = np.random.default_rng(seed)
    image, objects = demo.compose(background, [(0, f"{stamps_dir}/a.png")], rng,
                                  canvas=(120, 160))
    assert image.shape == (120, 160, 3)
    assert len(objects) == 1
    _, (x, y, w, h), visible = objects[0]
    ys, xs = np.nonzero(image.max(-1) > 127)
    assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert abs(visible - len(ys)) <= 0.05 * len(ys)  # resampling edges aside


def test_build_writes_a_valid_coco_set_with_disjoint_stamps(tmp_path, monkeypatch):
  stamps = tmp_path / "stamps"
  for cat, folder in (("disc", "shapes/discs"), ("block", "shapes/blocks")):
    for i in range(5):
      _stamp(str(stamps / folder / f"{cat}{i}.png"), (30 + 3 * i, 40),
             "disc" if cat == "disc" else "square")
  monkeypatch.setattr(demo, "load_backgrounds",
                      lambda: [np.full((256, 256, 3), 90, np.uint8)])
  categories = {"disc": "shapes/discs", "block": "shapes/blocks"}
  paths = demo.build(str(tmp_path / "out"), stamps_dir=str(stamps), num_train=6, num_val=3,
                     categories=categories)
  train, val, novel = (json.load(open(paths[s])) for s in ("train", "val", "val_novel"))
  assert [c["name"] for c in train["categories"]] == ["disc", "block"]
  assert len(train["images"]) == 6 and len(val["images"]) == 3 and len(novel["images"]) == 3
  ids = [im["id"] for im in train["images"] + val["images"] + novel["images"]]
  assert len(set(ids)) == len(ids)
  files = [im["file_name"] for im in train["images"] + val["images"] + novel["images"]]
  assert len(set(files)) == len(files)
  for coco in (train, val, novel):
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for im in coco["images"]:
      with Image.open(tmp_path / "out" / im["file_name"]) as f:
        assert f.size == (im["width"], im["height"])
    for a in coco["annotations"]:
      x, y, w, h = a["bbox"]
      width, height = sizes[a["image_id"]]
      assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height
  train_stamps, val_stamps = demo.split_stamps(
      demo.list_stamps(str(stamps), categories), 0.2, 0)
  for cat in categories:
    assert not set(train_stamps[cat]) & set(val_stamps[cat])
    assert val_stamps[cat]


def test_missing_stamps_dir_names_the_package(tmp_path):
  with pytest.raises(FileNotFoundError, match="tuxpaint-stamps-default"):
    demo.list_stamps(str(tmp_path / "nope"), demo.CATEGORIES)


def test_backgrounds_are_bundled_photos():
  pytest.importorskip("skimage")
  backgrounds = demo.load_backgrounds(("astronaut", "coffee", "camera"))
  assert len(backgrounds) == 3
  assert all(b.dtype == np.uint8 and b.ndim == 3 and b.shape[-1] == 3 for b in backgrounds)
