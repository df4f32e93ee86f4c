"""PNG plots of training runs, read from their TensorBoard event files; several runs overlaid.

  python -m vit_jax.plots WORKDIR [WORKDIR ...] [--out DIR]

Curves against steps: train and eval loss (loss.png), every other logged metric, one panel per
metric name, train/accuracy beside eval/accuracy (metrics.png), the LR of each param group
(lr.png), the grad norm (grad_norm.png), images/s (images_per_sec.png). For classification runs,
from the last evaluation's confusion matrix (evaluation/accuracy.py writes it): confusion.png,
per_class.png and per_class.csv (precision, recall, F1 per class). `train.train_and_evaluate`
writes them to `workdir/plots/` at the end of every run. Matplotlib without pyplot: headless,
and a notebook's own backend is left alone.
"""
import argparse
import csv
import io
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from vit_jax import files
from vit_jax.evaluation import accuracy

Series = Tuple[np.ndarray, np.ndarray]  # steps int64 [points], values float64 [points]
EVENT_GLOB = "events.out.tfevents.*"
# Drawn with names (and counts) only where they stay readable; larger matrices as plain images.
MAX_NAMED_CLASSES = 40
MAX_ANNOTATED_CLASSES = 20
LINESTYLES = ("-", "--", ":", "-.")


# -- reading events -------------------------------------------------------------------------

def event_files(workdir: str) -> List[epath.Path]:
  """The event files directly in `workdir` (where clu's SummaryWriter puts them)."""
  return sorted(epath.Path(workdir).glob(EVENT_GLOB))


def read_event_file(path) -> Tuple[float, Dict[str, Dict[int, float]]]:
  """(wall time of its first summary, {tag: {step: value}}) of one event file.

  Scalars only: a tag counts when its summary metadata says scalar, or (metadata is written
  with a tag's first value only) when no metadata says otherwise and the value is one number.
  hparams, text and image summaries are left out. A truncated last record (a run killed while
  writing) ends the file; the records before it count.
  """
  from tensorboard.backend.event_processing import event_file_loader  # lazy: TF's protos
  from tensorboard.compat.proto import summary_pb2
  from tensorboard.util import tensor_util
  kinds: Dict[str, int] = {}
  out: Dict[str, Dict[int, float]] = {}
  first = float("inf")
  for event in event_file_loader.EventFileLoader(str(path)).Load():
    if not event.HasField("summary"):
      continue
    first = min(first, event.wall_time)
    for value in event.summary.value:
      if value.HasField("metadata") and value.metadata.data_class:
        kinds[value.tag] = value.metadata.data_class
      if kinds.get(value.tag, summary_pb2.DATA_CLASS_SCALAR) != summary_pb2.DATA_CLASS_SCALAR:
        continue
      if value.HasField("tensor"):
        array = tensor_util.make_ndarray(value.tensor)
        if array.size != 1 or array.dtype.kind not in "fiub":
          continue
        number = float(array.reshape(()))
      elif value.HasField("simple_value"):
        number = float(value.simple_value)
      else:
        continue
      out.setdefault(value.tag, {})[int(event.step)] = number
  return first, out


def read_scalars(workdir: str) -> Dict[str, Series]:
  """{tag: (steps, values)} of every scalar in `workdir`'s event files, sorted by step.

  A resumed run has one event file per segment, and repeats the steps after its last checkpoint:
  files are merged in the order they were written (by their first summary's wall time, as a
  file's name has whole seconds only), and a later file's value wins on a repeated step.
  """
  files = [read_event_file(f) + (str(f),) for f in event_files(workdir)]
  merged: Dict[str, Dict[int, float]] = {}
  for _, tags, _ in sorted(files, key=lambda f: (f[0], f[2])):
    for tag, points in tags.items():
      merged.setdefault(tag, {}).update(points)
  return {tag: (np.array(sorted(points), np.int64),
                np.array([points[s] for s in sorted(points)], np.float64))
          for tag, points in merged.items()}


def run_names(workdirs: Sequence[str]) -> List[str]:
  """Legend names: each workdir's last path component, or the whole paths where those clash."""
  names = [os.path.basename(str(w).rstrip("/")) or str(w) for w in workdirs]
  if len(set(names)) < len(names):
    names = [str(w) for w in workdirs]
  if len(set(names)) < len(names):  # the same workdir twice
    names = [f"{n} ({i})" for i, n in enumerate(names, 1)]
  return names


def read_runs(workdirs: Sequence[str]) -> Dict[str, Dict[str, Series]]:
  """{run name: {tag: (steps, values)}}, in the order of `workdirs` (see `read_scalars`)."""
  for w in workdirs:
    if not epath.Path(w).is_dir():
      raise FileNotFoundError(f"Workdir {w} does not exist or is not a directory.")
  return {name: read_scalars(w) for name, w in zip(run_names(workdirs), workdirs)}


def describe(runs: Dict[str, Dict[str, Series]]) -> str:
  """What was found, one line per run: tags, their numbers of points, the steps covered."""
  lines = []
  for run, scalars in runs.items():
    if not scalars:
      lines.append(f"{run}: no scalars in its TensorBoard event files ({EVENT_GLOB}).")
      continue
    steps = np.concatenate([s for s, _ in scalars.values()])
    tags = ", ".join(f"{t} ({len(s)})" for t, (s, _) in sorted(scalars.items()))
    lines.append(f"{run}: {len(scalars)} scalar tags, steps {steps.min()}-{steps.max()}: {tags}")
  return "\n".join(lines)


# -- curves ---------------------------------------------------------------------------------

def curve_panels(tags) -> Dict[str, Dict[str, List[str]]]:
  """Which PNG and which panel draws each tag: {png name: {panel title: [tags]}}.

  Metrics share a panel by their name without the evaluator/train prefix ("train/accuracy" and
  "eval/accuracy" -> "accuracy"). Left out: steps_per_sec (images_per_sec is the same rate) and
  example counts ("*/num_examples"), which are not curves.
  """
  pngs: Dict[str, Dict[str, List[str]]] = {
      "loss": {}, "metrics": {}, "lr": {}, "grad_norm": {}, "images_per_sec": {}}
  for tag in sorted(tags):
    name = tag.split("/", 1)[-1]
    if tag == "steps_per_sec" or name.endswith("num_examples"):
      continue
    if tag.startswith("train/lr/"):
      png, panel = "lr", "learning rate (per param group)"
    elif tag == "train/grad_norm":
      png, panel = "grad_norm", "grad norm (before clipping)"
    elif tag == "images_per_sec":
      png, panel = "images_per_sec", "training images/s"
    else:
      png, panel = ("loss" if name == "loss" else "metrics"), name
    pngs[png].setdefault(panel, []).append(tag)
  return {png: panels for png, panels in pngs.items() if panels}


def _figure(panels: int, width: float = 5.0, height: float = 3.6) -> Tuple[Figure, list]:
  cols = min(3, panels)
  rows = -(-panels // cols)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]


def curve_figures(runs: Dict[str, Dict[str, Series]]) -> Dict[str, Figure]:
  """{png name: Figure} for the tags that some run has (see `curve_panels`); every logged point
  is one vertex. One run: a colour per tag. Several: a colour per run, a line style per tag."""
  several = len(runs) > 1
  tags = {t for scalars in runs.values() for t in scalars}
  figures = {}
  for png, panels in curve_panels(tags).items():
    fig, axes = _figure(len(panels))
    for ax, (title, panel_tags) in zip(axes, panels.items()):
      for r, (run, scalars) in enumerate(runs.items()):
        for j, tag in enumerate(panel_tags):
          if tag not in scalars:
            continue
          steps, values = scalars[tag]
          # Evaluations are few: markers show where they were. Dense train curves stay lines.
          marker = "o" if not tag.startswith("train/") or len(steps) <= 50 else None
          ax.plot(steps, values, color=f"C{(r if several else j) % 10}",
                  linestyle=LINESTYLES[j % len(LINESTYLES)] if several else "-",
                  marker=marker, markersize=3, label=f"{run}: {tag}" if several else tag)
      ax.set_title(title)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      ax.legend(fontsize="small")
    figures[png] = fig
  return figures


# -- classification: confusion matrix and per-class report ----------------------------------

def class_names(workdir: str, num_classes: int) -> List[str]:
  """Names in label order, as the run's task gives them (its config.json: the dataset's names,
  else "0", "1", ...); indices for a workdir without a readable config, or names that do not
  match the matrix."""
  from vit_jax import configs  # pylint: disable=g-import-not-at-top
  try:
    config = configs.load_run_config(workdir)
  except (FileNotFoundError, ValueError) as e:
    logging.info("Class indices for %s: %s", workdir, e)
    return [str(i) for i in range(num_classes)]
  from vit_jax import train  # pylint: disable=g-import-not-at-top  (lazy: jax, the task)
  names = list(train.get_task(config).class_names())
  if len(names) != num_classes:
    logging.warning("%s: %d class names for a %d-class confusion matrix; using indices.",
                    workdir, len(names), num_classes)
    return [str(i) for i in range(num_classes)]
  return names


def write_per_class_csv(metrics: Dict[str, np.ndarray], names: Sequence[str], path) -> str:
  """One row per class: index, name, support, predicted, precision, recall, f1 (full float
  precision) from `accuracy.per_class`; returns the path."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  columns = ("support", "predicted", "precision", "recall", "f1")
  writer.writerow(("index", "name") + columns)
  for i, name in enumerate(names):
    writer.writerow([i, name] + [metrics[k][i].item() for k in columns])
  path = epath.Path(path)
  path.write_text(buf.getvalue())
  return str(path)


def confusion_figure(confusion: np.ndarray, names: Sequence[str], title: str) -> Figure:
  """confusion [classes, classes] (rows true, columns predicted): coloured by the fraction of
  each true class (readable under class imbalance), annotated with counts while small."""
  n = len(names)
  support = confusion.sum(1, keepdims=True)
  frac = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
  side = min(4.0 + 0.35 * n, 12.0)
  fig = Figure(figsize=(side + 1.5, side), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
  if n <= MAX_NAMED_CLASSES:
    ax.set_xticks(np.arange(n), names, rotation=90, fontsize="small")
    ax.set_yticks(np.arange(n), names, fontsize="small")
  if n <= MAX_ANNOTATED_CLASSES:
    for (i, j), count in np.ndenumerate(confusion):
      if count:
        ax.text(j, i, str(count), ha="center", va="center", fontsize="x-small",
                color="white" if frac[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  return fig


def per_class_figure(metrics: Dict[str, np.ndarray], names: Sequence[str], title: str) -> Figure:
  """Precision, recall and F1 per class: grouped bars with names while few, lines over the class
  index beyond MAX_NAMED_CLASSES."""
  n = len(names)
  fig = Figure(figsize=(min(max(6.0, 2.0 + 0.4 * n), 20.0), 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  x = np.arange(n)
  keys = ("precision", "recall", "f1")
  if n <= MAX_NAMED_CLASSES:
    width = 0.27
    for i, k in enumerate(keys):
      ax.bar(x + (i - 1) * width, metrics[k], width, label=k)
    ax.set_xticks(x, names, rotation=90, fontsize="small")
  else:
    for k in keys:
      ax.plot(x, metrics[k], linewidth=0.8, label=k)
    ax.set_xlabel("class index")
  ax.set_ylim(0.0, 1.05)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize="small")
  ax.set_title(title)
  return fig


def _save(fig: Figure, path) -> str:
  buf = io.BytesIO()  # one write: a gs:// path takes bytes, not a file matplotlib seeks in
  fig.savefig(buf, format="png", dpi=100)
  return files.write_atomic(path, buf.getvalue())


def _file_part(run: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", run).strip("_") or "run"


# -- all of it ------------------------------------------------------------------------------

def write_plots(workdirs: Sequence[str], out: Optional[str] = None) -> List[str]:
  """Writes every plot that the runs' data allow to `out` (default `workdir/plots` for one run;
  required for several); returns the paths written. Logs what was found and what is missing."""
  workdirs = [str(w) for w in workdirs]
  if out is None:
    if len(workdirs) != 1:
      raise ValueError(f"{len(workdirs)} workdirs: say where their plots go (out=...).")
    out = os.path.join(workdirs[0], "plots")
  runs = read_runs(workdirs)
  logging.info("Plots from %d run(s):\n%s", len(runs), describe(runs))
  out = epath.Path(out)
  curves = curve_figures(runs)
  confusions = {run: accuracy.read_confusion(w) for run, w in zip(runs, workdirs)}
  if curves or any(confusions.values()):
    out.mkdir(parents=True, exist_ok=True)
  written = [_save(fig, out / f"{png}.png") for png, fig in curves.items()]

  for run, workdir in zip(runs, workdirs):
    found = confusions[run]
    if found is None:
      continue
    step, confusion = found
    names = class_names(workdir, len(confusion))
    metrics = accuracy.per_class(confusion)
    total = int(confusion.sum())
    head = f"{run}: " if len(runs) > 1 else ""
    suffix = f"_{_file_part(run)}" if len(runs) > 1 else ""
    acc = np.trace(confusion) / max(total, 1)
    written.append(write_per_class_csv(metrics, names, out / f"per_class{suffix}.csv"))
    written.append(_save(confusion_figure(
        confusion, names, f"{head}confusion at step {step}: accuracy {acc:.2%} of {total:,}"),
        out / f"confusion{suffix}.png"))
    written.append(_save(per_class_figure(
        metrics, names, f"{head}per class at step {step} (macro F1 {metrics['f1'].mean():.3f})"),
        out / f"per_class{suffix}.png"))
  if written:
    logging.info("Plots written to %s: %s", out, ", ".join(os.path.basename(p) for p in written))
  else:
    logging.warning("Nothing to plot for %s: no scalars and no confusion matrix.", workdirs)
  return written


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
  parser = argparse.ArgumentParser(
      prog="python -m vit_jax.plots",
      description="PNG curves (and the classification report) of runs' TensorBoard events; "
                  "several workdirs are overlaid, named by their last path component.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--out", help="where the PNGs and CSVs go (default: WORKDIR/plots for one "
                                    "workdir; required for several)")
  args = parser.parse_args(argv)
  if len(args.workdirs) > 1 and not args.out:
    parser.error("--out is required with several workdirs.")
  missing = [w for w in args.workdirs if not epath.Path(w).is_dir()]
  if missing:
    parser.error(f"not a directory: {', '.join(missing)}")
  logging.set_verbosity(logging.INFO)  # write_plots says what it found and wrote
  written = write_plots(args.workdirs, args.out)
  print("\n".join(written) if written else "Nothing to plot.", flush=True)
  return written


if __name__ == "__main__":
  main()
