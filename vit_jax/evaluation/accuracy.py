"""Top-1 accuracy, loss and the confusion matrix over a full eval split (padded batches carry a
`_mask`); the matrix is written per evaluation for the per-class report (plots.py)."""
import io
from typing import Callable, Dict, Optional, Tuple

from etils import epath
import jax.numpy as jnp
import numpy as np

from vit_jax import evaluation
from vit_jax import files

CONFUSION_DIR = "eval"  # workdir/eval/confusion_{step}.npz


def make_eval_fn(apply_fn: Callable, loss_fn: Callable) -> Callable:
  """Returns `eval_fn(params, batch) -> per-device sums` for the parallel back-end.

  batch: image [batch, H, W, C], labels [batch, classes], _mask [batch] (False on padding).
  Sums, not means: the back-end adds them over devices and the host over batches, so padded
  rows never count and every real example counts once. "confusion" [classes, classes] int32
  counts (true, predicted) pairs, with the same argmaxes as "correct": its trace is "correct".
  """

  def eval_fn(params, batch):
    logits = apply_fn(params, batch["image"])
    mask = batch["_mask"].astype(jnp.float32)
    true, pred = jnp.argmax(batch["labels"], -1), jnp.argmax(logits, -1)
    classes = logits.shape[-1]
    # A scatter of `batch` ones: O(batch) work; the [classes, classes] buffer (4 MB at 1000
    # classes) is the only cost, once per eval batch.
    confusion = jnp.zeros((classes, classes), jnp.int32).at[true, pred].add(
        batch["_mask"].astype(jnp.int32))
    return {
        "correct": jnp.sum((true == pred) * mask),
        "loss": jnp.sum(loss_fn(logits, batch["labels"]) * mask),
        "count": jnp.sum(mask),
        "confusion": confusion,
    }

  return eval_fn


def finalize(sums: Dict[str, float]) -> Dict[str, float]:
  count = float(sums["count"])
  return {"accuracy": float(sums["correct"]) / count, "loss": float(sums["loss"]) / count,
          "num_examples": count}


def confusion_path(workdir: str, step: int) -> epath.Path:
  return epath.Path(workdir) / CONFUSION_DIR / f"confusion_{step}.npz"


def write_confusion(sums, step: int, workdir: str) -> str:
  """Writes `sums["confusion"]` [classes, classes] (rows true, columns predicted) to
  `workdir/eval/confusion_{step}.npz` (key "confusion", int64); returns the path.

  Compressed: at 1000 classes the mostly-zero matrix is tens of kB, not 8 MB, per evaluation.
  Written to a temporary name and renamed, so a reader never sees half a file.
  """
  buf = io.BytesIO()
  np.savez_compressed(buf, confusion=np.asarray(sums["confusion"], np.int64))
  return files.write_atomic(confusion_path(workdir, step), buf.getvalue())


def read_confusion(workdir: str) -> Optional[Tuple[int, np.ndarray]]:
  """(step, confusion [classes, classes] int64) of the latest evaluation that wrote one, or None
  when `workdir` has none (another task, or a run from before the matrix was written)."""
  steps = {}
  for f in (epath.Path(workdir) / CONFUSION_DIR).glob("confusion_*.npz"):
    step = f.name[len("confusion_"):-len(".npz")]
    if step.isdigit():
      steps[int(step)] = f
  if not steps:
    return None
  step = max(steps)
  with steps[step].open("rb") as f:
    data = np.load(io.BytesIO(f.read()))
    if "confusion" not in data:
      raise KeyError(f"{steps[step]}: no 'confusion' array (found {list(data.keys())}).")
    matrix = data["confusion"]
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"{steps[step]}: confusion must be [classes, classes]; found {matrix.shape}.")
  return step, matrix


def per_class(confusion: np.ndarray) -> Dict[str, np.ndarray]:
  """Per-class metrics of a confusion matrix [classes, classes] (rows true, columns predicted).

  Returns [classes] arrays: support (true count), predicted (predicted count), precision,
  recall, f1. An undefined ratio (a class never predicted, or with no examples) is 0, as
  sklearn's `zero_division=0`; support and predicted show which.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  support, predicted = confusion.sum(1), confusion.sum(0)
  ratio = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)
  precision, recall = ratio(tp, predicted), ratio(tp, support)
  return {"support": support.astype(np.int64), "predicted": predicted.astype(np.int64),
          "precision": precision, "recall": recall,
          "f1": ratio(2 * precision * recall, precision + recall)}


def make_evaluator(apply_fn: Callable, loss_fn: Callable) -> evaluation.Evaluator:
  """Accuracy and loss (`finalize`), and the confusion matrix written per evaluation."""
  eval_fn = make_eval_fn(apply_fn, loss_fn)
  return evaluation.Evaluator(step=lambda params, aux, batch: eval_fn(params, batch),
                              finalize=finalize, write=write_confusion)
