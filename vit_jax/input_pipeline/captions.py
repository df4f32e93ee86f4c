"""Image-caption data: caption files and folders as sources, and how an image's captions become the
`texts` of a training example (one, chosen with its seed) or of an eval example (all, padded).

Sources (`config.data_source`), each giving {'image': encoded bytes, 'texts': string [k]}:
- caption_csv: `data_dir/SPLIT.csv`, header with columns path,caption; one row per caption.
- caption_jsonl: `data_dir/SPLIT.jsonl`, lines {"path": ..., "caption": "..."} or
  {"path": ..., "captions": ["...", ...]}.
  In both, paths are relative to data_dir, rows with the same path are one image with several
  captions (in the order they appear), and images keep the order of their first row.
- caption_folder: any tree of images under `data_dir` (or under its train/, val/, test/ ...
  sub-folders, one split each), each with a same-name `.txt` whose first line is the caption (later
  lines are ignored: Tux Paint keeps translations there). Images are put in a fixed pseudo-random
  order (`sources.fixed_order`), so `train[:90%]` / `train[90%:]` is a stable held-out split.
  A `.txt` with no decodable image beside it (e.g. an `.svg` only) is not an example; those are
  counted in the log.
The tfds source reads caption datasets too (`config.caption_key`), and the `class_caption` op makes
captions from class names (ops.py).

Debian's tuxpaint-stamps-default (/usr/share/tuxpaint/stamps, caption_folder with skip_corrupt):
785 image-caption pairs; 17 PNGs without a caption of their own (mostly NAME_mirror.png variants)
are skipped, and 165 caption files beside an .svg only and 2 without any image are no examples.
Its PNGs are RGBA, gray+alpha or palette+tRNS cut-outs: `decode` composites them on white (with
alpha dropped, as before, the surroundings came out black, white or another colour by file).

Bad data raises a ValueError naming the file (and line): an image without a caption file, an empty
caption, an unreadable caption file, an image that cannot be decoded. With config.skip_corrupt, bad
captions and then images left with none (or undecodable) are skipped instead, and counted in the
log and in `Source.num_skipped`. A split's partition is computed over all its images, before any
skipping, so fixing or skipping a file never moves other images between splits.
"""
import collections
import csv
import json
import logging
import os

import numpy as np
import tensorflow as tf

from vit_jax.input_pipeline import sources

# Folded into the example's seed for the choice of its training caption; op seeds are folded with
# the op's position in the pp string (small numbers), so this stays clear of them.
CAPTION_SEED_TAG = 1 << 30
# Keys that hold one row per caption; the pipeline selects or pads them together. 'tokens' is
# among them in case `tokenize` runs per example (before the selection) rather than on batches.
CAPTION_KEYS = ("texts", "tokens")
# Besides sources.IMAGE_EXTENSIONS: image formats whose caption files are counted, not read.
UNDECODED_EXTENSIONS = (".svg", ".svgz", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------
# Train and eval captions (applied by the pipeline after per-example ops, before batching).


def _where(data: dict):
  """A tensor naming the example for error messages: its file if it has one, else its position."""
  if "_path" in data:
    return data["_path"]
  return tf.strings.as_string(data["_id"]) if "_id" in data else tf.constant("?")


def _caption_rows(data: dict) -> tuple[list[str], tf.Tensor]:
  """(keys with one row per caption, k) for an example whose 'texts' is string [k]."""
  texts = data["texts"]
  if texts.dtype != tf.string or texts.shape.rank != 1:
    raise ValueError(f"'texts' must be a string [k] (an image's captions) or a string scalar, got "
                     f"{texts.dtype.name} of shape {texts.shape}.")
  keys = [k for k in CAPTION_KEYS if k in data]
  return keys, tf.shape(texts)[0]


def sample_caption(data: dict, seed) -> dict:
  """Training: 'texts' string [k] -> one caption [], uniform over the k with the example's seed
  (the stream position's, so a caption is chosen afresh each epoch and identically on resume).
  A scalar 'texts' is kept. Rows of 'tokens', if already there, follow the choice."""
  if data["texts"].shape.rank == 0:
    return data
  keys, k = _caption_rows(data)
  check = tf.debugging.Assert(k > 0, ["an example has no caption:", _where(data)])
  with tf.control_dependencies([check]):
    i = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(seed, CAPTION_SEED_TAG), 0, k, tf.int32)
  return {**data, **{key: tf.gather(data[key], i) for key in keys}}


def pad_captions(data: dict, max_captions: int) -> dict:
  """Evaluation: 'texts' string [k] (or []) -> [max_captions], padded with '' after the k
  captions, and 'texts_mask' bool [max_captions] (True for the k). More than max_captions is an
  error: every caption must reach the retrieval metrics."""
  if data["texts"].shape.rank == 0:
    data = {**data, "texts": data["texts"][None]}
    if "tokens" in data:
      data["tokens"] = data["tokens"][None]
  keys, k = _caption_rows(data)
  checks = [
      tf.debugging.Assert(k > 0, ["an example has no caption:", _where(data)]),
      tf.debugging.Assert(k <= max_captions, [
          f"an example has more captions than config.max_captions_eval={max_captions} (raise it; "
          "every caption of an eval image is used):", k, _where(data)])]
  out = dict(data)
  with tf.control_dependencies(checks):
    pad = max_captions - k
    for key in keys:
      x = data[key]
      blank = tf.zeros if x.dtype != tf.string else lambda s, dtype: tf.fill(s, "")
      filler = blank(tf.concat([[pad], tf.shape(x)[1:]], 0), dtype=x.dtype)
      x = tf.concat([x, filler], 0)
      x.set_shape([max_captions] + x.shape[1:].as_list())
      out[key] = x
    out["texts_mask"] = tf.range(max_captions) < k
  return out


# ------------------------------------------------------------------------------------------------
# Sources.


class _Item:
  """One image of a listing: its good captions, and what is wrong ([(reason, message)])."""
  __slots__ = ("path", "captions", "problems")

  def __init__(self, path: str):
    self.path, self.captions, self.problems = path, [], []


def _caption_source(config, split: str, where: str, sizes: dict[str, int], listing,
                    left_out: dict[str, int] | None = None) -> sources.Source:
  """Common part of the caption sources: items of the split -> checks, skipping, records, load.

  `left_out`: counts of caption files that are no examples at all (logged by the caller).
  """
  pieces = sources.resolve_split(split, sizes, where)
  items = [it for name, a, b in pieces for it in listing(name)[a:b]]
  problems = [p for it in items for p in it.problems]
  if problems and not config.skip_corrupt:
    raise ValueError(
        f"{where}, split {split!r}: {len(problems)} caption problem(s): "
        + "; ".join(m for _, m in problems[:5]) + (" ..." if len(problems) > 5 else "")
        + ". Fix them, or set config.skip_corrupt=True to skip bad captions and the images left "
        "without one (they are then counted in the log).")
  left_out = collections.Counter(left_out or {})
  left_out.update(reason for reason, _ in problems)
  no_caption = [it for it in items if not it.captions]
  if problems:
    logging.warning(
        "%s, split %r (config.skip_corrupt=True): skipping %s; %d of %d images are left without a "
        "caption and skipped: %s", where, split,
        ", ".join(f"{n} x {why}" for why, n in sorted(collections.Counter(
            r for r, _ in problems).items())), len(no_caption), len(items),
        "; ".join(m for _, m in problems[:20]) + (" ..." if len(problems) > 20 else ""))
  items = [it for it in items if it.captions]
  keep = sources.skip_bad_images(config, [it.path for it in items], where, split)
  if keep is not None:
    left_out["undecodable image"] += int((~keep).sum())
    items = [it for it, k in zip(items, keep) if k]
  num_skipped = len(no_caption) + (0 if keep is None else int((~keep).sum()))

  paths = [it.path for it in items]
  counts = np.array([len(it.captions) for it in items], np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)])
  paths_t = tf.constant(paths or [""], tf.string)
  texts_t = tf.constant([c for it in items for c in it.captions] or [""], tf.string)
  starts_t = tf.constant(starts, tf.int64)
  if items:
    logging.info("%s, split %r: %d images, %d captions (%d to %d per image)", where, split,
                 len(items), counts.sum(), counts.min(), counts.max())

  def records(start, stop):
    return tf.data.Dataset.range(start, stop)

  def load(i):  # reading the file here, after shuffle and skip, keeps those cheap
    path = tf.gather(paths_t, i)
    return {"image": tf.io.read_file(path), "texts": texts_t[starts_t[i]:starts_t[i + 1]],
            "_id": i, "_path": path}

  return sources.Source(f"{where}, split {split!r}", len(items), records, load,
                        load_batchable=False, image_encoded=True, paths=paths,
                        num_skipped=num_skipped, captions=True, num_captions=counts,
                        left_out={k: v for k, v in left_out.items() if v})


def read_caption_file(path: str) -> tuple[str | None, tuple[str, str] | None]:
  """(caption, None) from the first line of a caption file, or (None, (reason, message))."""
  try:
    with open(path, "rb") as f:  # only the first line is decoded: the rest is not the caption
      first = f.readline()
    caption = first.decode("utf-8-sig").strip()  # -sig: a BOM is not part of the caption
  except OSError as e:
    return None, ("unreadable caption file", f"{path}: cannot read it ({e.strerror or e})")
  except UnicodeDecodeError as e:
    return None, ("unreadable caption file",
                  f"{path}: its first line is not UTF-8 text ({e.reason} at byte {e.start})")
  if not caption:
    return None, ("empty caption", f"{path}: empty caption (its first line is blank)")
  return caption, None


def caption_folder_source(config, split: str) -> sources.Source:
  """Images with same-name .txt captions anywhere under `config.data_dir`; see the module doc."""
  root = config.data_dir
  where = f"caption folder {root}"
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"{where}: directory does not exist (config.data_dir={root!r}).")
  roots = sources.split_roots(root)
  orphans = collections.defaultdict(collections.Counter)  # split name -> caption files that are
  # no examples, by why

  def listing(name):
    images, texts = [], {}
    for d, dirs, files in os.walk(roots[name]):
      dirs[:] = sorted(x for x in dirs if not x.startswith("."))
      stems = collections.defaultdict(list)
      for f in sorted(files):
        if f.startswith("."):
          continue
        stem, ext = os.path.splitext(f)
        stems[stem].append(ext.lower())
        if ext.lower() in sources.IMAGE_EXTENSIONS:
          images.append(os.path.join(d, f))
        elif ext.lower() == ".txt":
          texts[os.path.join(d, stem)] = os.path.join(d, f)
      for stem, exts in stems.items():
        if ".txt" in exts and not set(exts) & set(sources.IMAGE_EXTENSIONS):
          undecoded = sorted(set(exts) & set(UNDECODED_EXTENSIONS))
          orphans[name]["caption file beside " + "/".join(undecoded) + " only" if undecoded
                  else "caption file without an image"] += 1
    images.sort()
    items = []
    for path in [images[i] for i in sources.fixed_order(len(images))]:
      item, stem = _Item(path), os.path.splitext(path)[0]
      if stem not in texts:
        item.problems.append(("no caption file", f"{path}: no caption file {stem}.txt"))
      else:
        caption, problem = read_caption_file(texts[stem])
        (item.captions if caption else item.problems).append(caption or problem)
      items.append(item)
    return items

  cache = {name: listing(name) for name in roots}
  sizes = {name: len(items) for name, items in cache.items()}
  names = {n for n, _, _ in sources.resolve_split(split, sizes, where)}
  left_out = sum((orphans[n] for n in names), collections.Counter())
  if left_out:
    logging.info("%s, split %r: %d caption files have no decodable image (%s) beside them and are "
                 "no examples: %s.", where, split, sum(left_out.values()),
                 "/".join(sources.IMAGE_EXTENSIONS),
                 ", ".join(f"{n} x {why}" for why, n in sorted(left_out.items())))
  return _caption_source(config, split, where, sizes, cache.__getitem__, left_out)


def caption_listing_source(config, split: str) -> sources.Source:
  """`config.data_dir/SPLIT.csv` (path,caption) or `SPLIT.jsonl` (path + caption or captions);
  see the module doc."""
  root, ext = config.data_dir, config.data_source.removeprefix("caption_")
  where = f"caption {ext} listing in {root}"
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"{where}: directory does not exist (config.data_dir={root!r}).")
  names = sorted(f[:-len(ext) - 1] for f in os.listdir(root) if f.endswith("." + ext))
  if not names:
    raise FileNotFoundError(f"{where}: no SPLIT.{ext} file there.")

  def rows(path):
    """[(image path as written, caption or None, where)] of one listing file."""
    out = []
    with open(path, newline="" if ext == "csv" else None, encoding="utf-8-sig") as f:
      if ext == "csv":
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
          raise ValueError(f"{path}: expected a header with columns path,caption, found "
                           f"{reader.fieldnames}.")
        for r in reader:
          out.append((r["path"], r["caption"], f"{path}:{reader.line_num}"))
        return out
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        at = f"{path}:{n}"
        try:
          r = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{at}: not a JSON object ({e}).") from e
        if not isinstance(r, dict) or "path" not in r or ("caption" in r) == ("captions" in r):
          raise ValueError(f"{at}: expected a JSON object with key path and one of caption (a "
                           f"string) or captions (a list of strings), found {line.strip()[:200]}")
        captions = [r["caption"]] if "caption" in r else r["captions"]
        if not isinstance(captions, list) or not captions:
          raise ValueError(f"{at}: captions must be a non-empty list of strings, found "
                           f"{captions!r:.200}.")
        out += [(r["path"], c, at) for c in captions]
    return out

  def listing(name):
    items = {}
    for image, caption, at in rows(os.path.join(root, f"{name}.{ext}")):
      if not isinstance(image, str) or not image:
        raise ValueError(f"{at}: path must be a non-empty string, found {image!r}.")
      if not isinstance(caption, str):
        raise ValueError(f"{at}: a caption must be a string, found {caption!r:.200}.")
      path = os.path.join(root, image)
      item = items.setdefault(path, _Item(path))
      if caption.strip():
        item.captions.append(caption.strip())
      else:
        item.problems.append(("empty caption", f"{at}: empty caption for {image}"))
    return list(items.values())

  cache = {name: listing(name) for name in names}
  sizes = {name: len(items) for name, items in cache.items()}
  return _caption_source(config, split, where, sizes, cache.__getitem__)
