"""Train and eval data from a config: source -> process shard -> shuffle -> skip -> preprocess -> batch
-> mixup/cutmix -> numpy. One place decides order, seeds and padding for every source."""
import logging
import math

import numpy as np
import tensorflow as tf

from vit_jax.input_pipeline import augreg
from vit_jax.input_pipeline import batch_ops
from vit_jax.input_pipeline import captions as captions_lib
from vit_jax.input_pipeline import ops as ops_lib
from vit_jax.input_pipeline import sources

AUTOTUNE = tf.data.AUTOTUNE


def per_process_batch(total: int, process_count: int, key: str) -> int:
  """config.<key> // process_count, or a ValueError naming both numbers."""
  if process_count < 1 or total % process_count:
    raise ValueError(f"config.{key}={total} is not divisible by process_count={process_count}: "
                     "every process reads an equal part of each batch.")
  return total // process_count


def _options(config) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # same order for a seed, whatever the thread timing
  # A small private pool leaves the other cores to JAX instead of competing for them.
  options.threading.private_threadpool_size = config.input_threads
  options.threading.max_intra_op_parallelism = 1
  # No autotuning: its model thread re-optimises a graph that grows by one shuffle node per epoch
  # (the per-epoch flat_map below). It cost a third of the pipeline's CPU over 5 epochs of
  # Fashion-MNIST (2,400 batches: 42.7 s with it, 29.2 s without), and destroying the iterator
  # waited for a running optimisation: 35-56 s after the last step of multi-epoch runs (seen
  # in the RootDataset iterator's destructor). Parallelism is the private pool's anyway.
  options.autotune.enabled = False
  return options


def _shuffle_seed(seed: int, process_index: int) -> int:
  """Base of the per-epoch shuffle seeds (epoch e uses base + e * 1_000_003; TF hashes it)."""
  return int(np.random.SeedSequence([abs(seed), process_index]).generate_state(1, np.uint32)[0])


def _seed_base(seed: int, stream: int) -> tf.Tensor:
  """int64 [2] stateless seed of one random stream (examples, batches) of a process."""
  return tf.constant([seed, stream], tf.int64)


def _get_source(config, split: str) -> sources.Source:
  source = sources.get_source(config, split)
  if source.num_examples == 0:
    raise ValueError(f"Split {split!r} of dataset {config.dataset!r} is empty "
                     f"({source.description}).")
  return source


def _detection():
  """detection.py, imported on first use, which registers its ops before a pp string is parsed.
  (Not at the top: `python -m vit_jax.input_pipeline.detection` imports this package first, and
  runpy warns when the module it runs is already imported.)"""
  from vit_jax.input_pipeline import detection  # pylint: disable=g-import-not-at-top
  return detection


def _op_defaults(config) -> dict:
  """Op arguments that come from the config unless the pp string gives them: the text tokenizer
  is the one the model and the zero-shot prompts use; for COCO data, the detection ops' sizes and
  the number of classes (config.detection, the train json)."""
  defaults = {"tokenize": {"context_length": config.context_length, "path": config.tokenizer_path}}
  if config.data_source == "coco":
    defaults.update(_detection().op_defaults(config))
  return defaults


def _parse_ops(pp: str, config) -> list:
  """The ops of a pp string, with every registered op (detection's too) and the config's
  defaults."""
  _detection()
  return ops_lib.parse(pp, _op_defaults(config))


def _check_output(ds: tf.data.Dataset, config, pp: str, which: str):
  spec = ds.element_spec
  if "labels" in spec and spec["labels"].shape[-1] != config.num_classes:
    raise ValueError(f"pp.{which} {pp!r} gives labels of size {spec['labels'].shape[-1]}, "
                     f"config.num_classes={config.num_classes}.")
  if "texts" in spec and "tokens" not in spec:
    raise ValueError(f"pp.{which} {pp!r} gives captions ('texts') but no 'tokens': end it with "
                     "tokenize.")
  if "labels" not in spec and "label" in spec and "tokens" not in spec:
    raise ValueError(f"pp.{which} {pp!r} gives no 'labels': end it with "
                     f"onehot({config.num_classes}).")
  if "boxes" in spec or config.data_source == "coco":
    _check_detection_output(spec, config, pp, which)


def _check_detection_output(spec, config, pp: str, which: str):
  """Detection batches: fixed shapes (pad_to_square, pad_boxes) and the task's keys."""
  needed = ["image", "boxes", "box_classes"] + (
      ["query_classes"] if which == "train" else ["image_id", "orig_size"])
  missing = [k for k in needed if k not in spec]
  if missing:
    hint = {"query_classes": "det_queries", "boxes": "keep it", "box_classes": "keep it"}
    raise ValueError(f"pp.{which} {pp!r} gives no {missing}; a detection {which} batch needs "
                     f"{needed}" + "".join(f" ({k}: {hint[k]})" for k in missing if k in hint)
                     + ".")
  if not spec["image"].shape[1:].is_fully_defined():
    raise ValueError(f"pp.{which} {pp!r} gives images of shape {spec['image'].shape}: use "
                     "pad_to_square(size) for a fixed size.")
  boxes, classes = spec["boxes"].shape, spec["box_classes"].shape
  if boxes.rank != 3 or boxes[1] is None or classes[1:] != boxes[1:2]:
    raise ValueError(f"pp.{which} {pp!r} gives boxes {boxes} and box_classes {classes}; expected "
                     "[b, max_boxes, 4] and [b, max_boxes]: end the box ops with pad_boxes.")
  expected = {"boxes": (boxes[1], "max_boxes")}
  if "query_classes" in spec:
    expected["query_classes"] = (spec["query_classes"].shape[-1], "max_queries")
  for key, (found, name) in expected.items():
    default = _detection().CONFIG_DEFAULTS[name]
    want = default if config.get("detection") is None else config.detection.get(name, default)
    if found != want:
      raise ValueError(f"pp.{which} {pp!r} gives {key} with {found} rows, "
                       f"config.detection.{name}={want}.")


def _finalize(data: dict, with_ids: bool, drop=()) -> dict:
  """Drops the pipeline's internal keys (file paths are strings, which jax cannot take), the keys
  in `drop` (a source's eval-only keys, in training), and the integer 'label' once onehot made
  'labels' of it (int64, which jax would truncate with a warning); a 'label' kept beside captions
  (for zero-shot metrics) becomes int32."""
  out = {k: v for k, v in data.items()
         if (not k.startswith("_") or (with_ids and k == "_id")) and k not in drop
         and not (k == "label" and "labels" in data)}
  if "label" in out:
    out["label"] = tf.cast(out["label"], tf.int32)
  return out


def _preprocess(ds, source, ops, seed_base, batch_size, *, loaded, drop_remainder, with_ids,
                captions_fn, drop=()):
  """(position, record) pairs -> batches: load, per-example ops, captions, batch, batched ops.

  Ops at the end of the pp string that are elementwise run once per batch (vectorised); if every op
  is such and the source can load a batch at once (in-memory arrays), loading happens after
  batching too, so an epoch of Fashion-MNIST costs a few hundred tf.data steps, not 60k.
  An example's captions ('texts' [k], from the source or a per-example op) become what the batch
  holds by `captions_fn(data, seed)` after the per-example ops: one caption (training) or all of
  them padded (evaluation); a `tokenize` among the batched ops then encodes only those.
  """
  per_example, batched = ops_lib.split_batchable(ops, source.image_encoded)
  # Captions differ in number per image: they are chosen per example, before batching.
  vectorised = not loaded and source.load_batchable and not per_example and not source.captions

  if vectorised:
    ds = ds.map(lambda pos, record: record)
  else:
    def example_fn(pos, record):
      data = record if loaded else source.load(record)
      seed = tf.random.experimental.stateless_fold_in(seed_base, pos)
      data = ops_lib.apply(per_example, data, seed)
      return captions_fn(data, seed) if "texts" in data else data
    ds = ds.map(example_fn, num_parallel_calls=AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)

  def batch_fn(data):
    if vectorised:
      data = source.load(data)
    return _finalize(ops_lib.apply(batched, data, None), with_ids, drop)
  return ds.map(batch_fn, num_parallel_calls=AUTOTUNE)


# ------------------------------------------------------------------------------------------------
# Training.


def make_train_dataset(config, process_index: int = 0, process_count: int = 1,
                       start_step: int = 0, *, with_ids: bool = False) -> tf.data.Dataset:
  """Infinite tf.data.Dataset of this process's training batches, from batch `start_step` on.

  See make_train_iterator for numpy batches.
  """
  return _train_dataset(config, process_index, process_count, start_step, with_ids)[0]


def _train_dataset(config, process_index, process_count, start_step, with_ids):
  """(dataset, source, shard start, shard stop): see make_train_iterator."""
  batch = per_process_batch(config.batch, process_count, "batch")
  source = _get_source(config, config.train_split)
  start, stop = sources.process_range(source.num_examples, process_index, process_count)
  if stop == start:
    raise ValueError(f"{source.description}: {source.num_examples} examples cannot be shared by "
                     f"{process_count} processes (process {process_index} gets none).")
  pp, mixup_alpha = augreg.resolve(config)
  ops = _parse_ops(pp, config)
  ds = source.records(start, stop)
  loaded = bool(config.cache_train)
  if loaded:
    # Decoding and the deterministic ops that follow it run once; augmentation runs every epoch.
    k = next((i for i, op in enumerate(ops) if op.random), len(ops))
    cached, ops = ops[:k], ops[k:]
    ds = ds.map(lambda r: ops_lib.apply(cached, source.load(r), None),
                num_parallel_calls=AUTOTUNE).cache()
  # Each epoch is one pass over the shard (a full permutation when the buffer holds the shard),
  # shuffled with a seed of its own. A restart thus begins at its epoch and skips less than one
  # epoch of records, whatever the step.
  size = stop - start
  buffer = max(1, min(config.shuffle_buffer, size))
  shuffle_seed = _shuffle_seed(config.seed, process_index)
  first = start_step * batch
  records = ds
  ds = tf.data.Dataset.range(first // size, np.iinfo(np.int64).max).flat_map(
      lambda epoch: records.shuffle(buffer, seed=shuffle_seed + epoch * 1_000_003,
                                    reshuffle_each_iteration=False))
  ds = ds.skip(first % size).enumerate(first)
  ds = _preprocess(ds, source, ops, _seed_base(config.seed, 2 * process_index), batch,
                   loaded=loaded, drop_remainder=True, with_ids=with_ids,
                   captions_fn=captions_lib.sample_caption, drop=source.eval_keys)
  mix = batch_ops.get_batch_op(mixup_alpha, config.cutmix_alpha,
                               config.mix_switch_prob)
  if mix is not None:
    if "labels" not in ds.element_spec and "tokens" in ds.element_spec:
      raise ValueError(f"mixup/cutmix (config.mixup_alpha={mixup_alpha}, cutmix_alpha="
                       f"{config.cutmix_alpha}, aug_level={config.aug_level}) mix 'labels'; "
                       f"image-caption data (pp.train {pp!r}) has none: turn them off.")
    batch_seed = _seed_base(config.seed, 2 * process_index + 1)
    ds = ds.enumerate(start_step).map(
        lambda step, b: mix(b, tf.random.experimental.stateless_fold_in(batch_seed, step)),
        num_parallel_calls=AUTOTUNE)
  _check_output(ds, config, pp, "train")
  ds = ds.prefetch(config.prefetch).with_options(_options(config))
  return ds, source, start, stop


def make_train_iterator(config, process_index: int = 0, process_count: int = 1,
                        start_step: int = 0, *, with_ids: bool = False):
  """Infinite iterator of this process's numpy training batches, from batch `start_step` on.

  Batch k is the same whether the iterator starts at 0 or at k: the shuffle runs over cheap records
  (indices, paths, raw bytes), epoch by epoch with seeds of their own, a restart skips less than an
  epoch of records before any decoding, and each example's augmentation is seeded by its position
  in the stream (mixup/cutmix by the step).

  Yields:
    {'image': [b, h, w, c] (float32 after value_range/normalize), 'labels': float32
    [b, num_classes]} with b = config.batch // process_count; '_id' int64 [b] (positions in the
    split) too if with_ids. A data error (corrupt file, bad label) raises ValueError naming it.
    Image-caption data gives {'image', 'texts': bytes (object) [b], one caption per image (chosen
    with the example's seed among its captions), 'tokens': int32 [b, context_length]} instead of
    'labels' ('texts' are strings: drop them before putting a batch on devices).
  """
  ds, source, start, stop = _train_dataset(config, process_index, process_count, start_step,
                                           with_ids)
  return _numpy_batches(ds, source, start, stop)


def _numpy_batches(ds, source, start, stop):
  """Numpy batches of `ds`; a data error becomes a ValueError naming the files at fault."""
  it = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError,
            tf.errors.PermissionDeniedError) as e:
      raise _explain(e, source, start, stop) from None
    yield batch


def _explain(error, source, start, stop) -> Exception:
  message = error.message.strip()
  if source.paths is not None:
    bad = sources.find_bad_images(source.paths[start:stop])
    if bad:
      listed = "; ".join(f"{p}: {e}" for p, e in bad[:5])
      return ValueError(f"{source.description}: {len(bad)} unreadable image file(s): {listed}"
                        f"{' ...' if len(bad) > 5 else ''}. Fix or remove them, or set "
                        "config.skip_corrupt=True to skip them (they are then counted in the log).")
  return ValueError(f"{source.description}: {message}")


# ------------------------------------------------------------------------------------------------
# Evaluation.


class EvalData:
  """One eval split for one process: `iter()` gives a fresh pass over its batches.

  Attributes:
    num_examples: examples in the whole split (over all processes).
    num_batches: batches per pass, the same on every process.
    batch_size: per-process batch, config.batch_eval // process_count.
  Every batch is full: missing rows are zeros (b'' for strings) with '_mask' False, so over all
  processes each example of the split is seen exactly once. Image-caption data has all captions of
  an image: 'texts' bytes [b, K], 'texts_mask' bool [b, K], 'tokens' int32 [b, K, context_length]
  with K = config.max_captions_eval.
  """

  def __init__(self, ds, source, num_examples, num_batches, batch_size, start, stop):
    self.dataset, self.source = ds, source
    self.num_examples, self.num_batches, self.batch_size = num_examples, num_batches, batch_size
    self._range = (start, stop)

  def __iter__(self):
    count, template = 0, None
    for batch in _numpy_batches(self.dataset, self.source, *self._range):
      n = len(next(iter(batch.values())))
      batch["_mask"] = np.arange(self.batch_size) < n
      if n < self.batch_size:
        batch = {k: v if k == "_mask" else _pad(v, self.batch_size) for k, v in batch.items()}
      template = template or {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
      count += 1
      yield batch
    if count > self.num_batches:
      raise AssertionError(f"eval gave {count} batches, expected at most {self.num_batches}.")
    for _ in range(self.num_batches - count):
      yield self._padding_batch(template)

  def _padding_batch(self, template):
    if template is None:  # this process has no example at all
      template = {}
      for k, spec in self.dataset.element_spec.items():
        if not spec.shape[1:].is_fully_defined():
          raise ValueError(f"{self.source.description}: this process has no examples, and the "
                           f"shape of {k!r} {spec.shape} is not fixed by pp.test: cannot pad.")
        template[k] = (tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype)
      template["_mask"] = ((), np.bool_)
    return {k: _blank((self.batch_size, *shape), dtype) for k, (shape, dtype) in template.items()}


def _blank(shape, dtype) -> np.ndarray:
  """Padding: zeros, or b'' for strings (object arrays, which zeros would fill with int 0)."""
  return np.full(shape, b"", object) if dtype == object else np.zeros(shape, dtype)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([x, _blank((size - len(x), *x.shape[1:]), x.dtype)])


def make_eval_data(config, split: str | None = None, process_index: int = 0,
                   process_count: int = 1, *, with_ids: bool = False) -> EvalData:
  """Eval batches of `split` (default config.eval_split) for this process, padded and masked.

  Each process reads a contiguous part of the split; batch = config.batch_eval // process_count;
  num_batches = ceil(ceil(num_examples / process_count) / batch) on every process.
  """
  split = config.eval_split if split is None else split
  batch = per_process_batch(config.batch_eval, process_count, "batch_eval")
  source = _get_source(config, split)
  max_captions = config.max_captions_eval
  if source.num_captions is not None and source.num_captions.max() > max_captions:
    i = int(source.num_captions.argmax())
    raise ValueError(f"{source.description}: {source.paths[i]} has {source.num_captions[i]} "
                     f"captions, config.max_captions_eval={max_captions}: raise it to "
                     f"{source.num_captions.max()} (every caption of an eval image is used).")
  start, stop = sources.process_range(source.num_examples, process_index, process_count)
  num_batches = math.ceil(math.ceil(source.num_examples / process_count) / batch)
  ops = _parse_ops(config.pp.test, config)
  # Eval has no shuffle; random ops (unusual in pp.test) are seeded by the split position, so the
  # result does not depend on the number of processes.
  ds = source.records(start, stop).enumerate(start)
  ds = _preprocess(ds, source, ops, _seed_base(config.seed, -1), batch, loaded=False,
                   drop_remainder=False, with_ids=with_ids,
                   captions_fn=lambda data, seed: captions_lib.pad_captions(data, max_captions))
  _check_output(ds, config, config.pp.test, "test")
  ds = ds.prefetch(config.prefetch).with_options(_options(config))
  logging.info("eval %s: %d examples, %d batches of %d per process", source.description,
               source.num_examples, num_batches, batch)
  return EvalData(ds, source, source.num_examples, num_batches, batch, start, stop)


# ------------------------------------------------------------------------------------------------
# Prediction on image files (predict.py).

# Ops that make training targets (labels, captions, queries, boxes) or pick keys, not the model's
# input: prediction on unlabelled files runs pp.test without them.
TARGET_OPS = ("onehot", "class_caption", "tokenize", "det_queries", "pad_boxes", "keep", "drop")


def image_ops(config, channels: int | None = None) -> list:
  """config.pp.test's ops that make the model's input image (see TARGET_OPS); `decode` gives
  `channels` (the model's) unless the pp string sets it."""
  defaults = _op_defaults(config)
  if channels is not None:
    defaults["decode"] = {"channels": channels}
  _detection()
  return [op for op in ops_lib.parse(config.pp.test, defaults) if op.name not in TARGET_OPS]


def make_file_dataset(config, paths: list[str], batch_size: int, *,
                      channels: int | None = None) -> tf.data.Dataset:
  """Batches of {"image", "orig_size" int32 [2] (height, width as decoded), "_index" int64 (the
  position in `paths`)} from image files through `image_ops`, in order. A file that cannot be
  read or decoded is left out, never an error (`tf.data.Dataset.ignore_errors`): the `_index`es
  missing from the output are those files, and `sources.find_bad_images` says why."""
  ops = image_ops(config, channels)
  paths_t = tf.constant(list(paths) or [""])
  base = _seed_base(config.seed, -1)

  def load(i):
    data = {"image": tf.io.read_file(paths_t[i])}
    seed = tf.random.experimental.stateless_fold_in(base, i)
    orig_size = None
    for op in ops:
      data = op(data, seed)
      if orig_size is None and data["image"].dtype != tf.string:  # just decoded
        orig_size = tf.shape(data["image"])[:2]
    return {"image": data["image"], "orig_size": tf.cast(orig_size, tf.int32), "_index": i}

  ds = tf.data.Dataset.range(len(paths)).map(load, num_parallel_calls=AUTOTUNE,
                                              deterministic=True)
  return (ds.ignore_errors().batch(batch_size).prefetch(config.prefetch)
          .with_options(_options(config)))
