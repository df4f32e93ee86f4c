"""Data sources: where examples come from, as light records that a later `load` turns into examples.

Every source resolves a tfds-style split string ('train', 'train[:98%]', 'train[10:20]+test') to a
fixed order of `num_examples` positions. `records(start, stop)` gives positions [start, stop) in that
order as cheap records (an index, a path, a raw tfds example), so that shuffling and resume-skipping
touch no pixels; `load(record)` then gives {'image': uint8 [h, w, c] or encoded bytes, 'label': int64}
or, for caption sources, {'image', 'texts': string [k]} (an image's k >= 1 captions; see captions.py
for the caption files and folders, and for how the pipeline picks or pads them), or, for COCO
detection jsons, {'image', 'boxes', 'box_classes', 'image_id', 'orig_size'} (see detection.py).
"""
import csv
import dataclasses
import functools
import gzip
import json
import logging
import os
import re
import types
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Where `data_source='idx'` looks when `config.data_dir` is unset (Debian's dataset-fashion-mnist).
DEFAULT_IDX_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
# MNIST-format file prefix per split name.
IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
# Fixed (not config.seed) so that a ratio split like 'train[:90%]' of an image folder is the same
# partition for every run and seed.
FOLDER_ORDER_SEED = 0


@dataclasses.dataclass
class Source:
  """One split of one dataset, in a fixed order.

  Attributes:
    description: names dataset, source kind, location and split, for error messages.
    num_examples: examples in the whole split.
    records: (start, stop) -> tf.data.Dataset of records at split positions [start, stop).
    load: record -> {'image', 'label', '_id'}; works on one record, and on a batch of records when
      `load_batchable` (then the pipeline loads after batching, which vectorises it).
    load_batchable: see `load`.
    image_encoded: whether 'image' is encoded bytes (a `decode` op is then needed).
    paths: the split's files in order (file sources only), for finding corrupt files.
    num_skipped: examples left out (corrupt files, or missing captions, with config.skip_corrupt).
    captions: examples have 'texts' string [k] instead of 'label'.
    num_captions: int [num_examples], captions per example, where known before reading (files).
    left_out: {why: how many} of what the source did not make examples of (skipped images and
      captions, caption files without an image, dropped boxes), as logged.
    eval_keys: keys of `load`'s examples that eval batches keep and training batches drop (COCO:
      'image_id', 'orig_size', which map predictions back to the file).
  """
  description: str
  num_examples: int
  records: Callable[[int, int], tf.data.Dataset]
  load: Callable[[dict], dict]
  load_batchable: bool
  image_encoded: bool
  paths: list | None = None
  num_skipped: int = 0
  captions: bool = False
  num_captions: np.ndarray | None = None
  left_out: dict[str, int] = dataclasses.field(default_factory=dict)
  eval_keys: tuple[str, ...] = ()


def resolve_split(split: str, sizes: dict[str, int], where: str) -> list[tuple[str, int, int]]:
  """Split string -> [(split_name, from, to)] absolute ranges, with tfds's slicing semantics.

  Args:
    split: e.g. 'train[:98%]', 'train[10:20]+test'.
    sizes: examples per named split of the dataset.
    where: names the dataset, for the error message.
  """
  try:
    instruction = tfds.core.ReadInstruction.from_spec(split)
    infos = {k: types.SimpleNamespace(num_examples=n, shard_lengths=[n]) for k, n in sizes.items()}
    absolute = instruction.to_absolute(infos)
  except (ValueError, NotImplementedError) as e:
    raise ValueError(f"{where}: cannot read split {split!r} (splits and sizes: {sizes}): {e}") from e
  return [(a.splitname, a.from_ or 0, sizes[a.splitname] if a.to is None else a.to)
          for a in absolute]


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous shard [start, stop) of positions read by one process; sizes differ by at most 1."""
  return (num_examples * process_index // process_count,
          num_examples * (process_index + 1) // process_count)


SOURCE_KINDS = ("tfds", "idx", "folder", "csv", "jsonl", "caption_folder", "caption_csv",
                "caption_jsonl", "coco")


def get_source(config, split: str) -> Source:
  """The source named by `config.data_source` for `split`."""
  kind = config.data_source
  if kind == "tfds":
    return tfds_source(config, split)
  if kind == "idx":
    return idx_source(config, split)
  if kind == "folder":
    return folder_source(config, split)
  if kind in ("csv", "jsonl"):
    return listing_source(config, split)
  if kind.startswith("caption_") and kind in SOURCE_KINDS:
    # Imported here: captions builds on this module's helpers.
    from vit_jax.input_pipeline import captions  # pylint: disable=g-import-not-at-top
    if kind == "caption_folder":
      return captions.caption_folder_source(config, split)
    return captions.caption_listing_source(config, split)
  if kind == "coco":  # detection data (detection.py), imported here as captions is
    from vit_jax.input_pipeline import detection  # pylint: disable=g-import-not-at-top
    return detection.coco_source(config, split)
  raise ValueError(f"config.data_source={kind!r}: expected one of {', '.join(SOURCE_KINDS)}.")


def _check_labels(labels: np.ndarray, num_classes: int, where: str, names=None):
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = bad[0]
    at = f" ({names[i]})" if names is not None else f" (example {i})"
    raise ValueError(f"{where}: label {labels[i]}{at} is outside [0, num_classes={num_classes}); "
                     f"{bad.size} labels are out of range.")


# ------------------------------------------------------------------------------------------------
# tfds


def tfds_source(config, split: str) -> Source:
  """Any tfds image-classification dataset with features 'image' and 'label', read from
  `config.tfds_data_dir`. Downloads only when `config.tfds_download` is set.

  With `config.caption_key` set (e.g. 'captions/text' for coco_captions; '/' walks nested features
  and sequences), an image-caption dataset instead: 'image' and 'texts' string [k], no 'label'.
  """
  name = config.dataset
  builder = tfds.builder(name, data_dir=config.tfds_data_dir)
  where = f"tfds dataset {name!r} in {builder.data_dir!r}"
  if not builder.is_prepared():
    if not config.tfds_download:
      raise FileNotFoundError(
          f"{where} is not prepared (no dataset_info.json there). Set config.tfds_data_dir to where "
          f"it is, or config.tfds_download=True to download and prepare it.")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=config.tfds_manual_dir))
  features = builder.info.features
  caption_key = config.caption_key
  for key in ("image",) + (() if caption_key else ("label",)):
    if key not in features:
      raise ValueError(f"{where}: expected features 'image' and 'label', found {list(features)}.")
  if caption_key:
    _check_text_feature(features, caption_key, where)
  data_classes = None if caption_key else getattr(features["label"], "num_classes", None)
  if data_classes is not None and data_classes > config.num_classes:
    raise ValueError(f"{where}: the dataset has {data_classes} classes but "
                     f"config.num_classes={config.num_classes}.")
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  pieces = resolve_split(split, sizes, where)
  total = sum(b - a for _, a, b in pieces)
  encoded = isinstance(features["image"], tfds.features.Image)

  def records(start, stop):
    parts, offset = [], 0
    for name_, a, b in pieces:
      lo, hi = max(a, a + start - offset), min(b, a + stop - offset)
      if lo < hi:
        parts.append(tfds.core.ReadInstruction(name_, from_=lo, to=hi, unit="abs"))
      offset += b - a
    if not parts:  # this process has no examples; keep the element structure
      parts, stop = [tfds.core.ReadInstruction(pieces[0][0], from_=0, to=1, unit="abs")], start
    ds = builder.as_dataset(
        split=functools.reduce(lambda x, y: x + y, parts), shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()} if encoded else None,
        read_config=tfds.ReadConfig(try_autocache=False))
    if caption_key:
      ds = ds.map(lambda ex: {"image": ex["image"],
                              "texts": tf.reshape(_nested(ex, caption_key), [-1])})
    else:
      ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})
    return tf.data.Dataset.zip(tf.data.Dataset.range(start, stop), ds).map(
        lambda i, ex: {**ex, "_id": i})

  return Source(f"{where}, split {split!r}", total, records, lambda r: r,
                load_batchable=True, image_encoded=encoded, captions=bool(caption_key))


def _check_text_feature(features, key: str, where: str):
  """Raises unless `key` ('a/b': nested) names a text feature, of one or a sequence of strings."""
  feature, path = features, []
  for part in key.split("/"):
    while isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    names = list(feature.keys()) if isinstance(feature, tfds.features.FeaturesDict) else []
    if part not in names:
      at = "/".join(path) or "the top level"
      raise ValueError(f"{where}: config.caption_key={key!r}: no feature {part!r} at {at}; "
                       f"found {names}.")
    feature, path = feature[part], path + [part]
  while isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  dtype = getattr(feature, "tf_dtype", None)
  if dtype != tf.string:
    raise ValueError(f"{where}: config.caption_key={key!r} is a {type(feature).__name__} of "
                     f"{getattr(dtype, 'name', dtype)}, expected text (strings).")


def _nested(example: dict, key: str):
  for part in key.split("/"):
    example = example[part]
  return example


# ------------------------------------------------------------------------------------------------
# idx (MNIST format)


def _read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads an MNIST-format idx file of unsigned bytes (gzip or plain) and checks its header.

  Returns:
    uint8 array with the `ndim` dims of the header ([n, rows, cols] or [n]).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"idx file {path} does not exist.")
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"idx file {path} is corrupt or truncated: {e}") from e
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"idx file {path} is truncated: {len(raw)} bytes, a header needs {4 + 4 * ndim}.")
  magic = int.from_bytes(raw[:4], "big")
  expected_magic = 0x0800 + ndim  # 2 zero bytes, 0x08 = unsigned byte, number of dims
  if magic != expected_magic:
    raise ValueError(f"idx file {path} is corrupt: magic number 0x{magic:08x}, expected "
                     f"0x{expected_magic:08x} (unsigned bytes, {ndim} dims).")
  dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(np.int64)
  body = len(raw) - 4 - 4 * ndim
  if body != int(np.prod(dims)):
    raise ValueError(f"idx file {path} is {'truncated' if body < np.prod(dims) else 'corrupt'}: "
                     f"header dims {dims.tolist()} need {int(np.prod(dims))} data bytes, "
                     f"found {body}.")
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_idx_split(data_dir: str, split_name: str, mtime_key) -> tuple[np.ndarray, np.ndarray]:
  """images uint8 [n, rows, cols, 1], labels int64 [n] of one named split; cached per process."""
  del mtime_key  # only part of the cache key, so a rewritten file is read again
  prefix = IDX_SPLIT_PREFIX[split_name]
  paths = [_idx_path(data_dir, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
  images = _read_idx(paths[0], 3)[..., None]
  labels = _read_idx(paths[1], 1).astype(np.int64)
  if len(images) != len(labels):
    raise ValueError(f"idx files {paths[0]} and {paths[1]} disagree: {len(images)} images, "
                     f"{len(labels)} labels.")
  return images, labels


def load_idx_split(data_dir: str, split_name: str) -> tuple[np.ndarray, np.ndarray]:
  """images uint8 [n, rows, cols, 1], labels int64 [n] of split 'train' or 'test' of MNIST-format
  files in `data_dir`."""
  if split_name not in IDX_SPLIT_PREFIX:
    raise ValueError(f"idx split {split_name!r}: expected one of {list(IDX_SPLIT_PREFIX)}.")
  return _load_idx_split(data_dir, split_name, None)


def _idx_path(data_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    if os.path.exists(os.path.join(data_dir, name)):
      return os.path.join(data_dir, name)
  return os.path.join(data_dir, stem + ".gz")  # missing: _read_idx names it


def idx_source(config, split: str) -> Source:
  """MNIST-format `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` files in `config.data_dir`
  (default for fashion_mnist: Debian's /usr/share/datasets/fashion-mnist); split names 'train',
  'test'. Yields uint8 [rows, cols, 1] images, already decoded."""
  data_dir = config.data_dir or DEFAULT_IDX_DIRS.get(config.dataset)
  if data_dir is None:
    raise ValueError(f"config.data_dir is not set, and dataset {config.dataset!r} has no default "
                     f"idx directory (known: {DEFAULT_IDX_DIRS}).")
  where = f"idx dataset {config.dataset!r} in {data_dir}"
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"{where}: directory {data_dir} does not exist.")

  def sizes_of(name):  # images are needed anyway, and reading the header alone saves little
    return len(load(name)[1])

  def load(name):
    files = [_idx_path(data_dir, f"{IDX_SPLIT_PREFIX[name]}-{k}-ubyte")
             for k in ("images-idx3", "labels-idx1")]
    key = tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in files)
    return _load_idx_split(data_dir, name, key)

  names = {p.partition("[")[0].strip() for p in split.split("+")}
  if not names <= set(IDX_SPLIT_PREFIX):
    raise ValueError(f"{where}: unknown split {split!r}; idx splits are {list(IDX_SPLIT_PREFIX)} "
                     f"(slicing like 'train[:98%]' works).")
  sizes = {name: sizes_of(name) for name in sorted(names)}
  pieces = resolve_split(split, sizes, where)
  images = np.concatenate([load(n)[0][a:b] for n, a, b in pieces])
  labels = np.concatenate([load(n)[1][a:b] for n, a, b in pieces])
  _check_labels(labels, config.num_classes, where)
  images_t, labels_t = tf.constant(images), tf.constant(labels)

  def load_record(i):  # i: int64 [] or [batch]
    return {"image": tf.gather(images_t, i), "label": tf.gather(labels_t, i), "_id": i}

  return Source(f"{where}, split {split!r}", len(labels),
                lambda start, stop: tf.data.Dataset.range(start, stop), load_record,
                load_batchable=True, image_encoded=False)


# ------------------------------------------------------------------------------------------------
# Image files: a folder per class, or a CSV / JSONL listing.


def fixed_order(n: int) -> np.ndarray:
  """The fixed pseudo-random permutation of n sorted files (seed FOLDER_ORDER_SEED, not
  config.seed), so that a ratio split like 'train[:90%]' of a folder mixes its sub-folders and is
  the same partition for every run and seed."""
  return np.random.default_rng(FOLDER_ORDER_SEED).permutation(n)


def split_roots(root: str) -> dict[str, str]:
  """{split name: folder}: root's sub-folders train/, val/, validation/, test/, valid/ if it has
  any, else {'train': root} (one split, to slice by ratio)."""
  subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  split_names = [d for d in subdirs if d in ("train", "val", "validation", "test", "valid")]
  if split_names:
    return {d: os.path.join(root, d) for d in split_names}
  return {"train": root}


def skip_bad_images(config, paths: list[str], where: str, split: str) -> np.ndarray | None:
  """With config.skip_corrupt: bool [len(paths)], False for files that cannot be read or decoded
  (logged and counted); without it, None (a bad file then raises when read, naming it)."""
  if not config.skip_corrupt:
    return None
  # Checked up front (one decode pass), so that the stream of good files, and with it the data
  # order and resume, stays a pure function of the seed.
  bad = find_bad_images(paths)
  if bad:
    logging.warning("%s, split %r: skipping %d of %d images that cannot be read or decoded "
                    "(config.skip_corrupt=True): %s", where, split, len(bad), len(paths),
                    "; ".join(f"{p}: {e}" for p, e in bad[:20]) + (" ..." if len(bad) > 20 else ""))
  bad_paths = {p for p, _ in bad}
  return np.array([p not in bad_paths for p in paths], bool)


def _file_source(config, split: str, where: str, sizes: dict[str, int],
                 listing: Callable[[str], tuple[list[str], list[int]]]) -> Source:
  """Common part of the folder and listing sources: paths and labels -> records and load."""
  pieces = resolve_split(split, sizes, where)
  paths, labels = [], []
  for name, a, b in pieces:
    p, l = listing(name)
    paths += p[a:b]
    labels += l[a:b]
  labels = np.asarray(labels, np.int64)
  _check_labels(labels, config.num_classes, where, names=paths)
  keep = skip_bad_images(config, paths, where, split)
  num_skipped = 0 if keep is None else int((~keep).sum())
  if num_skipped:
    paths, labels = [p for p, k in zip(paths, keep) if k], labels[keep]
  paths_t, labels_t = tf.constant(paths or [""], tf.string), tf.constant(labels.tolist() or [0],
                                                                         tf.int64)

  def records(start, stop):
    return tf.data.Dataset.range(start, stop)

  def load(i):  # reading the file here, after shuffle and skip, keeps those cheap
    path = tf.gather(paths_t, i)
    return {"image": tf.io.read_file(path), "label": tf.gather(labels_t, i), "_id": i,
            "_path": path}

  return Source(f"{where}, split {split!r}", len(paths), records, load, load_batchable=False,
                image_encoded=True, paths=paths, num_skipped=num_skipped)


def _list_images(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _folder_classes(roots: dict[str, str]) -> list[str]:
  """The class-folder names over all split sub-folders, sorted: class id k is the k-th."""
  return sorted({c for r in roots.values() for c in os.listdir(r)
                 if os.path.isdir(os.path.join(r, c))})


def folder_source(config, split: str) -> Source:
  """Images in `config.data_dir/CLASS/*.jpg` (one split, 'train', to slice by ratio such as
  'train[:90%]'), or in `config.data_dir/SPLIT/CLASS/*.jpg` (sub-folders train/, val/, ...).

  Class ids are the sorted class-folder names (over all split sub-folders). Files are put in a fixed
  pseudo-random order (`fixed_order`) so that a ratio split mixes classes.
  """
  root = config.data_dir
  where = f"image folder {root}"
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"{where}: directory does not exist (config.data_dir={root!r}).")
  roots = split_roots(root)
  classes = _folder_classes(roots)
  if not classes:
    raise ValueError(f"{where}: no class sub-folders in {sorted(roots.values())}.")

  @functools.lru_cache(None)
  def listing(name):
    r = roots[name]
    items = [(p, k) for k, c in enumerate(classes) if os.path.isdir(os.path.join(r, c))
             for p in _list_images(os.path.join(r, c))]
    order = fixed_order(len(items))
    return [items[i][0] for i in order], [items[i][1] for i in order]

  sizes = {name: len(listing(name)[0]) for name in roots}
  logging.info("%s: %d classes, split sizes %s", where, len(classes), sizes)
  return _file_source(config, split, where, sizes, listing)


def _numeric(labels) -> bool:
  return all(l.lstrip("-").isdigit() for l in labels)


def _listing_labels(path: str) -> list[str]:
  """The label column of a csv / jsonl listing (class names or integer ids, as strings)."""
  with open(path) as f:
    if path.endswith(".csv"):
      return [str(r.get("label", "")).strip() for r in csv.DictReader(f)]
    return [str(json.loads(line).get("label", "")).strip() for line in f if line.strip()]


def listing_source(config, split: str) -> Source:
  """`config.data_dir/SPLIT.csv` (header with columns path,label) or `SPLIT.jsonl` (one
  {"path": ..., "label": ...} per line). Paths are relative to the listing's folder; labels are
  integer ids, or class names (then ids are the sorted names). The listing's order is kept."""
  root, ext = config.data_dir, config.data_source
  where = f"{ext} listing in {root}"
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"{where}: directory does not exist (config.data_dir={root!r}).")
  names = sorted(f[:-len(ext) - 1] for f in os.listdir(root) if f.endswith("." + ext))

  @functools.lru_cache(None)
  def rows(name):
    path = os.path.join(root, f"{name}.{ext}")
    with open(path) as f:
      if ext == "csv":
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
          raise ValueError(f"{path}: expected a header with columns path,label, found "
                           f"{reader.fieldnames}.")
        out = [(r["path"], r["label"], f"{path}:{n + 2}") for n, r in enumerate(reader)]
      else:
        out = []
        for n, line in enumerate(f):
          if not line.strip():
            continue
          try:
            r = json.loads(line)
            out.append((r["path"], r["label"], f"{path}:{n + 1}"))
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n + 1}: expected a JSON object with keys path, label "
                             f"({e!r}).") from e
    return [(os.path.join(root, p), str(l).strip(), at) for p, l, at in out]

  all_labels = {l for n in names for _, l, _ in rows(n)}
  numeric = _numeric(all_labels)
  class_ids = None if numeric else {c: k for k, c in enumerate(sorted(all_labels))}

  def listing(name):
    r = rows(name)
    return [p for p, _, _ in r], [int(l) if numeric else class_ids[l] for _, l, _ in r]

  sizes = {n: len(rows(n)) for n in names}
  return _file_source(config, split, where, sizes, listing)


def _op_error(e: Exception) -> str:
  """TF's message without its '{{function_node ...}}' prefix and '[Op:...]' suffix."""
  text = getattr(e, "message", str(e)).strip().splitlines()[0]
  text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
  return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text) or "unreadable"


def find_bad_images(paths: list[str], channels: int = 3) -> list[tuple[str, str]]:
  """[(path, error)] of the files that cannot be read or decoded as images, checked in tf.data."""
  ids = tf.data.Dataset.range(len(paths))
  paths_t = tf.constant(paths or [""])

  def check(i):
    img = tf.io.decode_image(tf.io.read_file(paths_t[i]), channels=channels,
                             expand_animations=False)
    return i, tf.shape(img)[0]
  good = {int(i) for i, _ in ids.map(check, num_parallel_calls=tf.data.AUTOTUNE)
          .ignore_errors().as_numpy_iterator()}
  bad = []
  for i in sorted(set(range(len(paths))) - good):
    try:  # again, eagerly, for the error message
      tf.io.decode_image(tf.io.read_file(paths[i]), channels=channels, expand_animations=False)
      bad.append((paths[i], "unknown error"))
    except (tf.errors.OpError, ValueError) as e:
      bad.append((paths[i], _op_error(e)))
  return bad


def class_names(config) -> list[str] | None:
  """Class names in label order, from where the data says them: tfds label names, image-folder
  names, the names in csv / jsonl listings, the built-in lists of `ops.CLASSNAMES` (idx data);
  None when the data has none (integer labels) or cannot be reached (predicting away from it)."""
  kind, root = config.data_source, config.get("data_dir")
  try:
    if kind == "tfds":
      builder = tfds.builder(config.dataset, data_dir=config.tfds_data_dir)
      features = builder.info.features if builder.is_prepared() else {}
      label = features["label"] if "label" in features else None
      return list(label.names) if getattr(label, "names", None) else None
    if kind == "folder" and root and os.path.isdir(root):
      return _folder_classes(split_roots(root)) or None
    if kind in ("csv", "jsonl") and root and os.path.isdir(root):
      labels = {l for f in os.listdir(root) if f.endswith("." + kind)
                for l in _listing_labels(os.path.join(root, f))}
      return None if not labels or _numeric(labels) else sorted(labels)
  except (OSError, ValueError, tfds.core.registered.DatasetNotFoundError) as e:
    logging.warning("No class names from %s data in %s: %s", kind, root, e)
    return None
  from vit_jax.input_pipeline import ops  # pylint: disable=g-import-not-at-top
  names = ops.CLASSNAMES.get(config.dataset)
  return list(names) if names else None
