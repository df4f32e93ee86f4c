"""Top-1 accuracy and loss over a full eval split (padded batches carry a `_mask`)."""
from typing import Callable, Dict

import jax.numpy as jnp


def make_eval_fn(apply_fn: Callable, loss_fn: Callable) -> Callable:
  """Returns `eval_fn(params, batch) -> per-device sums` for the parallel back-end.

  batch: image [batch, H, W, C], labels [batch, classes], _mask [batch] (False on padding).
  Sums, not means: the back-end adds them over devices and the host over batches, so padded
  rows never count and every real example counts once.
  """

  def eval_fn(params, batch):
    logits = apply_fn(params, batch["image"])
    mask = batch["_mask"].astype(jnp.float32)
    correct = jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1)
    return {
        "correct": jnp.sum(correct * mask),
        "loss": jnp.sum(loss_fn(logits, batch["labels"]) * mask),
        "count": jnp.sum(mask),
    }

  return eval_fn


def finalize(sums: Dict[str, float]) -> Dict[str, float]:
  count = float(sums["count"])
  return {"accuracy": float(sums["correct"]) / count, "loss": float(sums["loss"]) / count,
          "num_examples": count}
