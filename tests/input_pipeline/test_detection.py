"""COCO detection data: reading (vs pycocotools), validation, splitting, the coco source through the
pipeline, and the box ops on hand-made cases."""
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax.input_pipeline import detection

# Two landscape and two portrait images; image 4 has no annotation; ids of categories out of order.
IMAGES = [(1, 40, 20), (2, 40, 20), (3, 20, 40), (4, 30, 30)]
ANNS = [(10, 1, 7, [10, 5, 20, 10]), (11, 1, 3, [0, 0, 8, 6]), (12, 2, 3, [20, 4, 12, 12]),
        (13, 3, 5, [2, 10, 14, 20]), (14, 3, 7, [4, 30, 10, 8])]
CATS = [(7, "zebra"), (3, "cat"), (5, "dog")]  # classes by id: cat 0, dog 1, zebra 2


def good(tmp_path, **kw):
  return util.write_coco(tmp_path, IMAGES, ANNS, CATS, **kw)


def rewrite(path, fn):
  with open(path) as f:
    data = json.load(f)
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def take(iterator, n):
  return list(itertools.islice(iterator, n))


# ------------------------------------------------------------------------------------------------
# Reading.


def test_read_coco_matches_pycocotools(tmp_path):
  coco_lib = pytest.importorskip("pycocotools.coco")
  path = good(tmp_path)
  data = detection.read_coco(path)
  ref = coco_lib.COCO(path)
  cat_ids = sorted(ref.getCatIds())
  assert data.category_ids.tolist() == cat_ids
  assert data.category_names == [c["name"] for c in ref.loadCats(cat_ids)]
  for i, image_id in enumerate(data.image_ids):
    anns = ref.loadAnns(ref.getAnnIds(imgIds=[int(image_id)]))
    np.testing.assert_array_equal(data.boxes[i], np.array([a["bbox"] for a in anns]).reshape(-1, 4))
    assert data.classes[i].tolist() == [cat_ids.index(a["category_id"]) for a in anns]
  assert data.file_names[0] == ref.loadImgs([1])[0]["file_name"]
  # Cached per modification: a rewritten file is read again.
  assert detection.read_coco(path) is data
  os.utime(rewrite(path, lambda d: d["categories"].append({"id": 9, "name": "emu"})),
           ns=(1, 1))
  assert detection.read_coco(path).category_names == ["cat", "dog", "zebra", "emu"]


def test_read_coco_structure_errors_name_the_place(tmp_path):
  path = rewrite(good(tmp_path), lambda d: d["annotations"][2].update(bbox=[1, 2, 3]))
  with pytest.raises(ValueError, match=r"annotations\[2\] \(id 12\) has bbox=\[1, 2, 3\]"):
    detection.read_coco(path)
  path = rewrite(path, lambda d: d.pop("images"))
  with pytest.raises(ValueError, match="no 'images' list"):
    detection.read_coco(path)


@pytest.mark.parametrize("fmt, kwargs", [("png", {}), ("jpeg", {}), ("jpeg", {"progressive": True}),
                                         ("gif", {}), ("bmp", {}), ("webp", {}),
                                         ("webp", {"lossless": True})])
def test_read_image_size_matches_pil(tmp_path, fmt, kwargs):
  path = str(tmp_path / f"x.{fmt}")
  pixels = np.random.default_rng(0).integers(0, 255, (23, 37, 3), np.uint8)
  # Pillow's wheels (the test extras) write every one of these formats.
  Image.fromarray(pixels).save(path, format=fmt.upper(), **kwargs)
  with Image.open(path) as im:
    width, height = im.size
  assert detection.read_image_size(path) == (height, width) == (23, 37)
  with open(path, "rb") as f:
    head = f.read(8)  # shorter than any header
  with open(path, "wb") as f:
    f.write(head)
  with pytest.raises(ValueError):
    detection.read_image_size(path)


# ------------------------------------------------------------------------------------------------
# Validation.


def test_validate_good_file_warnings_and_counts(tmp_path):
  path = good(tmp_path)
  report = detection.validate(path)
  assert report.ok and report.errors == []
  assert [w.kind for w in report.warnings] == [detection.NO_ANNOTATIONS]
  assert "image 4 'img4.png'" in str(report)
  assert report.class_counts == {"cat": 2, "dog": 1, "zebra": 2}
  assert report.imbalance == 2.0
  # A category without boxes, and an imbalance above the threshold, are warnings.
  many = [(20 + k, 4, 3, [1, 1, 2, 2]) for k in range(25)]
  path = util.write_coco(tmp_path, IMAGES, ANNS + many, CATS + [(8, "emu")], name="b.json")
  report = detection.validate(path)
  assert report.ok
  kinds = {w.kind for w in report.warnings}
  assert kinds == {detection.EMPTY_CATEGORY, detection.IMBALANCE}
  assert report.imbalance == 27.0  # cat 27 boxes, dog 1
  assert "category 8 'emu'" in str(report)


def _remove_file(path):
  os.remove(os.path.join(os.path.dirname(path), "img2.png"))


def _truncate_file(path):
  with open(os.path.join(os.path.dirname(path), "img2.png"), "wb") as f:
    f.write(b"\x89PNG\r\n")


def _resize_file(path):
  Image.new("RGB", (41, 20)).save(os.path.join(os.path.dirname(path), "img2.png"))


# kind -> (json edit, file edit, text the report must show: the offending id and file).
ERROR_CASES = {
    detection.BOX_OUTSIDE: (lambda d: d["annotations"][2].update(bbox=[30, 4, 12, 12]), None,
                            "annotation 12 (image 2 'img2.png')"),
    detection.BOX_DEGENERATE: (lambda d: d["annotations"][2].update(bbox=[20, 4, 0, 12]), None,
                               "annotation 12 (image 2 'img2.png')"),
    detection.UNKNOWN_CATEGORY: (lambda d: d["annotations"][2].update(category_id=4), None,
                                 "category_id 4"),
    detection.UNKNOWN_IMAGE: (lambda d: d["annotations"][2].update(image_id=99), None,
                              "annotation 12 (unknown image 99)"),
    detection.DUPLICATE_IMAGE: (lambda d: d["images"][3].update(id=1), None,
                                "image 1 'img4.png': same id as image 1 'img1.png'"),
    detection.DUPLICATE_ANNOTATION: (lambda d: d["annotations"][2].update(id=10), None,
                                     "annotation 10 (image 2 'img2.png')"),
    detection.DUPLICATE_CATEGORY: (lambda d: d["categories"].append({"id": 5, "name": "dog2"}),
                                   None, "category 5"),
    detection.BAD_IMAGE_SIZE: (lambda d: d["images"][1].pop("width"), None,
                               "image 2 'img2.png': width=0"),
    detection.MISSING_FILE: (None, _remove_file, "image 2 'img2.png'"),
    detection.UNREADABLE_FILE: (None, _truncate_file, "image 2 'img2.png'"),
    detection.SIZE_MISMATCH: (None, _resize_file, "the file is 41x20, the json says 40x20"),
}


@pytest.mark.parametrize("kind", list(ERROR_CASES))
def test_validate_finds_each_error_kind(tmp_path, kind):
  edit_json, edit_file, shown = ERROR_CASES[kind]
  path = good(tmp_path)
  if edit_json:
    rewrite(path, edit_json)
  if edit_file:
    edit_file(path)
  report = detection.validate(path)
  assert not report.ok
  assert set(report.error_counts()) == {kind}, str(report)
  text = str(report)
  assert f"  {kind}: 1" in text and shown in text, text
  assert detection.main(["validate", path]) == 1
  assert detection.main(["validate", good(tmp_path / "ok")]) == 0


def test_validate_box_tolerance_and_no_file_checks(tmp_path):
  path = rewrite(good(tmp_path), lambda d: d["annotations"][2].update(bbox=[20, 4, 20.9, 12]))
  assert detection.validate(path).ok  # 0.9 px past the border: rounding, clipped when loaded
  _remove_file(path)
  assert detection.validate(path, check_images=False).ok


def test_image_root_default_and_images_subfolder(tmp_path):
  path = util.write_coco(tmp_path, IMAGES, ANNS, CATS, image_dir="images")
  rewrite(path, lambda d: [e.update(file_name=os.path.basename(e["file_name"]))
                           for e in d["images"]])
  report = detection.validate(path)
  assert report.ok and report.images_dir == str(tmp_path / "images")


# ------------------------------------------------------------------------------------------------
# Splitting.


def _split_dataset(root):
  """60 images: class 'common' in 40, 'mid' in 15, 'rare' in 5 (some images hold two), 10
  without annotations."""
  rng = np.random.default_rng(1)
  images = [(i, 8, 8) for i in range(1, 71)]
  anns, k = [], 0
  for i in range(1, 61):
    classes = [1] if i <= 40 else [2] if i <= 55 else [3]
    if i % 7 == 0 and i > 40:
      classes.append(1)
    for c in classes:
      k += 1
      anns.append((k, i, c, [1, 1, int(rng.integers(2, 6)), 3]))
  return util.write_coco(root, images, anns, [(1, "common"), (2, "mid"), (3, "rare")],
                         info={"year": 2024}, licenses=[{"id": 1, "name": "cc"}])


def test_split_is_stratified_disjoint_and_valid(tmp_path, capsys):
  coco_lib = pytest.importorskip("pycocotools.coco")
  path = _split_dataset(tmp_path)
  ratios = (0.6, 0.2, 0.2)
  assert detection.main(["split", path, "--ratios", "0.6,0.2,0.2", "--seed", "3"]) == 0
  printed = capsys.readouterr().out
  parts = {n: str(tmp_path / f"ann_{n}.json") for n in ("train", "val", "test")}
  assert all(f"{n}: {p}" in printed for n, p in parts.items())
  full = detection.read_coco(path)
  ids = [set(detection.read_coco(p).image_ids.tolist()) for p in parts.values()]
  assert sum(map(len, ids)) == full.num_images and set.union(*ids) == set(full.image_ids.tolist())
  for k, (name, p) in enumerate(parts.items()):
    report = detection.validate(p)
    assert report.ok, str(report)
    ref = coco_lib.COCO(p)  # pycocotools reads it
    with open(p) as f:
      raw = json.load(f)
    assert raw["info"] == {"year": 2024} and raw["categories"] == json.load(open(path))["categories"]
    # Every annotation of a part's images is in that part.
    assert len(ref.getAnnIds()) == int(np.isin(full.ann_image_ids, list(ids[k])).sum())
    part = detection.read_coco(p)
    for c in range(3):  # images holding class c, per part, near the asked ratio
      total = len(set(full.ann_image[full.ann_class == c].tolist()))
      here = len(set(part.ann_image[part.ann_class == c].tolist()))
      assert abs(here - ratios[k] * total) <= 1.0, (name, c, here, total)
    empty = part.num_images - len(set(part.ann_image.tolist()))
    assert abs(empty - ratios[k] * 10) <= 1.0
  # Same seed, same parts; another seed, other parts.
  again = detection.split_file(path, ratios, 3, str(tmp_path / "again"))
  assert set(detection.read_coco(again["val"]).image_ids.tolist()) == ids[1]
  other = detection.split_file(path, ratios, 4, str(tmp_path / "other"))
  assert set(detection.read_coco(other["val"]).image_ids.tolist()) != ids[1]


def test_split_rejects_bad_ratios(tmp_path):
  path = good(tmp_path)
  with pytest.raises(ValueError, match="sum to 1"):
    detection.split_file(path, (0.5, 0.2, 0.2))
  with pytest.raises(ValueError, match="one distinct name per ratio"):
    detection.split_file(path, (0.5, 0.5), names=("a", "b", "c"))


# ------------------------------------------------------------------------------------------------
# The coco source through the pipeline.


def test_train_batches_keys_shapes_and_queries(tmp_path):
  path = good(tmp_path)
  config = util.make_coco_config(path, path)
  batches = take(input_pipeline.make_train_iterator(config), 3)
  b = batches[0]
  assert set(b) == {"image", "boxes", "box_classes", "query_classes"}
  assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
  assert b["boxes"].shape == (4, 4, 4) and b["boxes"].dtype == np.float32
  assert b["box_classes"].shape == (4, 4) and b["box_classes"].dtype == np.int32
  assert b["query_classes"].shape == (4, 3) and b["query_classes"].dtype == np.int32
  for b in batches:
    for boxes, classes, queries in zip(b["boxes"], b["box_classes"], b["query_classes"]):
      real = classes >= 0
      assert (boxes[~real] == 0).all() and (boxes[real] >= 0).all() and (boxes[real] <= 1).all()
      assert (boxes[real][:, 2:] > 0).all()
      positives = sorted(set(classes[real].tolist()))
      assert queries[:len(positives)].tolist() == positives
      negatives = queries[len(positives):]
      negatives = negatives[negatives >= 0].tolist()
      assert len(negatives) == min(2, 3 - len(positives)) and not set(negatives) & set(positives)
      assert len(set(negatives)) == len(negatives) and all(0 <= q < 3 for q in negatives)


def test_eval_batches_padding_and_pixel_boxes(tmp_path):
  path = good(tmp_path)
  config = util.make_coco_config(path, path)
  ev = input_pipeline.make_eval_data(config)
  batches = list(ev)
  assert ev.num_examples == 4 and len(batches) == ev.num_batches == 2
  b = batches[1]
  assert set(b) == {"image", "boxes", "box_classes", "image_id", "orig_size", "_mask"}
  assert b["image_id"].dtype == np.int64 and b["orig_size"].dtype == np.int32
  assert b["orig_size"].shape == (3, 2) and b["_mask"].tolist() == [True, False, False]
  assert not b["image"][1:].any() and not b["image_id"][1:].any()
  data = detection.read_coco(path)
  seen = []
  for b in batches:
    for k in np.flatnonzero(b["_mask"]):
      i = data.image_ids.tolist().index(b["image_id"][k])
      seen.append(int(b["image_id"][k]))
      assert b["orig_size"][k].tolist() == [data.heights[i], data.widths[i]]
      n = len(data.boxes[i])
      cx, cy, w, h = b["boxes"][k, :n].T
      side = max(data.heights[i], data.widths[i])  # bottom/right padding: one scale for x and y
      xywh = np.stack([cx - w / 2, cy - h / 2, w, h], -1) * side
      np.testing.assert_allclose(xywh, data.boxes[i], atol=1e-4)
      assert b["box_classes"][k].tolist() == data.classes[i].tolist() + [-1] * (4 - n)
      assert not b["boxes"][k, n:].any()
  assert sorted(seen) == [1, 2, 3, 4]


def test_pad_to_square_pixels_exact(tmp_path):
  """A 40x20 and a 20x40 image padded (grey 128) to 40x40 without resizing: the original pixels
  stay where they were, and each white box rectangle is where its box says."""
  path = good(tmp_path)
  config = util.make_coco_config(path, path)
  config.pp.test = "decode|pad_to_square(40, pad_value=0.5)|pad_boxes"
  config.batch_eval = 4
  (b,) = list(input_pipeline.make_eval_data(config))
  root = os.path.dirname(path)
  for k in range(4):
    image_id = int(b["image_id"][k])
    if image_id == 4:  # 30x30: square already, so only resized
      continue
    original = np.asarray(Image.open(os.path.join(root, f"img{image_id}.png")))
    h, w = original.shape[:2]
    np.testing.assert_array_equal(b["image"][k, :h, :w], original)
    assert (b["image"][k, h:] == 128).all() and (b["image"][k, :, w:] == 128).all()
  k = b["image_id"].tolist().index(1)  # 40x20, box [10, 5, 20, 10]
  np.testing.assert_allclose(b["boxes"][k, 0], [20 / 40, 10 / 40, 20 / 40, 10 / 40])
  k = b["image_id"].tolist().index(3)  # 20x40 (portrait), box [2, 10, 14, 20]
  np.testing.assert_allclose(b["boxes"][k, 0], [9 / 40, 20 / 40, 14 / 40, 20 / 40])


def _example(pixels, boxes, classes):
  return {"image": tf.constant(pixels), "boxes": tf.constant(boxes, tf.float32),
          "box_classes": tf.constant(classes, tf.int32)}


def test_flip_boxes_and_pixels():
  pixels = np.zeros((10, 20, 3), np.uint8)
  pixels[2:6, 1:5] = 255  # box y 0.2..0.6, x 0.05..0.25
  op = detection.get_det_flip_lr()
  outcomes = set()
  for s in range(8):
    out = op(_example(pixels, [[0.2, 0.05, 0.6, 0.25]], [1]), tf.constant([s, 0], tf.int64))
    flipped = not np.array_equal(out["image"].numpy(), pixels)
    outcomes.add(flipped)
    if flipped:
      np.testing.assert_array_equal(out["image"].numpy(), pixels[:, ::-1])
      np.testing.assert_allclose(out["boxes"].numpy(), [[0.2, 0.75, 0.6, 0.95]], atol=1e-6)
    else:
      np.testing.assert_allclose(out["boxes"].numpy(), [[0.2, 0.05, 0.6, 0.25]])
  assert outcomes == {True, False}


def test_crop_boxes_cut_box_closed_form():
  # 100x100 image, box pixels y 10..50, x 10..50; window rows 30..100, all columns.
  boxes = tf.constant([[0.1, 0.1, 0.5, 0.5], [0.4, 0.0, 0.9, 1.0], [0.0, 0.0, 0.2, 0.2]])
  out, keep = detection.crop_boxes(boxes, [30, 0], [70, 100], [100, 100], 0.6)
  np.testing.assert_allclose(out.numpy()[:2], [[0, 0.1, 20 / 70, 0.5], [10 / 70, 0, 60 / 70, 1]],
                             atol=1e-6)
  assert keep.numpy().tolist() == [False, True, False]  # keeps 1/2 of its area, all, nothing
  _, keep = detection.crop_boxes(boxes, [30, 0], [70, 100], [100, 100], 0.4)
  assert keep.numpy().tolist() == [True, True, False]


def test_det_crop_boxes_follow_pixels():
  """Wherever the random window falls, a kept box is exactly the white rectangle's extent in the
  cropped image, and a dropped box kept less than min_area_fraction of its pixels."""
  h, w = 30, 40
  pixels = np.zeros((h, w, 3), np.uint8)
  pixels[6:18, 8:28] = 255  # 12 x 20 = 240 pixels
  box = [[6 / h, 8 / w, 18 / h, 28 / w]]
  op = detection.get_det_crop(min_area_fraction=0.5, area_range=(0.2, 1.0))
  kept = dropped = 0
  for s in range(12):
    out = op(_example(pixels, box, [0]), tf.constant([s, 1], tf.int64))
    image = out["image"].numpy()
    white = np.argwhere(image[..., 0] == 255)
    if len(out["boxes"]):
      kept += 1
      ch, cw = image.shape[:2]
      extent = [white[:, 0].min() / ch, white[:, 1].min() / cw, (white[:, 0].max() + 1) / ch,
                (white[:, 1].max() + 1) / cw]
      np.testing.assert_allclose(out["boxes"].numpy()[0], extent, atol=1e-6)
      assert len(white) >= 0.5 * 240 and out["box_classes"].numpy().tolist() == [0]
    else:
      dropped += 1
      assert len(white) < 0.5 * 240 and out["box_classes"].shape == (0,)
  assert kept and dropped


def test_det_queries_more_categories_than_queries():
  op = detection.get_det_queries(max_queries=2, num_negatives=3, num_classes=6)
  boxes = [[0, 0, 0.5, 0.5]] * 4
  for s in range(5):
    out = op(_example(np.zeros((4, 4, 3), np.uint8), boxes, [4, 1, 2, 4]),
             tf.constant([s, 2], tf.int64))
    queries = out["query_classes"].numpy().tolist()
    assert len(queries) == 2 and set(queries) < {1, 2, 4} and queries == sorted(queries)
    classes = out["box_classes"].numpy().tolist()
    assert set(classes) == set(queries) and len(out["boxes"]) == len(classes)
    assert len(classes) == sum(c in queries for c in [4, 1, 2, 4])


def test_same_seed_same_batches_and_resume(tmp_path):
  path = good(tmp_path)
  config = util.make_coco_config(path, path, batch=2)
  run = take(input_pipeline.make_train_iterator(config), 6)  # 3 epochs of 4 images
  for k in (1, 4):
    resumed = next(input_pipeline.make_train_iterator(config, start_step=k))
    for key in run[k]:
      np.testing.assert_array_equal(resumed[key], run[k][key])
  config.seed = 1
  other = take(input_pipeline.make_train_iterator(config), 3)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(run, other))


def test_invalid_file_refused_with_report_or_bad_boxes_dropped(tmp_path):
  def corrupt(d):
    d["annotations"][2].update(bbox=[30, 4, 12, 12])  # outside
    d["annotations"][3].update(category_id=4)  # unknown category
    d["annotations"].append({"id": 15, "image_id": 2, "category_id": 3, "bbox": [1, 1, 0, 3]})
    d["annotations"].append({"id": 16, "image_id": 2, "category_id": 3, "bbox": [1, 1, 3, 3],
                             "iscrowd": 1})
  path = rewrite(good(tmp_path), corrupt)
  config = util.make_coco_config(path, path)
  with pytest.raises(ValueError) as e:
    input_pipeline.make_train_iterator(config)
  message = str(e.value)
  assert "has 3 error(s)" in message and "drop_bad_boxes=True" in message
  assert str(detection.validate(path, check_images=False)).split("\n", 1)[1] in message
  assert "annotation 12 (image 2 'img2.png')" in message
  config.detection.drop_bad_boxes = True
  source = detection.coco_source(config, "train")
  assert source.left_out == {f"bad box dropped ({detection.BOX_OUTSIDE})": 1,
                             f"bad box dropped ({detection.UNKNOWN_CATEGORY})": 1,
                             f"bad box dropped ({detection.BOX_DEGENERATE})": 1,
                             "crowd annotation": 1}
  assert source.num_examples == 4
  config.batch_eval = 4
  (b,) = list(input_pipeline.make_eval_data(config))
  counts = dict(zip(b["image_id"].tolist(), (b["box_classes"] >= 0).sum(1).tolist()))
  assert counts == {1: 2, 2: 0, 3: 1, 4: 0}  # image 2's boxes are all bad or crowd
  assert next(input_pipeline.make_train_iterator(config))["boxes"].shape == (4, 4, 4)
  config.detection.skip_crowd = False
  assert "crowd annotation" not in detection.coco_source(config, "train").left_out


def test_missing_file_refused_or_skipped(tmp_path):
  path = good(tmp_path)
  _remove_file(path)
  config = util.make_coco_config(path, path)
  with pytest.raises(ValueError, match="1 x missing image file.*skip_corrupt=True"):
    detection.coco_source(config, "val")
  config.skip_corrupt = True
  source = detection.coco_source(config, "val")
  assert source.num_examples == 3 and source.left_out == {"undecodable image": 1}


def test_split_slicing_categories_and_pp_checks(tmp_path):
  path = good(tmp_path)
  config = util.make_coco_config(path, path)
  assert detection.categories(config) == ["cat", "dog", "zebra"]
  assert detection.coco_source(config, "train[:50%]").num_examples == 2
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    detection.coco_source(config, "validation")
  other = util.write_coco(tmp_path / "v", IMAGES, ANNS, CATS[:2])
  config.detection.val_json = other
  with pytest.raises(ValueError, match="lists other categories than"):
    input_pipeline.make_eval_data(config)
  config.detection.val_json = path
  config.pp.test = "decode|pad_to_square(16)|normalize('clip')"
  with pytest.raises(ValueError, match="end the box ops with pad_boxes"):
    input_pipeline.make_eval_data(config)
  config.pp.test = "decode|pad_to_square(16)|pad_boxes(3)|normalize('clip')"
  with pytest.raises(ValueError, match="boxes with 3 rows, config.detection.max_boxes=4"):
    input_pipeline.make_eval_data(config)
  config.pp.train = "decode|pad_to_square(16)|pad_boxes|normalize('clip')"
  with pytest.raises(ValueError, match=r"no \['query_classes'\].*det_queries"):
    input_pipeline.make_train_iterator(config)
  config.pp.train = "decode|pad_to_square(16)|pad_boxes|det_flip_lr"
  with pytest.raises(ValueError, match="det_flip_lr must come before pad_boxes"):
    input_pipeline.make_train_iterator(config)


def test_default_pp_strings_parse(tmp_path):
  path = good(tmp_path)
  config = util.make_coco_config(path, path)
  config.pp.train = detection.TRAIN_PP.format(size=16, pad_value=0.0)
  config.pp.test = detection.EVAL_PP.format(size=16, pad_value=0.5)
  assert next(input_pipeline.make_train_iterator(config))["query_classes"].shape == (4, 3)
  assert next(iter(input_pipeline.make_eval_data(config)))["image"].shape == (3, 16, 16, 3)
