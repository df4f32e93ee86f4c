"""Predictions on new images, for every task: `python -m vit_jax.predict` and `Predictor`.

    python -m vit_jax.predict --workdir=DIR --images='photos/*.jpg' --out=preds.jsonl
    python -m vit_jax.predict --config=vit_jax/configs/clip.py:b32 --checkpoint=clip.safetensors \
        --images='photos/*.jpg' --labels='cat,dog,bus'
    python -m vit_jax.predict --workdir=DIR --images='photos/*.jpg' --queries='a cat,a bus'

The model comes from a run's workdir (its `config.json` and its latest or best checkpoint) or
from `--config` plus any `--checkpoint` file `checkpoints_convert` reads. Images are preprocessed
by the config's `pp.test` without its label ops (input_pipeline/pipeline.py `image_ops`), in
tf.data, batched and sharded over this host's devices, one compiled program for every batch.
What a prediction is comes from the task (`task.predict_head`, tasks/__init__.py): top-k class
names, CLIP zero-shot labels or retrieved texts, OWL-ViT boxes. A file that cannot be read or
decoded is skipped and listed at the end; the run never stops on one.
"""
import dataclasses
import glob as glob_lib
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vit_jax import configs
from vit_jax import files
from vit_jax import train

_BATCH_AXIS = "batch"


@dataclasses.dataclass
class Result:
  """What a prediction run gives.

  records: one dict per predicted image, in input order: the task's record plus "file" (files)
    or "index" and "label" (a dataset split).
  skipped: [(file, why)] of the files that could not be read or decoded.
  seconds, images_per_second: wall time of the whole pass (reading, preprocessing, devices).
  """
  records: List[dict]
  skipped: List[Tuple[str, str]]
  seconds: float
  images_per_second: float


def expand_images(patterns: Union[str, Sequence[str]]) -> List[str]:
  """Files matching glob patterns ('photos/*.jpg', 'data/**/*.png', or plain paths), sorted
  within each pattern, each file once. Raises when a pattern matches nothing."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files, seen = [], set()
  for pattern in patterns:
    found = sorted(f for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f))
    if not found:
      raise FileNotFoundError(f"--images {pattern!r} matches no file.")
    for f in found:
      if f not in seen:
        seen.add(f)
        files.append(f)
  return files


def restore_params(workdir: str, checkpoint: Union[str, int] = "latest"):
  """The params tree of a run: its newest checkpoint ("latest"), the early-stopping best
  ("best"), or a step (int); host numpy arrays."""
  from vit_jax.checkpoints_convert import orbax as orbax_reader  # pylint: disable=g-import-not-at-top
  folder = os.path.join(workdir, "best" if checkpoint == "best" else "checkpoints")
  if checkpoint not in ("latest", "best"):
    folder = os.path.join(folder, str(int(checkpoint)))
  if orbax_reader.step_dir(folder) is None:
    raise FileNotFoundError(f"{folder}: no checkpoint (checkpoint={checkpoint!r}; a run writes "
                            "checkpoints/ every config.checkpoint_every_steps and at its end, "
                            "best/ with config.early_stopping).")
  logging.info("Predicting with %s", orbax_reader.step_dir(folder))
  return orbax_reader.read_tree(folder)


class Predictor:
  """A trained model ready to predict, for notebooks and the CLI.

    p = Predictor.from_workdir("/tmp/fmnist")
    result = p.predict_files(predict.expand_images("photos/*.png"))
    result.records[0]  # {"file": ..., "class": 7, "label": "Sneaker", "top_k": [...]}

  Args:
    config: the run's config (a `ConfigDict`).
    params: the task's params tree; or None with `checkpoint_path`: any file or folder
      `checkpoints_convert` reads, loaded as the task's pretrained init at the images' size.
    batch_size: images per device step (rounded up to a multiple of the local devices); default
      config.batch_eval, at most 256.
    devices: default this host's devices.
    options: what the task's `predict_head` takes: top_k, class_names (classification); labels,
      templates or texts (CLIP); queries, or query_image (a file) + query_box (x, y, w, h in its
      pixels), threshold, nms_iou (OWL-ViT).
  """

  def __init__(self, config, params=None, *, checkpoint_path: Optional[str] = None,
               batch_size: Optional[int] = None, devices=None, **options):
    if (params is None) == (checkpoint_path is None):
      raise ValueError("Predictor: give params or checkpoint_path, one of the two.")
    self.config = config
    self.task = train.get_task(config)
    self.devices = list(devices or jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.array(self.devices), (_BATCH_AXIS,))
    n = len(self.devices)
    want = batch_size or min(int(config.batch_eval), 256)
    self.batch_size = -(-int(want) // n) * n
    self.options = dict(options)
    self._params = params
    self._checkpoint_path = checkpoint_path
    self._head = self._step = self._channels = None
    self._device_params = self._device_aux = None

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: Union[str, int] = "latest", **kwargs):
    """The run in `workdir` (its config.json), at its latest / best / given-step checkpoint."""
    workdir = os.path.expanduser(workdir)
    config = configs.load_run_config(workdir)
    return cls(config, restore_params(workdir, checkpoint), **kwargs)

  # -- the model ----------------------------------------------------------------------------

  def channels(self) -> Optional[int]:
    """The image channels the params take (decode gives that many), when known before loading."""
    if self._params is None:
      if self.config.task != "classification":
        return None  # CLIP / OWL-ViT towers take RGB
      if self._channels is None:  # a ViT checkpoint may be gray (Fashion-MNIST): ask the file
        from vit_jax.checkpoints_convert import core  # pylint: disable=g-import-not-at-top
        stem = core.read(self._checkpoint_path,
                         num_heads=self.config.model.transformer.num_heads).params.get(
                             "embedding/kernel")
        self._channels = int(stem.shape[2]) if stem is not None else 3
      return self._channels
    p = self._params.get("img", self._params)  # CLIP / OWL-ViT: the image tower
    kernel = p.get("embedding", {}).get("kernel") if isinstance(p, dict) else None
    return int(kernel.shape[2]) if kernel is not None else None

  def _params_for(self, image_shape) -> Any:
    if self._params is None:  # a checkpoint file: the task's own loader, at this image size
      config = self.config.copy_and_resolve_references()
      with config.unlocked():
        config.pretrained_path = self._checkpoint_path
        if "lora" in config:
          config.lora.rank = 0  # a checkpoint file holds merged weights: no fresh adapters
      task = train.get_task(config)
      params = task.init_params(jax.random.PRNGKey(0), {"image": np.zeros((1,) + image_shape,
                                                                          np.float32)})
      self._params = jax.tree.map(np.asarray, params)
      _check_head(self._params, self._checkpoint_path)
    return self._params

  def _prepare(self, image_shape) -> None:
    """Builds the task's head and its compiled step once, for `image_shape` [H, W, C]."""
    if self._step is not None:
      return
    params = self._params_for(tuple(image_shape))
    options = dict(self.options)
    if options.get("query_image") is not None:
      options["query_image"], options["query_box"] = self._query_image(
          options["query_image"], options.get("query_box"))
    self._head = self.task.predict_head(params, options)
    replicated = NamedSharding(self.mesh, P())
    self._device_params = jax.device_put(params, replicated)
    self._device_aux = jax.device_put(self._head.aux, replicated)
    batch = NamedSharding(self.mesh, P(_BATCH_AXIS))
    self._step = jax.jit(self._head.fn, in_shardings=(replicated, replicated, batch),
                         out_shardings=batch)

  def _query_image(self, path: str, box) -> Tuple[np.ndarray, np.ndarray]:
    """The preprocessed query image [S, S, 3] and its box (x, y, w, h pixels, default the whole
    image) as cx, cy, w, h in [0, 1] of the padded square that pp.test's pad_to_square makes."""
    path = os.path.expanduser(path)
    batches = list(self._file_batches([path], 1))
    if not batches:
      from vit_jax.input_pipeline import sources  # pylint: disable=g-import-not-at-top
      why = sources.find_bad_images([path])
      raise ValueError(f"--query-image {path}: cannot be read as an image "
                       f"({why[0][1] if why else 'unknown error'}).")
    image, (h, w) = batches[0]["image"][0], batches[0]["orig_size"][0]
    x, y, bw, bh = (0.0, 0.0, float(w), float(h)) if box is None else (float(v) for v in box)
    if bw <= 0 or bh <= 0 or x < 0 or y < 0 or x + bw > w + 0.5 or y + bh > h + 0.5:
      raise ValueError(f"--query-box {box}: expected x, y, w, h inside the {w}x{h} query image "
                       f"{path} (w, h > 0).")
    side = float(max(h, w))
    return image, np.array([(x + bw / 2) / side, (y + bh / 2) / side, bw / side, bh / side],
                           np.float32)

  @property
  def head(self):
    """The task's `PredictHead` (tasks/__init__.py), once the first images have been seen."""
    return self._head

  # -- running ------------------------------------------------------------------------------

  def _run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """Preprocessed images [n <= batch_size, H, W, C] -> the head's outputs for those n."""
    n = len(images)
    self._prepare(images.shape[1:])
    if n < self.batch_size:  # one compiled shape: pad the last batch
      images = np.concatenate([images, np.zeros((self.batch_size - n,) + images.shape[1:],
                                                images.dtype)])
    out = self._step(self._device_params, self._device_aux, images)
    return {k: np.asarray(v)[:n] for k, v in jax.device_get(out).items()}

  def predict_arrays(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """Already preprocessed images [n, H, W, C] -> the task head's outputs (numpy, [n, ...]):
    probabilities, embeddings, top-k detections..."""
    images = np.asarray(images)
    outs = [self._run(images[i:i + self.batch_size]) for i in range(0, len(images),
                                                                      self.batch_size)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def _file_batches(self, paths: Sequence[str], batch_size: int):
    from vit_jax.input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    ds = pipeline.make_file_dataset(self.config, list(paths), batch_size,
                                    channels=self.channels())
    return ds.as_numpy_iterator()

  def predict_files(self, paths: Sequence[str], *, out: Optional[str] = None,
                    draw_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Predicts every readable file of `paths`; the others are skipped and listed in
    `Result.skipped`. `out`: also write the records as JSON lines there. `draw_dir`: a PNG of
    each image with its prediction drawn (tasks that can, i.e. detection)."""
    from vit_jax.input_pipeline import sources  # pylint: disable=g-import-not-at-top
    paths = list(paths)
    start, records = time.perf_counter(), []
    bar = _progress(len(paths), progress)
    done = 0
    for batch in self._file_batches(paths, self.batch_size):
      outputs = self._run(batch["image"])
      recs = self._head.records(outputs, {"orig_size": batch["orig_size"]})
      for i, rec in zip(batch["_index"], recs):
        records.append({"file": paths[int(i)], **rec})
      bar.update(int(batch["_index"][-1]) + 1 - done)
      done = int(batch["_index"][-1]) + 1
    bar.update(len(paths) - done)
    bar.close()
    got = {r["file"] for r in records}
    missing = [p for p in paths if p not in got]
    skipped = sources.find_bad_images(missing, channels=self.channels() or 3) if missing else []
    reasons = dict(skipped)
    skipped = [(p, reasons.get(p, "left out by the input pipeline")) for p in missing]
    if draw_dir and self._head.draw is not None:
      for rec in records:
        self._draw(rec, draw_dir)
    seconds = time.perf_counter() - start
    result = Result(records, skipped, seconds, len(records) / max(seconds, 1e-9))
    if out:
      write_jsonl(records, out)
    return result

  def _draw(self, record: dict, draw_dir: str) -> None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(record["file"]) as im:
      pixels = np.asarray(im.convert("RGB"))
    name = os.path.splitext(os.path.basename(record["file"]))[0] + ".png"
    record["png"] = self._head.draw(pixels, record, os.path.join(draw_dir, name))

  def predict_data(self, split: Optional[str] = None, *, out: Optional[str] = None,
                   progress: bool = True) -> Result:
    """Predicts a split of the config's dataset (default config.eval_split) through the eval
    pipeline; records carry the example's "index" and, for labelled data, its "label_true"."""
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    config = self.config
    if config.batch_eval != self.batch_size:
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.batch_eval = self.batch_size
    data = input_pipeline.make_eval_data(config, split=split)
    start, records, index = time.perf_counter(), [], 0
    bar = _progress(data.num_examples, progress)
    for batch in data:
      mask = batch["_mask"]
      n = int(mask.sum())
      if not n:
        continue
      outputs = self._run(batch["image"][mask])
      orig = np.tile(np.array(batch["image"].shape[1:3], np.int32), (n, 1))
      if "orig_size" in batch:
        orig = batch["orig_size"][mask]
      recs = self._head.records(outputs, {"orig_size": orig})
      labels = batch.get("labels")
      for j, rec in enumerate(recs):
        rec = {"index": index, **rec}
        if labels is not None:
          rec["label_true"] = int(np.argmax(labels[mask][j]))
        records.append(rec)
        index += 1
      bar.update(n)
    bar.close()
    seconds = time.perf_counter() - start
    result = Result(records, [], seconds, len(records) / max(seconds, 1e-9))
    if out:
      write_jsonl(records, out)
    return result


def _check_head(params, path: str) -> None:
  """A classifier whose checkpoint had no head of this size would predict a constant: refuse."""
  head = params.get("head") if isinstance(params, dict) else None
  if head is not None and "kernel" in head and not np.any(head["kernel"]):
    raise ValueError(f"{path}: no classification head for this config's num_classes (the head "
                     "is all zeros): predictions would be constant. Use the checkpoint of a "
                     "fine-tuned model, or set config.num_classes to its head's size.")


def _progress(total: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit="img", disable=not enabled, smoothing=0.1, dynamic_ncols=True)


def write_jsonl(records: Sequence[dict], path: str) -> str:
  """One JSON object per line, written to a temporary file and renamed (no half files)."""
  files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
  return path


def folder_accuracy(records: Sequence[dict], class_names: Sequence[str]) -> Tuple[int, int]:
  """(correct, counted): top-1 against the class folder each file sits in, a folder named by a
  class name or a class index; files in other folders are not counted."""
  lookup = {name: i for i, name in enumerate(class_names)}
  lookup.update({str(i): i for i in range(len(class_names))})
  correct = counted = 0
  for r in records:
    truth = lookup.get(os.path.basename(os.path.dirname(r["file"])))
    if truth is not None and "class" in r:
      counted += 1
      correct += int(r["class"] == truth)
  return correct, counted


def format_table(records: Sequence[dict], summary, limit: int = 20) -> str:
  """The first `limit` predictions, one line each: the file (or example) and the summary."""
  lines = []
  for r in records[:limit]:
    name = r.get("file") or f"example {r.get('index')}"
    lines.append(f"{os.path.basename(str(name))[:40]:<40}  {summary(r)}")
  if len(records) > limit:
    lines.append(f"... and {len(records) - limit} more")
  return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def _list_flag(value: Optional[str]) -> List[str]:
  """'a,b,c', or a file with one item per line (texts may hold commas)."""
  if not value:
    return []
  path = os.path.expanduser(value)
  if os.path.isfile(path):
    with open(path) as f:
      return [line.strip() for line in f if line.strip()]
  return [v.strip() for v in value.split(",") if v.strip()]


def define_model_flags():
  """--workdir, --config, --checkpoint: which model predict and export use."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A run's workdir: its config.json and checkpoints.")
  config_flags.DEFINE_config_file("config", None, "Config file (instead of, or over, the "
                                  "workdir's config.json); --config.x=y overrides.",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "With --workdir: latest (default), best, or a step. "
                      "With --config: any checkpoint file or folder checkpoints_convert reads.")
  return flags.FLAGS


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  define_model_flags()
  flags.DEFINE_multi_string("images", None, "Image files: a glob ('photos/*.jpg'); repeatable.")
  flags.DEFINE_string("data", None, "Instead of --images: a split of the config's dataset.")
  flags.DEFINE_string("out", None, "Write the predictions here, one JSON object per line.")
  flags.DEFINE_integer("top-k", None, "Classes / labels / texts per image (default 5), or "
                       "detections per image (default config.detection.top_k).")
  flags.DEFINE_string("labels", None, "CLIP zero-shot: 'cat,dog,...' or a file, one per line.")
  flags.DEFINE_string("templates", None, "CLIP zero-shot prompt templates: a name from "
                      "evaluation/prompts.py or a file, one template with '{}' per line "
                      "(default config.zeroshot.templates).")
  flags.DEFINE_string("texts", None, "CLIP retrieval: texts to rank per image, 'a,b' or a file.")
  flags.DEFINE_string("queries", None, "OWL-ViT: text queries 'a cat,a bus' or a file.")
  flags.DEFINE_string("query-image", None, "OWL-ViT one-shot: an image of the object.")
  flags.DEFINE_string("query-box", None, "OWL-ViT one-shot: x,y,w,h of the object in the query "
                      "image's pixels (default: the whole image).")
  flags.DEFINE_float("threshold", None, "OWL-ViT: keep boxes scoring at least this (default "
                     "config.detection.report_threshold).")
  flags.DEFINE_string("png-dir", None, "OWL-ViT: PNGs of the images with their boxes (default: "
                      "beside --out, in <out>_png/).")
  flags.DEFINE_integer("batch-size", None, "Images per step (default config.batch_eval, <= 256).")
  flags.DEFINE_bool("progress", True, "Show a progress bar with images/s.")
  return flags.FLAGS


def _templates(value):
  if not value:
    return None
  path = os.path.expanduser(value)
  return tuple(_list_flag(path)) if os.path.isfile(path) else value


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  train._quiet_library_logs()  # pylint: disable=protected-access
  train._hide_accelerators_from_tf()  # pylint: disable=protected-access
  if not f.workdir and f.config is None:
    raise flags.ValidationError("Give --workdir (a run) or --config with --checkpoint.")
  if bool(f.images) == bool(f.data):
    raise flags.ValidationError("Give --images (a glob) or --data (a split), one of the two.")
  box = f["query-box"].value
  options = dict(top_k=f["top-k"].value, labels=_list_flag(f.labels),
                 templates=_templates(f.templates), texts=_list_flag(f.texts),
                 queries=_list_flag(f.queries), query_image=f["query-image"].value,
                 query_box=[float(v) for v in box.split(",")] if box else None,
                 threshold=f.threshold)
  if box and len(options["query_box"]) != 4:
    raise flags.ValidationError(f"--query-box {box!r}: expected x,y,w,h.")
  options = {k: v for k, v in options.items() if v not in (None, [], "")}
  kwargs = dict(batch_size=f["batch-size"].value, **options)
  workdir = os.path.expanduser(f.workdir) if f.workdir else None
  if workdir and f.config is None:
    predictor = Predictor.from_workdir(workdir, f.checkpoint or "latest", **kwargs)
  elif workdir:
    predictor = Predictor(f.config, restore_params(workdir, f.checkpoint or "latest"), **kwargs)
  else:
    if not f.checkpoint:
      raise flags.ValidationError("--config needs --checkpoint (a file or folder) or --workdir.")
    predictor = Predictor(f.config, checkpoint_path=os.path.expanduser(f.checkpoint), **kwargs)

  out = os.path.expanduser(f.out) if f.out else None
  if f.images:
    files = expand_images(f.images)
    png_dir = f["png-dir"].value or (os.path.splitext(out)[0] + "_png" if out else None)
    result = predictor.predict_files(files, out=out, draw_dir=png_dir and os.path.expanduser(
        png_dir), progress=f.progress)
  else:
    result = predictor.predict_data(f.data, out=out, progress=f.progress)
  print(format_table(result.records, predictor.head.summary if predictor.head else str))
  print(f"{len(result.records)} images in {result.seconds:.1f} s ({result.images_per_second:.1f} "
        f"images/s){'; predictions in ' + out if out else ''}")
  if f.data and result.records and "label_true" in result.records[0] and "class" in result.records[0]:
    correct = sum(r["class"] == r["label_true"] for r in result.records)
    print(f"top-1 on {f.data}: {correct / len(result.records):.2%} ({correct} / "
          f"{len(result.records)})")
  names = predictor.head.class_names if predictor.head else None
  if f.images and names and result.records:
    correct, counted = folder_accuracy(result.records, names)
    if counted:
      print(f"top-1 against the class folders: {correct / counted:.2%} ({correct} / {counted})")
  if result.skipped:
    print(f"Skipped {len(result.skipped)} unreadable file(s):")
    for path, why in result.skipped:
      print(f"  {path}: {why}")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
