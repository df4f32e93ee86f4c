"""COCO-format detection data: reading and checking annotation files, the `coco` source, the
box-aware preprocessing ops, and a CLI to validate and split annotation files.

Files. A COCO json has `images` ({id, file_name, width, height}), `annotations` ({id, image_id,
category_id, bbox: pixel [x, y, w, h], iscrowd}) and `categories` ({id, name}). Categories in id
order get contiguous indices 0..C-1 (`CocoData.category_ids[k]` is index k's COCO id); the TRAIN
json's categories are the class space of every split (`categories(config)`), and another split's
json must list the same ones. `file_name`s are relative to the image root: config.detection.
image_root (val_image_root / test_image_root for those splits), by default the json's directory, or
`<json dir>/images` when the files are there instead.

Source (`config.data_source = "coco"`): split names map to jsons (`train` -> detection.train_json,
`val` -> val_json, `test` -> test_json) and slice like tfds ('train[:90%]'); images are put in a
fixed pseudo-random order (`sources.fixed_order`), so a ratio slice is a stable random part. The
json is validated when the source is built (`validate`, with file existence checks only; decode
errors surface when the pipeline reads the file). Errors refuse the file with a ValueError that
contains the report, unless detection.drop_bad_boxes: then boxes outside the image, degenerate
boxes and boxes of unknown categories are dropped, counted in the log and in `Source.left_out`
(duplicate ids, unknown image ids and missing files still refuse; config.skip_corrupt skips images
whose files are missing or undecodable, as for the other file sources). iscrowd annotations are
dropped with detection.skip_crowd (default), as COCO training does. Images without annotations stay:
their queries are all negatives. A source example is
  {'image': encoded bytes, 'boxes': float32 [n, 4] normalised (y0, x0, y1, x1) of the image,
   'box_classes': int32 [n], 'image_id': int64 [] (the COCO id), 'orig_size': int32 [2] (height,
   width of the file, in pixels, from the json)}.
Boxes become normalised here (divided by the json's width/height, clipped to [0, 1]); inside the
ops they stay normalised (y0, x0, y1, x1) of the current image (TF's convention), and `pad_boxes`,
the last box op, turns them into the model's (cx, cy, w, h) and pads them.

Ops (registered in ops.REGISTRY; the pipeline imports this module before parsing a pp string):

| op (main arguments)                                 | does                                   | kind   |
| --------------------------------------------------- | -------------------------------------- | ------ |
| det_crop(min_area_fraction=0.6, area_range, ...)    | random crop; boxes clipped, small ones | random |
|                                                     | dropped (see get_det_crop)             |        |
| det_flip_lr                                         | mirror image and boxes, p = 1/2        | random |
| pad_to_square(size, pad_value=0.5)                  | pad bottom/right to a square, resize   |        |
| det_queries(max_queries, num_negatives, num_classes)| query_classes int32 [Q]                | random |
| pad_boxes(max_boxes)                                | boxes -> (cx, cy, w, h) [M, 4], pad    |        |

In the pipeline det_queries takes max_queries, num_negatives and num_classes, and pad_boxes takes
max_boxes, from config.detection and the train json unless the pp string gives them. The default
pp strings (TRAIN_PP / EVAL_PP, `.format(size=768, pad_value=0.5)`):
  train: decode|det_crop|det_flip_lr|pad_to_square(S, pad_value=P)|det_queries|pad_boxes
         |normalize('clip')
  eval:  decode|pad_to_square(S, pad_value=P)|pad_boxes|normalize('clip')
(`color_jitter(...)` may go after det_flip_lr; scenic's OWL-ViT training has none.)
Train batches: image float32 [b, S, S, 3], boxes float32 [b, M, 4] (cx, cy, w, h) in [0, 1] of the
padded square, zeros for padding, box_classes int32 [b, M] (-1 padding), query_classes int32
[b, Q] (-1 padding). Eval batches: image, boxes, box_classes, image_id int64 [b], orig_size int32
[b, 2]; the padding is bottom/right, so pixel = normalised * max(height, width).

Padding value: scenic's OWL-ViT trains v1 AND v2 with `resize_with_pad`'s default pad_value=0.5
(grey, images in [0, 1]; configs clip_b32.py and owl_v2_clip_b16.py), and its inference notebook
pads with 0.5; HF's OwlViTImageProcessor (v1) does not pad (it resizes to 768x768, changing the
aspect ratio), and HF's Owlv2ImageProcessor pads with 0.0 (black) before resizing to 960.

CLI: `python -m vit_jax.input_pipeline.detection validate ANN.json [--images DIR]` prints the
report and exits 1 on errors; `... split ANN.json --ratios 0.8,0.1,0.1 [--seed 0] [--out DIR]
[--names train,val,test]` writes class-stratified split jsons.
"""
import argparse
import collections
import dataclasses
import functools
import json
import logging
import math
import os
import struct
import sys

import numpy as np
import tensorflow as tf

from vit_jax.input_pipeline import ops as ops_lib
from vit_jax.input_pipeline import sources

TRAIN_PP = ("decode|det_crop|det_flip_lr|pad_to_square({size}, pad_value={pad_value})|det_queries"
            "|pad_boxes|normalize('clip')")
EVAL_PP = "decode|pad_to_square({size}, pad_value={pad_value})|pad_boxes|normalize('clip')"

# What this module reads from config.detection, with the value it assumes for a missing key.
CONFIG_DEFAULTS = dict(train_json=None, val_json=None, test_json=None, image_root=None,
                       val_image_root=None, test_image_root=None, max_boxes=100, max_queries=100,
                       num_negatives=50, drop_bad_boxes=False, skip_crowd=True)
# Split name -> (json key, image root key); the root falls back to image_root.
SPLIT_KEYS = {"train": ("train_json", "image_root"), "val": ("val_json", "val_image_root"),
              "test": ("test_json", "test_image_root")}

# Validator kinds. Errors:
BOX_OUTSIDE = "box outside the image"
BOX_DEGENERATE = "zero or negative box width/height"
UNKNOWN_CATEGORY = "unknown category id"
UNKNOWN_IMAGE = "annotation of an unknown image id"
DUPLICATE_IMAGE = "duplicate image id"
DUPLICATE_ANNOTATION = "duplicate annotation id"
DUPLICATE_CATEGORY = "duplicate category id"
BAD_IMAGE_SIZE = "image without a positive width/height"
MISSING_FILE = "missing image file"
UNREADABLE_FILE = "unreadable image file"
SIZE_MISMATCH = "image size differs from the file"
# Warnings:
NO_ANNOTATIONS = "image without annotations"
EMPTY_CATEGORY = "category without boxes"
IMBALANCE = "class imbalance"
# Errors that config.detection.drop_bad_boxes turns into dropped boxes.
DROPPABLE = (BOX_OUTSIDE, BOX_DEGENERATE, UNKNOWN_CATEGORY)
# A box may pass the image border by this many pixels (rounding in annotation tools); it is
# clipped to the image when loaded.
BOX_TOLERANCE = 1.0
# Boxes per class: a max/min ratio above this is a warning.
IMBALANCE_WARNING = 10.0
# Issues listed per kind in the printed report.
REPORT_EXAMPLES = 5


# ------------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class CocoData:
  """One COCO json, as arrays. Treat as read-only: `read_coco` caches it.

  Attributes:
    path: the json file.
    image_ids: int64 [N] COCO image ids, in the json's order (duplicates kept, for the validator).
    file_names: N file names, relative to the image root.
    heights, widths: float64 [N] pixel sizes from the json (0 where missing).
    category_ids: int64 [C] sorted distinct category ids; index k is class k.
    category_names: C names.
    duplicate_category_ids: category ids listed more than once (the first entry names the class).
    ann_ids, ann_image_ids, ann_category_ids: int64 [A].
    ann_bbox: float64 [A, 4] pixel (x, y, w, h) as written.
    ann_iscrowd: bool [A].
    ann_image: int64 [A] position of the annotation's image in `image_ids` (the first one with its
      id), -1 for an unknown image id.
    ann_class: int32 [A] class index, -1 for an unknown category id.
  """
  path: str
  image_ids: np.ndarray
  file_names: list
  heights: np.ndarray
  widths: np.ndarray
  category_ids: np.ndarray
  category_names: list
  duplicate_category_ids: list
  ann_ids: np.ndarray
  ann_image_ids: np.ndarray
  ann_category_ids: np.ndarray
  ann_bbox: np.ndarray
  ann_iscrowd: np.ndarray
  ann_image: np.ndarray
  ann_class: np.ndarray

  @property
  def num_images(self) -> int:
    return len(self.image_ids)

  def annotations_of(self, i: int) -> np.ndarray:
    """int [n] indices of image position i's annotations, in the json's order."""
    return np.flatnonzero(self.ann_image == i)

  @property
  def boxes(self) -> list:
    """Per image (json order): float64 [n, 4] pixel (x, y, w, h) of its annotations."""
    return [self.ann_bbox[idx] for idx in self._per_image()]

  @property
  def classes(self) -> list:
    """Per image (json order): int32 [n] class indices (-1: unknown category)."""
    return [self.ann_class[idx] for idx in self._per_image()]

  def _per_image(self) -> list:
    order = np.argsort(self.ann_image, kind="stable")
    bounds = np.searchsorted(self.ann_image[order], np.arange(self.num_images + 1))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def read_coco(path: str) -> CocoData:
  """Reads a COCO json (cached per path and modification time; rewriting the file re-reads it).

  Raises ValueError naming the file, list and key when the json does not have COCO's structure
  (missing `images`/`categories`, an entry without its id, a bbox that is not 4 numbers). What the
  structure allows but is wrong (duplicates, boxes outside, unknown ids) is `validate`'s job.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"COCO annotation file {path} does not exist.")
  st = os.stat(path)
  return _read_coco(path, (st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _read_coco(path: str, stamp) -> CocoData:
  del stamp  # part of the cache key only
  raw = _load_json(path)
  images = _entries(raw, "images", path, required=True)
  anns = _entries(raw, "annotations", path, required=False)  # image-info files have none
  cats = _entries(raw, "categories", path, required=True)

  image_ids = np.array([_int(e, "id", "images", i, path) for i, e in enumerate(images)], np.int64)
  file_names = [_str(e, "file_name", "images", i, path) for i, e in enumerate(images)]
  heights = np.array([_size(e, "height", i, path) for i, e in enumerate(images)], np.float64)
  widths = np.array([_size(e, "width", i, path) for i, e in enumerate(images)], np.float64)

  cat_ids = [_int(e, "id", "categories", i, path) for i, e in enumerate(cats)]
  cat_names = [str(e.get("name", f"category {e['id']}")) for e in cats]
  first_name = {}
  for cid, name in zip(cat_ids, cat_names):
    first_name.setdefault(cid, name)
  dup_cats = sorted(c for c, n in collections.Counter(cat_ids).items() if n > 1)
  category_ids = np.array(sorted(first_name), np.int64)

  ann_ids = np.array([_int(e, "id", "annotations", i, path) for i, e in enumerate(anns)], np.int64)
  ann_image_ids = np.array([_int(e, "image_id", "annotations", i, path)
                            for i, e in enumerate(anns)], np.int64)
  ann_category_ids = np.array([_int(e, "category_id", "annotations", i, path)
                               for i, e in enumerate(anns)], np.int64)
  ann_bbox = np.array([_bbox(e, i, path) for i, e in enumerate(anns)],
                      np.float64).reshape(len(anns), 4)
  ann_iscrowd = np.array([bool(e.get("iscrowd", 0)) for e in anns], bool)

  position = {}
  for i, image_id in enumerate(image_ids.tolist()):
    position.setdefault(image_id, i)
  ann_image = np.array([position.get(i, -1) for i in ann_image_ids.tolist()], np.int64)
  class_of = {c: k for k, c in enumerate(category_ids.tolist())}
  ann_class = np.array([class_of.get(c, -1) for c in ann_category_ids.tolist()], np.int32)
  return CocoData(path, image_ids, file_names, heights, widths, category_ids,
                  [first_name[c] for c in category_ids.tolist()], dup_cats, ann_ids,
                  ann_image_ids, ann_category_ids, ann_bbox, ann_iscrowd, ann_image, ann_class)


def _load_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8-sig") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"COCO annotation file {path} is not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"COCO annotation file {path}: expected a JSON object with keys images, "
                     f"annotations, categories; found a {type(raw).__name__}.")
  return raw


def _entries(raw: dict, key: str, path: str, required: bool) -> list:
  if key not in raw:
    if required:
      raise ValueError(f"COCO annotation file {path}: no {key!r} list (keys: {sorted(raw)}).")
    return []
  value = raw[key]
  if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
    raise ValueError(f"COCO annotation file {path}: {key!r} must be a list of objects.")
  return value


def _int(entry: dict, key: str, where: str, i: int, path: str) -> int:
  value = entry.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
    raise ValueError(f"COCO annotation file {path}: {where}[{i}] has {key}={value!r}, expected "
                     "an integer.")
  return int(value)


def _str(entry: dict, key: str, where: str, i: int, path: str) -> str:
  value = entry.get(key)
  if not isinstance(value, str) or not value:
    raise ValueError(f"COCO annotation file {path}: {where}[{i}] has {key}={value!r}, expected "
                     "a non-empty string.")
  return value


def _size(entry: dict, key: str, i: int, path: str) -> float:
  value = entry.get(key, 0)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"COCO annotation file {path}: images[{i}] has {key}={value!r}, expected a "
                     "number of pixels.")
  return float(value)


def _bbox(entry: dict, i: int, path: str) -> list:
  box = entry.get("bbox")
  if (not isinstance(box, (list, tuple)) or len(box) != 4
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
    raise ValueError(f"COCO annotation file {path}: annotations[{i}] (id {entry.get('id')!r}) "
                     f"has bbox={box!r}, expected 4 numbers [x, y, width, height] in pixels.")
  return [float(v) for v in box]


def resolve_image_root(ann_path: str, image_root: str | None, file_names: list) -> str:
  """Folder that `file_names` are relative to: `image_root` if given, else the json's directory,
  or `<json dir>/images` when more of the first 100 files are found there."""
  if image_root:
    return os.path.abspath(os.path.expanduser(image_root))
  json_dir = os.path.dirname(os.path.abspath(ann_path))
  images_dir = os.path.join(json_dir, "images")
  sample = file_names[:100]

  def found(root):
    return sum(os.path.isfile(os.path.join(root, f)) for f in sample)
  if os.path.isdir(images_dir) and found(images_dir) > found(json_dir):
    return images_dir
  return json_dir


# ------------------------------------------------------------------------------------------------
# Image headers (no decoding: the validator reads the size of every file cheaply).


def read_image_size(path: str) -> tuple[int, int]:
  """(height, width) of a PNG, JPEG, GIF, BMP or WebP file from its header; other formats that
  TF decodes (e.g. JPEG XL) are decoded. Raises ValueError (or OSError) when unreadable."""
  with open(path, "rb") as f:
    head = f.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
      if len(head) < 24 or head[12:16] != b"IHDR":
        raise ValueError("truncated PNG header")
      w, h = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a"):
      _need(head, 10, "GIF")
      w, h = struct.unpack("<HH", head[6:10])
    elif head[:2] == b"BM":
      _need(head, 26, "BMP")
      if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 core header: 16-bit sizes
        w, h = struct.unpack("<HH", head[18:22])
      else:
        w, h = struct.unpack("<ii", head[18:26])
      h = abs(h)  # negative: rows stored top-down
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
      w, h = _webp_size(head)
    elif head[:2] == b"\xff\xd8":
      f.seek(2)
      w, h = _jpeg_size(f)
    else:
      try:
        shape = tf.io.decode_image(tf.io.read_file(path), expand_animations=False).shape
      except (tf.errors.OpError, ValueError) as e:
        raise ValueError(f"not an image TF can decode ({getattr(e, 'message', e)!s:.200})") from e
      h, w = int(shape[0]), int(shape[1])
  if w <= 0 or h <= 0:
    raise ValueError(f"header gives size {w}x{h}")
  return h, w


def _need(head: bytes, n: int, kind: str):
  if len(head) < n:
    raise ValueError(f"truncated {kind} header")


def _webp_size(head: bytes) -> tuple[int, int]:
  _need(head, 30, "WebP")
  chunk = head[12:16]
  if chunk == b"VP8 ":  # lossy: frame tag (3), start code 9d 01 2a, 14-bit width and height
    if head[23:26] != b"\x9d\x01\x2a":
      raise ValueError("bad WebP VP8 start code")
    w, h = struct.unpack("<HH", head[26:30])
    return w & 0x3FFF, h & 0x3FFF
  if chunk == b"VP8L":  # lossless: signature 0x2f, then 14-bit width-1 and height-1
    if head[20] != 0x2F:
      raise ValueError("bad WebP VP8L signature")
    bits = int.from_bytes(head[21:25], "little")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
  if chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
    return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
  raise ValueError(f"unknown WebP chunk {chunk!r}")


# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f) -> tuple[int, int]:
  """Walks the marker segments after SOI up to the start-of-frame, which holds the size."""
  while True:
    byte = f.read(1)
    if not byte:
      raise ValueError("truncated JPEG: no start-of-frame marker")
    if byte != b"\xff":
      continue
    marker = f.read(1)
    while marker == b"\xff":  # fill bytes
      marker = f.read(1)
    if not marker:
      raise ValueError("truncated JPEG: no start-of-frame marker")
    m = marker[0]
    if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
      continue
    if m in (0xD9, 0xDA):
      raise ValueError("JPEG without a start-of-frame marker before its image data")
    length = f.read(2)
    if len(length) < 2:
      raise ValueError("truncated JPEG marker segment")
    if m in _JPEG_SOF:
      frame = f.read(5)
      if len(frame) < 5:
        raise ValueError("truncated JPEG start-of-frame")
      h, w = struct.unpack(">HH", frame[1:5])
      return w, h
    f.seek(struct.unpack(">H", length)[0] - 2, os.SEEK_CUR)


# ------------------------------------------------------------------------------------------------
# Validation.


@dataclasses.dataclass(frozen=True)
class Issue:
  """One problem: `what` names the annotation / image / category (ids and file name)."""
  kind: str
  what: str
  detail: str = ""
  annotation: int | None = None  # index into CocoData.ann_* for box-level problems
  image: int | None = None  # index into CocoData.image_ids for image-level problems


@dataclasses.dataclass
class Report:
  """What `validate` found in one COCO json. `str(report)` is a readable text block.

  Attributes:
    path, images_dir: the json, and the folder its file_names are relative to.
    num_images, num_annotations, num_categories: sizes of the json.
    errors, warnings: issues; the json is fit for training when there are no errors.
    class_counts: {category name: boxes} (crowd boxes included; unknown categories excluded).
    imbalance: max/min boxes per class over the classes that have boxes (None: no boxes).
    files_checked: 'none', 'exist' (existence only) or 'header' (existence and header size).
  """
  path: str
  images_dir: str
  num_images: int
  num_annotations: int
  num_categories: int
  errors: list
  warnings: list
  class_counts: dict
  imbalance: float | None
  files_checked: str = "header"

  @property
  def ok(self) -> bool:
    return not self.errors

  def error_counts(self) -> dict:
    return dict(collections.Counter(e.kind for e in self.errors))

  def __str__(self) -> str:
    checked = {"none": "image files not checked", "exist": "image files checked for existence",
               "header": "image file headers checked"}[self.files_checked]
    lines = [f"COCO annotations {self.path} (images in {self.images_dir}; {checked}): "
             f"{self.num_images} images, {self.num_annotations} annotations, "
             f"{self.num_categories} categories."]
    for title, issues in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
      if not issues:
        lines.append(f"{title}: none.")
        continue
      by_kind = collections.defaultdict(list)
      for issue in issues:
        by_kind[issue.kind].append(issue)
      lines.append(f"{title}: {len(issues)} in {len(by_kind)} kind(s).")
      for kind, group in by_kind.items():
        lines.append(f"  {kind}: {len(group)}")
        for issue in group[:REPORT_EXAMPLES]:
          lines.append(f"    {issue.what}" + (f": {issue.detail}" if issue.detail else ""))
        if len(group) > REPORT_EXAMPLES:
          lines.append(f"    ... and {len(group) - REPORT_EXAMPLES} more")
    counts = ", ".join(f"{name}: {n}" for name, n in self.class_counts.items())
    ratio = "n/a (no boxes)" if self.imbalance is None else f"{self.imbalance:.1f}"
    lines.append(f"Boxes per class ({len(self.class_counts)} classes; imbalance max/min = "
                 f"{ratio}): {counts}")
    return "\n".join(lines)


def validate(ann_path: str, images_dir: str | None = None, check_images: bool = True,
             tolerance: float = BOX_TOLERANCE) -> Report:
  """Checks a COCO json and (with check_images) its image files' existence and header sizes.

  Errors: boxes outside the image (by more than `tolerance` pixels), zero/negative/non-finite box
  width or height, unknown category ids, annotations of unknown image ids, duplicate image /
  annotation / category ids, images without a positive width/height, missing files, unreadable
  files (header), and files whose size differs from the json's. Warnings: images without
  annotations, categories without boxes, a max/min boxes-per-class ratio above IMBALANCE_WARNING.

  Args:
    ann_path: the json.
    images_dir: folder of the file_names; None: `resolve_image_root`'s default.
    check_images: read each image file's header (cheap: no pixel decoding).
    tolerance: pixels a box may pass the image border.
  """
  data = read_coco(ann_path)
  root = resolve_image_root(ann_path, images_dir, data.file_names)
  return _validate(data, root, "header" if check_images else "none", tolerance)


def _validate(data: CocoData, root: str, files: str, tolerance: float = BOX_TOLERANCE) -> Report:
  """validate() on read data; files: 'none', 'exist' or 'header'."""
  errors, warnings = [], []

  def image_name(i):
    return f"image {data.image_ids[i]} {data.file_names[i]!r}"

  def ann_name(a):
    i = data.ann_image[a]
    on = image_name(i) if i >= 0 else f"unknown image {data.ann_image_ids[a]}"
    return f"annotation {data.ann_ids[a]} ({on})"

  for cid in data.duplicate_category_ids:
    errors.append(Issue(DUPLICATE_CATEGORY, f"category {cid}", "listed more than once"))
  for kind, ids, name in ((DUPLICATE_IMAGE, data.image_ids, image_name),
                          (DUPLICATE_ANNOTATION, data.ann_ids, ann_name)):
    seen = {}
    for i, x in enumerate(ids.tolist()):
      if x in seen:
        errors.append(Issue(kind, name(i), f"same id as {name(seen[x])}"))
      else:
        seen[x] = i

  bad_size = ~((data.heights > 0) & (data.widths > 0) & np.isfinite(data.heights)
               & np.isfinite(data.widths))
  for i in np.flatnonzero(bad_size):
    errors.append(Issue(BAD_IMAGE_SIZE, image_name(i), f"width={data.widths[i]:g}, "
                        f"height={data.heights[i]:g} in the json", image=int(i)))

  x, y, w, h = data.ann_bbox.T
  for a in np.flatnonzero(data.ann_image < 0):
    errors.append(Issue(UNKNOWN_IMAGE, ann_name(a), "no image has this id", annotation=int(a)))
  for a in np.flatnonzero(data.ann_class < 0):
    errors.append(Issue(UNKNOWN_CATEGORY, ann_name(a), f"category_id {data.ann_category_ids[a]} "
                        "is not in categories", annotation=int(a)))
  degenerate = ~(np.isfinite(data.ann_bbox).all(1) & (w > 0) & (h > 0))
  for a in np.flatnonzero(degenerate):
    errors.append(Issue(BOX_DEGENERATE, ann_name(a), f"bbox {_fmt(data.ann_bbox[a])}",
                        annotation=int(a)))
  known = (data.ann_image >= 0) & ~degenerate
  img = np.maximum(data.ann_image, 0)
  width, height = data.widths[img], data.heights[img]
  outside = known & ~bad_size[img] & ((x < -tolerance) | (y < -tolerance)
                                      | (x + w > width + tolerance) | (y + h > height + tolerance))
  for a in np.flatnonzero(outside):
    errors.append(Issue(BOX_OUTSIDE, ann_name(a), f"bbox {_fmt(data.ann_bbox[a])} spans x "
                        f"{x[a]:g}..{x[a] + w[a]:g}, y {y[a]:g}..{y[a] + h[a]:g}; the image is "
                        f"{width[a]:g}x{height[a]:g}", annotation=int(a)))

  if files != "none":
    for i, name in enumerate(data.file_names):
      path = os.path.join(root, name)
      if not os.path.isfile(path):
        errors.append(Issue(MISSING_FILE, image_name(i), f"{path} does not exist", image=i))
      elif files == "header":
        try:
          fh, fw = read_image_size(path)
        except (OSError, ValueError, struct.error) as e:
          errors.append(Issue(UNREADABLE_FILE, image_name(i), f"{path}: {e}", image=i))
          continue
        if not bad_size[i] and (fh, fw) != (data.heights[i], data.widths[i]):
          errors.append(Issue(SIZE_MISMATCH, image_name(i), f"the file is {fw}x{fh}, the json "
                              f"says {data.widths[i]:g}x{data.heights[i]:g}", image=i))

  with_annotations = np.zeros(data.num_images, bool)
  with_annotations[data.ann_image[data.ann_image >= 0]] = True
  for i in np.flatnonzero(~with_annotations):
    warnings.append(Issue(NO_ANNOTATIONS, image_name(i), image=int(i)))
  counts = np.bincount(data.ann_class[data.ann_class >= 0], minlength=len(data.category_ids))
  class_counts = dict(zip(data.category_names, counts.tolist()))
  for k in np.flatnonzero(counts == 0):
    warnings.append(Issue(EMPTY_CATEGORY, f"category {data.category_ids[k]} "
                          f"{data.category_names[k]!r}"))
  nonzero = counts[counts > 0]
  imbalance = float(nonzero.max() / nonzero.min()) if nonzero.size else None
  if imbalance is not None and imbalance > IMBALANCE_WARNING:
    most, least = int(np.argmax(counts)), int(np.argmin(np.where(counts > 0, counts, np.inf)))
    warnings.append(Issue(IMBALANCE, f"max/min boxes per class = {imbalance:.1f}",
                          f"{data.category_names[most]!r} has {counts[most]}, "
                          f"{data.category_names[least]!r} has {counts[least]}"))
  return Report(data.path, root, data.num_images, len(data.ann_ids), len(data.category_ids),
                errors, warnings, class_counts, imbalance, files)


def _fmt(box) -> str:
  return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# ------------------------------------------------------------------------------------------------
# The `coco` source.


def _det(config, key: str):
  det = config.get("detection") if hasattr(config, "get") else None
  if det is None:
    raise ValueError("config.data_source='coco' needs config.detection (a ConfigDict with "
                     f"{', '.join(CONFIG_DEFAULTS)}).")
  return det.get(key, CONFIG_DEFAULTS[key])


def categories(config) -> list[str]:
  """Class names (index order) of the train json (config.detection.train_json; without one, the
  val or test json): the class space of every split and of the task's queries."""
  return list(_reference_categories(config)[2])


def _reference_categories(config) -> tuple[str, list, list]:
  """(json path, category ids, names) of the json that defines the classes; see categories()."""
  for key in ("train_json", "val_json", "test_json"):
    path = _det(config, key)
    if path:
      data = read_coco(path)
      return data.path, data.category_ids.tolist(), data.category_names
  raise ValueError("config.detection has no train_json, val_json or test_json: no categories.")


def _split_json(config, name: str) -> tuple[str, str | None]:
  """(json path, image root setting) of a split name."""
  if name not in SPLIT_KEYS:
    raise ValueError(f"COCO source: unknown split {name!r}; split names are {list(SPLIT_KEYS)} "
                     "(config.detection.<name>_json), sliced like 'train[:90%]'.")
  json_key, root_key = SPLIT_KEYS[name]
  path = _det(config, json_key)
  if not path:
    raise ValueError(f"COCO source: split {name!r} needs config.detection.{json_key}.")
  return path, _det(config, root_key) or _det(config, "image_root")


def split_files(config, split: str) -> tuple[str, str]:
  """(json path, resolved image root) of a split string over ONE json ('val', 'train[90%:]'):
  the ground truth that COCO evaluation reads (restricted to the split's image ids)."""
  names = sorted({p.partition("[")[0].strip() for p in split.split("+")})
  if len(names) != 1:
    raise ValueError(f"Split {split!r} spans the jsons of {names}: COCO evaluation needs one "
                     "json per eval split.")
  path, root_setting = _split_json(config, names[0])
  return path, resolve_image_root(path, root_setting, read_coco(path).file_names)


def coco_source(config, split: str) -> sources.Source:
  """COCO jsons of config.detection as a source; see the module docstring."""
  split_names = sorted({p.partition("[")[0].strip() for p in split.split("+")})
  ref_path, ref_ids, ref_names = _reference_categories(config)
  drop_bad, skip_crowd = bool(_det(config, "drop_bad_boxes")), bool(_det(config, "skip_crowd"))
  per_name, wheres = {}, []
  for name in split_names:
    path, root_setting = _split_json(config, name)
    data = read_coco(path)
    root = resolve_image_root(path, root_setting, data.file_names)
    if (data.category_ids.tolist(), data.category_names) != (ref_ids, ref_names):
      raise ValueError(
          f"COCO source: {data.path} (split {name!r}) lists other categories than {ref_path}, "
          f"whose categories are every split's classes: expected (id, name) "
          f"{list(zip(ref_ids, ref_names))[:10]}..., found "
          f"{list(zip(data.category_ids.tolist(), data.category_names))[:10]}...")
    report = _validate(data, root, "exist")
    refused = [e for e in report.errors
               if not (drop_bad and e.kind in DROPPABLE)
               and not (config.skip_corrupt and e.kind == MISSING_FILE)]
    if refused:
      hint = [] if drop_bad else [
          "set config.detection.drop_bad_boxes=True to drop boxes outside the image, degenerate "
          "boxes and boxes of unknown categories"]
      if any(e.kind == MISSING_FILE for e in refused):
        hint.append("set config.skip_corrupt=True to skip images whose files are missing or "
                    "undecodable, or config.detection.image_root to where the images are")
      kinds = collections.Counter(e.kind for e in refused)
      raise ValueError(
          f"COCO source, split {split!r}: {data.path} has {len(refused)} error(s) ("
          + ", ".join(f"{n} x {k}" for k, n in kinds.items()) + "). Fix them (python -m "
          f"vit_jax.input_pipeline.detection validate {data.path} --images {root})"
          + "".join(f"; or {h}" for h in hint) + f".\n{report}")
    per_name[name] = (data, root, report)
    wheres.append(f"{data.path} (images in {root})")
  where = "COCO annotations " + " + ".join(wheres)
  sizes = {name: per_name[name][0].num_images for name in split_names}
  pieces = sources.resolve_split(split, sizes, where)

  left_out = collections.Counter()
  paths, image_ids, orig_sizes, boxes, classes, counts = [], [], [], [], [], []
  for name, a, b in pieces:
    data, root, report = per_name[name]
    bad = np.zeros(len(data.ann_ids), bool)
    for e in report.errors:
      if e.annotation is not None and e.kind in DROPPABLE:
        bad[e.annotation] = True
    usable = (data.ann_image >= 0) & ~bad & ~(data.ann_iscrowd & skip_crowd)
    order = np.argsort(data.ann_image, kind="stable")
    bounds = np.searchsorted(data.ann_image[order], np.arange(data.num_images + 1))
    positions = sources.fixed_order(data.num_images)[a:b]
    chosen = np.zeros(data.num_images, bool)
    chosen[positions] = True
    for e in report.errors:
      if e.annotation is not None and e.kind in DROPPABLE and chosen[data.ann_image[e.annotation]]:
        left_out[f"bad box dropped ({e.kind})"] += 1
    for i in positions.tolist():
      idx = order[bounds[i]:bounds[i + 1]]
      left_out["crowd annotation"] += int((data.ann_iscrowd[idx] & skip_crowd & ~bad[idx]).sum())
      idx = idx[usable[idx]]
      hw = np.array([data.heights[i], data.widths[i]])
      x, y, w, h = data.ann_bbox[idx].T
      yxyx = np.stack([y / hw[0], x / hw[1], (y + h) / hw[0], (x + w) / hw[1]], -1)
      paths.append(os.path.join(root, data.file_names[i]))
      image_ids.append(data.image_ids[i])
      orig_sizes.append(hw)
      boxes.append(np.clip(yxyx, 0.0, 1.0).reshape(-1, 4))
      classes.append(data.ann_class[idx])
      counts.append(len(idx))
  if drop_bad and any(k.startswith("bad box") for k in left_out):
    logging.warning("%s, split %r (config.detection.drop_bad_boxes=True): dropped %s.", where,
                    split, ", ".join(f"{n} x {k}" for k, n in left_out.items()
                                     if k.startswith("bad box")))

  keep = sources.skip_bad_images(config, paths, where, split)
  num_skipped = 0
  if keep is not None and not keep.all():
    num_skipped = int((~keep).sum())
    left_out["undecodable image"] += num_skipped
    pick = lambda xs: [v for v, k in zip(xs, keep) if k]
    paths, image_ids, orig_sizes, boxes, classes, counts = map(
        pick, (paths, image_ids, orig_sizes, boxes, classes, counts))
  max_boxes = _det(config, "max_boxes")
  many = sum(c > max_boxes for c in counts)
  if many:
    logging.warning("%s, split %r: %d images have more than config.detection.max_boxes=%d boxes; "
                    "pad_boxes keeps the first %d of those left after augmentation.", where,
                    split, many, max_boxes, max_boxes)
  left_out = {k: v for k, v in left_out.items() if v}
  logging.info("%s, split %r: %d images, %d boxes, %d classes; left out: %s", where, split,
               len(paths), sum(counts), len(ref_ids), left_out or "nothing")

  starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
  paths_t = tf.constant(paths or [""], tf.string)
  ids_t = tf.constant(np.asarray(image_ids or [0], np.int64))
  sizes_t = tf.constant(np.asarray(orig_sizes or [[0, 0]], np.float64).astype(np.int32))
  boxes_t = tf.constant(np.concatenate(boxes or [np.zeros([0, 4])]).astype(np.float32)
                        .reshape(-1, 4))
  classes_t = tf.constant(np.concatenate(classes or [np.zeros([0])]).astype(np.int32))
  starts_t = tf.constant(starts)

  def records(start, stop):
    return tf.data.Dataset.range(start, stop)

  def load(i):  # reading the file here, after shuffle and skip, keeps those cheap
    a, b = starts_t[i], starts_t[i + 1]
    return {"image": tf.io.read_file(paths_t[i]), "boxes": boxes_t[a:b],
            "box_classes": classes_t[a:b], "image_id": ids_t[i], "orig_size": sizes_t[i],
            "_id": i, "_path": paths_t[i]}

  return sources.Source(f"{where}, split {split!r}", len(paths), records, load,
                        load_batchable=False, image_encoded=True, paths=paths,
                        num_skipped=num_skipped, left_out=left_out,
                        eval_keys=("image_id", "orig_size"))


def op_defaults(config) -> dict:
  """Arguments of det_queries and pad_boxes from config.detection and the train json's classes."""
  return {"det_queries": {"max_queries": _det(config, "max_queries"),
                          "num_negatives": _det(config, "num_negatives"),
                          "num_classes": len(categories(config))},
          "pad_boxes": {"max_boxes": _det(config, "max_boxes")}}


# ------------------------------------------------------------------------------------------------
# Ops. Boxes: float32 [n, 4] normalised (y0, x0, y1, x1) of the current image until pad_boxes.

BOX_KEYS = ("boxes", "box_classes")  # one row per box: filtered together
# Set by pad_boxes, so that a box op after it fails instead of misreading (cx, cy, w, h); the
# pipeline drops '_' keys from batches.
PADDED = "_boxes_padded"


def _boxes(data: dict, op: str) -> tf.Tensor:
  boxes = data["boxes"]
  if boxes.shape.rank != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"{op}: 'boxes' must be float32 [n, 4], got {boxes.dtype.name} "
                     f"{boxes.shape}.")
  if PADDED in data:
    raise ValueError(f"{op} must come before pad_boxes (boxes are then padded (cx, cy, w, h)).")
  return boxes


def _filter_boxes(data: dict, keep: tf.Tensor) -> dict:
  for key in BOX_KEYS:
    if key in data:
      data[key] = tf.boolean_mask(data[key], keep)
  return data


def crop_boxes(boxes: tf.Tensor, begin, size, image_hw, min_area_fraction: float):
  """Boxes of an image -> boxes of its crop window, and which boxes to keep.

  Args:
    boxes: float32 [n, 4] normalised (y0, x0, y1, x1) of the image.
    begin, size: int [2] (top, left) and (height, width) of the window, in pixels.
    image_hw: int [2] the image's (height, width).
    min_area_fraction: a box keeping less than this fraction of its area is dropped (boxes left
      with no area always are).
  Returns:
    (float32 [n, 4] normalised (y0, x0, y1, x1) of the window, clipped to it; bool [n] keep).
  """
  hw = tf.cast(image_hw, tf.float32)
  top_left = tf.cast(begin, tf.float32) / hw
  extent = tf.cast(size, tf.float32) / hw
  offset, scale = tf.tile(top_left, [2]), tf.tile(extent, [2])
  out = tf.clip_by_value((boxes - offset) / scale, 0.0, 1.0)
  old = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  # In the image's units: the window is `extent` of it.
  new = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1]) * extent[0] * extent[1]
  keep = (new > 0) & (new >= min_area_fraction * old)
  return out, keep


@ops_lib.register("det_crop", random=True)
def get_det_crop(min_area_fraction=0.6, area_range=(0.3, 1.0), aspect_ratio_range=(0.75, 1.33),
                 min_object_covered=0.0, max_attempts=100):
  """Random crop (tf.image.stateless_sample_distorted_bounding_box, as scenic's RandomCrop): a
  window of area_range of the image (fractions), aspect (width / height) in aspect_ratio_range,
  covering at least min_object_covered of some box (0: anywhere); the whole image if
  max_attempts fail. Boxes are clipped to the window; those keeping less than min_area_fraction
  of their area (scenic's OWL-ViT: 0.6) are dropped with their classes."""
  if not 0 <= min_area_fraction <= 1:
    raise ValueError(f"min_area_fraction must be in [0, 1], got {min_area_fraction!r}.")
  if not (len(area_range) == 2 and 0 < area_range[0] <= area_range[1] <= 1):
    raise ValueError(f"area_range must be (lo, hi) with 0 < lo <= hi <= 1, got {area_range!r}.")
  if not (len(aspect_ratio_range) == 2 and 0 < aspect_ratio_range[0] <= aspect_ratio_range[1]):
    raise ValueError(f"aspect_ratio_range must be (lo, hi) with 0 < lo <= hi, got "
                     f"{aspect_ratio_range!r}.")

  def _op(data, seed):
    image, boxes = data["image"], _boxes(data, "det_crop")
    shape = tf.shape(image)
    hint = boxes[None] if min_object_covered > 0 else tf.zeros([1, 0, 4], tf.float32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, hint, seed=seed, min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range, area_range=area_range, max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True)
    data["image"] = tf.slice(image, begin, size)
    data["image"].set_shape([None, None, image.shape[-1]])
    data["boxes"], keep = crop_boxes(boxes, begin[:2], size[:2], shape[:2], min_area_fraction)
    return _filter_boxes(data, keep)
  return _op


@ops_lib.register("det_flip_lr", random=True)
def get_det_flip_lr():
  """Mirrors the image and its boxes left-right, with probability 1/2."""
  def _op(data, seed):
    boxes = _boxes(data, "det_flip_lr")
    flip = tf.random.stateless_uniform([], seed) < 0.5
    image = data["image"]
    data["image"] = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    y0, x0, y1, x1 = tf.unstack(boxes, axis=-1)
    flipped = tf.stack([y0, 1.0 - x1, y1, 1.0 - x0], axis=-1)
    data["boxes"] = tf.cond(flip, lambda: flipped, lambda: boxes)
    return data
  return _op


@ops_lib.register("pad_to_square")
def get_pad_to_square(size, pad_value=0.5, method="bilinear", antialias=True):
  """Pads bottom/right to a square with pad_value (in [0, 1] units, x 255 for uint8: 0.5 -> 128),
  then resizes to (size, size); boxes follow. OWL-ViT's preprocessing (see the module docstring
  for who pads with what)."""
  if not (isinstance(size, int) and size > 0):
    raise ValueError(f"size must be a positive int, got {size!r}.")
  if not (isinstance(pad_value, (int, float)) and 0 <= pad_value <= 1):
    raise ValueError(f"pad_value must be in [0, 1], got {pad_value!r}.")

  resize = ops_lib.get_resize(size, method=method, antialias=antialias)

  def _op(data, seed):
    del seed
    image = data["image"]
    hw = tf.shape(image)[:2]
    side = tf.reduce_max(hw)
    fill = round(pad_value * 255) if image.dtype == tf.uint8 else pad_value * 255
    padded = tf.pad(image, [[0, side - hw[0]], [0, side - hw[1]], [0, 0]],
                    constant_values=tf.cast(fill, image.dtype))
    data["image"] = resize({"image": padded}, None)["image"]
    if "boxes" in data:
      boxes = _boxes(data, "pad_to_square")
      scale = tf.cast(hw, tf.float32) / tf.cast(side, tf.float32)
      data["boxes"] = boxes * tf.tile(scale, [2])
    return data
  return _op


@ops_lib.register("det_queries", random=True)
def get_det_queries(max_queries, num_negatives, num_classes):
  """query_classes int32 [max_queries]: the image's categories (distinct, ascending), then up to
  num_negatives random absent categories (as many as fit), -1 padding.

  An image with more than max_queries categories keeps a random max_queries of them, and the
  boxes of the others are DROPPED (a box whose category is not queried has no target).
  """
  for name, v, lo in (("max_queries", max_queries, 1), ("num_negatives", num_negatives, 0),
                      ("num_classes", num_classes, 1)):
    if not (isinstance(v, int) and v >= lo):
      raise ValueError(f"{name} must be an int >= {lo}, got {v!r}.")

  def _op(data, seed):
    _boxes(data, "det_queries")
    classes = data["box_classes"]
    check = tf.debugging.Assert(
        tf.reduce_all((classes >= 0) & (classes < num_classes)),
        [f"det_queries: a box class is outside [0, num_classes={num_classes}):", classes],
        summarize=8)
    with tf.control_dependencies([check]):
      present = tf.zeros([num_classes], tf.bool)
      present = tf.tensor_scatter_nd_update(present, classes[:, None],
                                            tf.ones_like(classes, tf.bool))
    seeds = tf.random.experimental.stateless_split(seed, 2)
    positives = tf.cast(tf.where(present)[:, 0], tf.int32)
    if_many = tf.gather(positives, _permutation(tf.size(positives), seeds[0]))[:max_queries]
    positives = tf.sort(if_many)
    queried = tf.zeros([num_classes], tf.bool)
    queried = tf.tensor_scatter_nd_update(queried, positives[:, None],
                                          tf.ones_like(positives, tf.bool))
    data = _filter_boxes(data, tf.gather(queried, classes))
    absent = tf.cast(tf.where(~present)[:, 0], tf.int32)
    k = tf.minimum(num_negatives, max_queries - tf.size(positives))
    negatives = tf.gather(absent, _permutation(tf.size(absent), seeds[1]))[:k]
    queries = tf.concat([positives, negatives], 0)
    queries = tf.pad(queries, [[0, max_queries - tf.size(queries)]], constant_values=-1)
    data["query_classes"] = tf.ensure_shape(queries, [max_queries])
    return data
  return _op


def _permutation(n, seed) -> tf.Tensor:
  """A uniformly random permutation of range(n), stateless."""
  return tf.cast(tf.argsort(tf.random.stateless_uniform([n], seed)), tf.int32)


@ops_lib.register("pad_boxes")
def get_pad_boxes(max_boxes):
  """Boxes (y0, x0, y1, x1) -> float32 [max_boxes, 4] (cx, cy, w, h), zeros after the n boxes;
  box_classes -> int32 [max_boxes], -1 after them. More than max_boxes: the first max_boxes are
  kept. The last box op: later ones refuse padded boxes."""
  if not (isinstance(max_boxes, int) and max_boxes >= 1):
    raise ValueError(f"max_boxes must be an int >= 1, got {max_boxes!r}.")

  def _op(data, seed):
    del seed
    boxes = _boxes(data, "pad_boxes")[:max_boxes]
    y0, x0, y1, x1 = tf.unstack(boxes, axis=-1)
    cxcywh = tf.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
    pad = max_boxes - tf.shape(cxcywh)[0]
    data["boxes"] = tf.ensure_shape(tf.pad(cxcywh, [[0, pad], [0, 0]]), [max_boxes, 4])
    classes = tf.cast(data["box_classes"][:max_boxes], tf.int32)
    data["box_classes"] = tf.ensure_shape(tf.pad(classes, [[0, pad]], constant_values=-1),
                                          [max_boxes])
    data[PADDED] = tf.constant(True)
    return data
  return _op


# ------------------------------------------------------------------------------------------------
# Splitting a json into class-stratified parts.


def stratified_split(data: CocoData, ratios, seed: int = 0) -> np.ndarray:
  """int [N] part index of each image, so that parts have about `ratios` of the images and of
  every class.

  Images are grouped by their rarest category (the one in the fewest images; images without
  annotations form one more group), each group is shuffled with `seed`, and divided by the ratios;
  what rounding leaves over goes to the part furthest below its share overall, so that one-image
  groups spread by ratio too.
  """
  ratios = np.asarray(ratios, np.float64)
  valid = (data.ann_image >= 0) & (data.ann_class >= 0)
  image_class = np.stack([data.ann_image[valid], data.ann_class[valid]], 1)
  image_class = np.unique(image_class, axis=0).reshape(-1, 2)
  images_per_class = np.bincount(image_class[:, 1], minlength=len(data.category_ids))
  rarest = np.full(data.num_images, -1)
  rarity = np.full(data.num_images, np.iinfo(np.int64).max)
  for i, c in image_class.tolist():  # ascending class: ties go to the lower index
    if images_per_class[c] < rarity[i]:
      rarest[i], rarity[i] = c, images_per_class[c]
  rng = np.random.default_rng(seed)
  part = np.empty(data.num_images, np.int64)
  totals = np.zeros(len(ratios), np.int64)
  # Rarest groups first, while every part still has room for them.
  groups = sorted(set(rarest.tolist()),
                  key=lambda c: (c < 0, images_per_class[c] if c >= 0 else 0, c))
  for c in groups:
    members = rng.permutation(np.flatnonzero(rarest == c))
    n = len(members)
    take = np.floor(ratios * n).astype(np.int64)
    for _ in range(n - take.sum()):
      now = totals + take
      take[np.argmax(ratios * (now.sum() + 1) - now)] += 1
    part[members] = np.repeat(np.arange(len(ratios)), take)
    totals += take
  return part


def split_file(ann_path: str, ratios, seed: int = 0, out_dir: str | None = None,
               names=("train", "val", "test")) -> dict[str, str]:
  """Writes `<out_dir>/<stem>_<name>.json` per part (see stratified_split): its images and their
  annotations, with the input's categories and every other top-level key (info, licenses, ...).
  file_names are kept as written (relative to the input's image root). Returns {name: path}."""
  ratios = [float(r) for r in ratios]
  if len(ratios) != len(names) or len(set(names)) != len(names):
    raise ValueError(f"split: {len(ratios)} ratios for names {list(names)}: need one distinct "
                     "name per ratio.")
  if any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
    raise ValueError(f"split: ratios {ratios} must be >= 0 and sum to 1.")
  data = read_coco(ann_path)
  bad = [e for e in _validate(data, "", "none").errors
         if e.kind in (DUPLICATE_IMAGE, DUPLICATE_CATEGORY)]
  if bad:
    raise ValueError(f"split: {data.path} has duplicate image or category ids (first: "
                     f"{bad[0].what}); an image must be in exactly one part. Fix them first.")
  raw = _load_json(data.path)
  part = stratified_split(data, ratios, seed)
  out_dir = os.path.abspath(out_dir or os.path.dirname(data.path))
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(data.path))[0]
  anns = raw.get("annotations", [])
  written = {}
  for k, name in enumerate(names):
    path = os.path.join(out_dir, f"{stem}_{name}.json")
    if os.path.abspath(path) == data.path:
      raise ValueError(f"split: would overwrite the input {path}; choose other --names or --out.")
    members = set(np.flatnonzero(part == k).tolist())
    out = {key: value for key, value in raw.items() if key not in ("images", "annotations")}
    out["images"] = [e for i, e in enumerate(raw["images"]) if i in members]
    if "annotations" in raw:
      out["annotations"] = [e for a, e in enumerate(anns) if data.ann_image[a] in members]
    with open(path, "w", encoding="utf-8") as f:
      json.dump(out, f)
    written[name] = path
  return written


def split_summary(paths: dict[str, str]) -> str:
  """Per part: images, boxes, and boxes per class, as text."""
  lines = []
  for name, path in paths.items():
    data = read_coco(path)
    counts = np.bincount(data.ann_class[data.ann_class >= 0], minlength=len(data.category_ids))
    lines.append(f"{name}: {path}: {data.num_images} images, {len(data.ann_ids)} boxes; per "
                 "class: " + ", ".join(f"{n}: {c}" for n, c in zip(data.category_names,
                                                                  counts.tolist())))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI.


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vit_jax.input_pipeline.detection",
      description="Check COCO-format detection annotations, or split them into stratified parts.")
  sub = parser.add_subparsers(dest="command", required=True)
  v = sub.add_parser("validate", help="print a report; exit status 1 when it finds errors")
  v.add_argument("annotations", help="COCO json")
  v.add_argument("--images", default=None,
                 help="folder of the file_names (default: the json's folder, or its images/)")
  v.add_argument("--no-check-images", action="store_true",
                 help="do not open the image files (existence and header size)")
  s = sub.add_parser("split", help="write class-stratified part jsons")
  s.add_argument("annotations", help="COCO json")
  s.add_argument("--ratios", default="0.8,0.1,0.1", help="comma-separated, summing to 1")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--out", default=None, help="output folder (default: the json's folder)")
  s.add_argument("--names", default="train,val,test", help="part names, one per ratio")
  args = parser.parse_args(argv)
  try:
    if args.command == "validate":
      report = validate(args.annotations, args.images, check_images=not args.no_check_images)
      print(report)
      return 0 if report.ok else 1
    ratios = [float(r) for r in args.ratios.split(",")]
    paths = split_file(args.annotations, ratios, args.seed, args.out,
                       [n.strip() for n in args.names.split(",")])
    print(split_summary(paths))
    json_dir = os.path.dirname(os.path.abspath(args.annotations))
    if args.out and os.path.abspath(args.out) != json_dir:
      print(f"file_names are relative to the input's image root: set config.detection.image_root "
            f"(default: {json_dir}) when the jsons are used from {os.path.abspath(args.out)}.")
    return 0
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
