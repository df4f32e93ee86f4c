"""Evaluation: what a task measures over a full eval split, and the metrics themselves.

accuracy.py (classification), zeroshot.py and retrieval.py (dual encoders), prompts.py (zero-shot
templates). `Evaluator` is how a task hands an evaluation to the training loop (train.evaluate).
"""
import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass
class Evaluator:
  """One evaluation a task runs over a full eval split.

  step(params, aux, batch): per eval batch, inside the back-end's compiled program;
    reduce="sum": returns per-device sums (padding rows masked out with `batch["_mask"]`), added
    over devices and batches; reduce="gather": returns per-example arrays [batch, ...], which are
    gathered over devices and hosts and concatenated in split order, padding rows included
    (return `_mask` too, to drop them).
  finalize(outputs) -> {metric: value}, on the host, once per evaluation.
  prepare(params) -> aux: once per evaluation, before the batches, from one logical copy of the
    params (e.g. zero-shot class embeddings); the compiled step receives it as an argument, so
    one compilation serves every evaluation. None: aux is None.
  write(outputs, step, workdir): optional, on the host after finalize, on process 0 only: files
    that a number cannot hold (detection PNGs, per-class CSV reports), under `workdir`.
  A task may also give a plain `(eval_fn(params, batch) -> sums, finalize)` pair (accuracy).
  """
  step: Callable
  finalize: Callable
  prepare: Optional[Callable] = None
  reduce: str = "sum"
  write: Optional[Callable] = None
