"""Tasks: what differs between classification, contrastive (CLIP) and detection (OWL-ViT).

The training interface is in classification.py's docstring. For using a trained model, a task
also says how its outputs become predictions and what an export holds:
  predict_head(params, options) -> PredictHead      predict.py runs it over images
  export_functions(params) -> {name: ExportFunction}   export.py writes each one
so predict and export need no per-task code of their own.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass
class PredictHead:
  """How a task turns a batch of preprocessed images into predictions.

  fn(params, aux, images [batch, H, W, C]) -> {name: [batch, ...]}: on the devices, jitted once
    by the caller (batch sharded, params and aux replicated).
  aux: arrays `fn` needs besides the params (CLIP: the label or text embeddings; OWL-ViT: the
    query embeddings), computed once on the host side; None if none.
  records(outputs, info) -> one JSON-able dict per image: outputs are `fn`'s arrays for n images
    (numpy), info is {"orig_size": int [n, 2] (height, width) of the files as decoded}.
  summary(record) -> a short line for the printed table.
  draw(pixels uint8 [h, w, 3], record, path): optional, writes a PNG of the record (detection).
  class_names: when records name one class each ("class": its index), the names in index order
    (predict then scores files in class-named folders).
  """
  fn: Callable
  records: Callable[[Dict[str, np.ndarray], Dict[str, np.ndarray]], list]
  summary: Callable[[dict], str]
  aux: Any = None
  draw: Optional[Callable] = None
  class_names: Optional[Sequence[str]] = None


@dataclasses.dataclass
class ExportFunction:
  """One inference function an export writes (params baked in as constants).

  fn(*inputs) -> {output name: array}.
  inputs: ((name, shape, dtype), ...): a shape entry that is a string is a dynamic dimension
    ("batch", "queries"); the exporters turn it into each format's own symbolic dimension.
  doc: what the inputs hold and how to preprocess them, written beside the export.
  """
  fn: Callable
  inputs: Sequence[Tuple[str, Tuple[Any, ...], Any]]
  doc: str


def top_k_labels(scores: np.ndarray, names: Sequence[str], k: int) -> list:
  """[n, classes] scores -> per row the k best [{"label", "index", "score"}], best first (ties:
  the lower index first)."""
  k = min(k, scores.shape[-1])
  order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  return [[{"label": names[i], "index": int(i), "score": float(s[i])} for i in row]
          for s, row in zip(scores, order)]


def format_top(top: list, k: int = 3) -> str:
  """'Sneaker 0.91, Sandal 0.05, ...' for a record's top-k list."""
  return ", ".join(f"{t['label']} {t['score']:.3f}" for t in top[:k])
