"""Plots (vit_jax/plots.py): a tiny classification run, resumed after losing its last checkpoint,
ends with its PNGs; every curve holds exactly the points the config says were logged, each step
once, with the values TF's own event reader finds; the confusion matrix counts the eval split and
agrees with the logged accuracy; the per-class CSV is P/R/F1 computed from the matrix; two runs
overlay in one call (one of them written by another program); few events never crash."""
import csv
import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer
from tensorboard.util import tensor_util

from tests.input_pipeline import util
from vit_jax import plots
from vit_jax import train
from vit_jax.configs import vit as vit_config
from vit_jax.evaluation import accuracy
from vit_jax.input_pipeline import ops

LOG_EVERY = EVAL_EVERY = 2
N_TEST = 20  # two eval batches of 16: the second has 12 padding rows, which must not count
# (start, total) of each segment: trained to 3, its step-3 checkpoint lost, resumed from 2 to 4,
# so step 3 is logged by both segments.
SEGMENTS = ((0, 3), (2, 4))
CURVES = ("loss.png", "metrics.png", "lr.png", "grad_norm.png", "images_per_sec.png")


def _config(data_dir, total_steps):
  c = vit_config.get_config("nano4,fashion_mnist")
  c.unlock()
  c.data_dir = str(data_dir)
  c.batch = c.batch_eval = 16
  c.total_steps, c.warmup_steps, c.checkpoint_every_steps = total_steps, 1, 2
  c.log_every_steps, c.eval_every_steps = LOG_EVERY, EVAL_EVERY
  c.shuffle_buffer, c.prefetch = 64, 1
  c.decay_type = "constant"  # one LR schedule across segments of different total_steps
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  data = util.make_idx_dir(tmp_path_factory.mktemp("data"), n_train=48, n_test=N_TEST, size=8)
  workdir = str(tmp_path_factory.mktemp("runs") / "run")
  train.train_and_evaluate(_config(data, SEGMENTS[0][1]), workdir, devices=jax.devices()[:1])
  # A crash after step 3 was logged but before its checkpoint was kept: step 3 is done again.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  train.train_and_evaluate(_config(data, SEGMENTS[1][1]), workdir, devices=jax.devices()[:1])
  return workdir


def _config_steps(kind):
  """The steps train.py writes `kind` at, over SEGMENTS: "train" (every LOG_EVERY steps and a
  segment's first and last), "rate" (images/s: the same but a segment's first, whose time
  includes compiling), "eval" (every EVAL_EVERY steps and the last)."""
  steps = set()
  for start, total in SEGMENTS:
    for s in range(start + 1, total + 1):
      logged = s % LOG_EVERY == 0 or s == total or s == start + 1
      keep = {"train": logged, "rate": logged and s != start + 1,
              "eval": s % EVAL_EVERY == 0 or s == total}[kind]
      if keep:
        steps.add(s)
  return np.array(sorted(steps))


def _tf_scalars(workdir):
  """{tag: (steps, values)} through TF's reader; a repeated step keeps the latest event's value."""
  latest = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        value = tf.make_ndarray(v.tensor) if v.HasField("tensor") else np.array(v.simple_value)
        if v.tag.startswith("_hparams_") or value.size != 1:
          continue
        key = (v.tag, event.step)
        if key not in latest or event.wall_time >= latest[key][0]:
          latest[key] = (event.wall_time, float(value))
  out = {}
  for (tag, step), (_, value) in sorted(latest.items()):
    out.setdefault(tag, ([], []))
    out[tag][0].append(step)
    out[tag][1].append(value)
  return {t: (np.array(s), np.array(v)) for t, (s, v) in out.items()}


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_run_ends_with_plots_of_each_logged_point_once(run):
  for name in CURVES + ("confusion.png", "per_class.png"):
    assert _is_png(os.path.join(run, "plots", name)), name
  assert len(glob.glob(os.path.join(run, "events.out.tfevents.*"))) == 2  # one per segment

  scalars = plots.read_runs([run])["run"]
  want = {"train/loss": "train", "train/accuracy": "train", "train/grad_norm": "train",
          "train/param_norm": "train", "train/lr/default": "train", "images_per_sec": "rate",
          "steps_per_sec": "rate", "eval/accuracy": "eval", "eval/loss": "eval",
          "eval/num_examples": "eval"}
  assert sorted(scalars) == sorted(want)  # the eval metric names are unchanged
  for tag, kind in want.items():
    np.testing.assert_array_equal(scalars[tag][0], _config_steps(kind), err_msg=tag)
  assert list(_config_steps("train")) == [1, 2, 3, 4]  # step 3 once, though logged twice

  reference = _tf_scalars(run)
  assert sorted(reference) == sorted(scalars)
  for tag, (steps, values) in reference.items():
    np.testing.assert_array_equal(scalars[tag][0], steps, err_msg=tag)
    np.testing.assert_array_equal(scalars[tag][1], values, err_msg=tag)
  assert scalars["eval/num_examples"][1].tolist() == [N_TEST] * 3

  # Every point is drawn: each curve's vertices are its series' steps and values.
  drawn = 0
  for fig in plots.curve_figures({"run": scalars}).values():
    for ax in fig.axes:
      for line in ax.get_lines():
        steps, values = scalars[line.get_label()]
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_array_equal(line.get_ydata(), values)
        drawn += 1
  assert drawn == len(want) - 2  # all but steps_per_sec and eval/num_examples


def test_confusion_matrix_and_per_class_csv(run):
  # One matrix per evaluation, from both segments.
  assert sorted(os.listdir(os.path.join(run, "eval"))) == [
      f"confusion_{s}.npz" for s in _config_steps("eval")]
  step, confusion = accuracy.read_confusion(run)
  assert step == 4 and confusion.shape == (10, 10)
  assert confusion.sum() == N_TEST  # padding rows excluded
  # Labels are index % 10: every class has its 2 test images as row sums.
  np.testing.assert_array_equal(confusion.sum(1), np.full(10, N_TEST // 10))
  steps, values = _tf_scalars(run)["eval/accuracy"]
  assert steps[-1] == 4
  np.testing.assert_allclose(np.trace(confusion) / confusion.sum(), values[-1], rtol=1e-6)

  with open(os.path.join(run, "plots", "per_class.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == list(ops.CLASSNAMES["fashion_mnist"])
  assert [int(r["index"]) for r in rows] == list(range(10))
  for i, r in enumerate(rows):
    tp, support, predicted = confusion[i, i], confusion[i].sum(), confusion[:, i].sum()
    p = tp / predicted if predicted else 0.0
    rc = tp / support if support else 0.0
    f1 = 2 * p * rc / (p + rc) if p + rc else 0.0
    assert (int(r["support"]), int(r["predicted"])) == (support, predicted)
    np.testing.assert_allclose([float(r["precision"]), float(r["recall"]), float(r["f1"])],
                               [p, rc, f1], rtol=1e-12, atol=1e-15, err_msg=r["name"])


def _write_events(workdir, points, wall_time=1000.0):
  """One event file of `points` [(step, tag, float or str)], as another program writes them:
  simple_value scalars, str as a text summary; event i at `wall_time + step`. Returns its path."""
  pattern = os.path.join(workdir, "events.out.tfevents.*")
  before = set(glob.glob(pattern))
  writer = event_file_writer.EventFileWriter(workdir)
  for step, tag, value in points:
    if isinstance(value, str):
      text = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
      v = summary_pb2.Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(value), metadata=text)
    else:
      v = summary_pb2.Summary.Value(tag=tag, simple_value=value)
    writer.add_event(event_pb2.Event(wall_time=wall_time + step, step=step,
                                     summary=summary_pb2.Summary(value=[v])))
  writer.close()
  (path,) = set(glob.glob(pattern)) - before
  return path


def _write_foreign(workdir):
  """Two files whose names sort against the order they were written in; step 3 is in both,
  1.25 in the later one."""
  os.makedirs(workdir)
  _write_events(workdir, [(1, "train/loss", 3.0), (1, "notes", "hello"), (2, "train/loss", 2.0),
                          (3, "train/loss", 1.5), (3, "val/prec@1", 0.5)], wall_time=1000.0)
  later = _write_events(workdir, [(3, "train/loss", 1.25), (4, "train/loss", 1.0)],
                        wall_time=2000.0)
  os.rename(later, os.path.join(workdir, "events.out.tfevents.0000000001.other"))


def test_overlay_of_two_runs_and_cli(run, tmp_path):
  foreign = str(tmp_path / "foreign")
  _write_foreign(foreign)
  runs = plots.read_runs([run, foreign])
  assert list(runs) == ["run", "foreign"]
  steps, values = runs["foreign"]["train/loss"]
  assert steps.tolist() == [1, 2, 3, 4] and values.tolist() == [3.0, 2.0, 1.25, 1.0]
  assert sorted(runs["foreign"]) == ["train/loss", "val/prec@1"]  # the text is not a curve

  labels = {l.get_label() for ax in plots.curve_figures(runs)["loss"].axes for l in ax.get_lines()}
  assert labels == {"run: train/loss", "run: eval/loss", "foreign: train/loss"}

  out = str(tmp_path / "compare")
  written = plots.main([run, foreign, "--out", out])
  names = sorted(os.path.basename(p) for p in written)
  # The confusion matrix is the classification run's own, named after it.
  assert names == sorted(CURVES + ("confusion_run.png", "per_class_run.png",
                                   "per_class_run.csv")), names
  assert all(_is_png(p) for p in written if p.endswith(".png"))
  with pytest.raises(SystemExit):  # several workdirs: where the plots go must be said
    plots.main([run, foreign])


def test_few_events_and_a_failing_plot_never_fail(tmp_path, monkeypatch, caplog):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  assert plots.write_plots([empty]) == []
  assert "no scalars" in plots.describe(plots.read_runs([empty]))
  with pytest.raises(FileNotFoundError, match="missing"):
    plots.read_runs([str(tmp_path / "missing")])

  one = str(tmp_path / "one")
  os.makedirs(one)
  _write_events(one, [(1, "train/loss", 2.0)])
  assert [os.path.basename(p) for p in plots.write_plots([one])] == ["loss.png"]

  def broken(*args, **kwargs):
    raise RuntimeError("disk full")
  monkeypatch.setattr(plots, "write_plots", broken)
  with caplog.at_level(logging.WARNING):
    train.write_plots(one)  # logs, does not raise
  assert "disk full" in caplog.text and one in caplog.text


def test_confusion_matrix_at_1000_classes(tmp_path):
  classes, batch = 1000, 64
  rng = np.random.default_rng(0)
  w = rng.normal(size=(8, classes)).astype(np.float32)
  images = rng.normal(size=(batch, 8)).astype(np.float32)
  labels = rng.integers(0, classes, batch)
  labels[:16] = np.argmax(images[:16] @ w, -1)  # some right, so the diagonal is tested
  mask = np.arange(batch) < 50
  eval_fn = jax.jit(accuracy.make_eval_fn(lambda p, x: x @ p, lambda l, y: jnp.zeros(len(y))))
  sums = jax.device_get(eval_fn(w, {"image": images, "labels": np.eye(classes)[labels],
                                    "_mask": mask}))
  want = np.zeros((classes, classes), np.int64)
  np.add.at(want, (labels[mask], np.argmax(images @ w, -1)[mask]), 1)
  np.testing.assert_array_equal(sums["confusion"], want)
  assert np.trace(want) == sums["correct"] >= 16
  path = accuracy.write_confusion(sums, 7, str(tmp_path))
  assert os.path.getsize(path) < 50_000  # compressed: not 8 MB
  step, back = accuracy.read_confusion(str(tmp_path))
  assert step == 7 and back.dtype == np.int64
  np.testing.assert_array_equal(back, want)
