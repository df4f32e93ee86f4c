"""Loss functions: pure, jax-only. Classification: logits and labels [batch, classes] -> [batch];
image-text (CLIP InfoNCE, SigLIP): embeddings [batch, width] -> (scalar, metrics); detection
(OWL-ViT): focal loss, matching cost, Hungarian matcher, set-prediction loss."""
import math
from typing import Dict, Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.models import box_ops


def softmax_xent(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Cross-entropy with (soft) label distributions. -> [batch]."""
  return optax.softmax_cross_entropy(logits, labels)


def sigmoid_xent(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Independent binary cross-entropy per class, summed over classes (big_vision). -> [batch]."""
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


CLASSIFICATION_LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def classification_loss(name: str, label_smoothing: float = 0.0):
  """Returns `loss(logits, labels) -> [batch]` for `config.loss`, with optional smoothing."""
  if name not in CLASSIFICATION_LOSSES:
    raise ValueError(f"config.loss={name!r}: expected one of {sorted(CLASSIFICATION_LOSSES)}.")
  fn = CLASSIFICATION_LOSSES[name]
  if not label_smoothing:
    return fn
  return lambda logits, labels: fn(logits, optax.smooth_labels(labels, label_smoothing))


# --- Image-text losses (CLIP, SigLIP) ---------------------------------------------------------
#
# Both take one device's L2-normalised embeddings, image_embeds and text_embeds [batch, width],
# where row i of each is the same pair, and return (scalar loss, dict of scalar metrics).
#
# Global batch. Under jit/pjit the batch is one global array: axis_name=None, nothing to gather.
# Under pmap (axis_name="batch") each device all_gathers the other devices' embeddings and scores
# ITS OWN rows against EVERY column (open_clip's local_loss with gather_with_grad), so the
# negatives are the whole global batch, and the loss is the mean over this device's rows: the
# train step's pmean over devices of equal-sized local means is the global mean. Gradients need
# no special care: all_gather transposes to psum_scatter, so each device's gradient w.r.t. its
# own embeddings is that of the SUM of all devices' losses (its rows also serve as other devices'
# negatives); for replicated params, the pmean of those gradients is exactly the one-device
# gradient on the whole batch (tests/test_losses_contrastive.py checks both).

CLIP_MAX_LOG_SCALE = math.log(100.0)  # OpenAI CLIP clamps the logit scale at 100


def _check_pair(image_embeds, text_embeds, where: str) -> None:
  if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
    raise ValueError(f"{where}: expected image_embeds and text_embeds of one shape [batch, width];"
                     f" found {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}.")


def _gather(x: jnp.ndarray, axis_name: Optional[str]) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """[batch, width] on this device -> ([global_batch, width], row offset of this device's rows)."""
  if axis_name is None:
    return x, jnp.zeros((), jnp.int32)
  offset = lax.axis_index(axis_name) * x.shape[0]
  return lax.all_gather(x, axis_name, tiled=True), offset


def _scale(logit_scale, max_log_scale: Optional[float]) -> jnp.ndarray:
  log_scale = jnp.asarray(logit_scale, jnp.float32)
  if log_scale.ndim:
    raise ValueError(f"logit_scale: expected a scalar; found shape {tuple(log_scale.shape)}.")
  if max_log_scale is not None:
    # Clamping here rather than on the stored param (as CLIP's training code does after each
    # step) gives the same forward value; above the cap the scale simply gets no gradient.
    log_scale = jnp.minimum(log_scale, max_log_scale)
  return jnp.exp(log_scale)


def _top1(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))


def contrastive_loss(image_embeds: jnp.ndarray, text_embeds: jnp.ndarray, logit_scale,
                     axis_name: Optional[str] = None,
                     max_log_scale: Optional[float] = CLIP_MAX_LOG_SCALE
                     ) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """Symmetric InfoNCE of CLIP: mean of the image->text and text->image cross-entropies.

  image_embeds, text_embeds: [batch, width], L2-normalised by the caller; row i of each is a pair.
  logit_scale: scalar, the LOG of the logit multiplier, as CLIP/HF store it (init log(1/0.07));
    clamped at `max_log_scale` (ln 100, as CLIP; None: no clamp), then exponentiated.
  axis_name: the pmap axis ("batch") to gather negatives over, or None when the batch is global.
  Returns (loss, metrics): loss is the mean over this device's rows; metrics are the in-batch
  top-1 accuracies "i2t_top1", "t2i_top1" (against the global batch) and "scale" (exp'd, clamped).
  """
  _check_pair(image_embeds, text_embeds, "contrastive_loss")
  scale = _scale(logit_scale, max_log_scale)
  image_embeds = image_embeds.astype(jnp.float32)
  text_embeds = text_embeds.astype(jnp.float32)
  all_images, offset = _gather(image_embeds, axis_name)
  all_texts, _ = _gather(text_embeds, axis_name)
  targets = offset + jnp.arange(image_embeds.shape[0])
  logits_i2t = scale * image_embeds @ all_texts.T  # [batch, global_batch]
  logits_t2i = scale * text_embeds @ all_images.T  # [batch, global_batch]

  def xent(logits):
    correct = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - correct)

  loss = 0.5 * (xent(logits_i2t) + xent(logits_t2i))
  return loss, {"i2t_top1": _top1(logits_i2t, targets), "t2i_top1": _top1(logits_t2i, targets),
                "scale": scale}


def siglip_loss(image_embeds: jnp.ndarray, text_embeds: jnp.ndarray, logit_scale, logit_bias,
                axis_name: Optional[str] = None, max_log_scale: Optional[float] = None
                ) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """Sigmoid loss of SigLIP (big_vision): every image-text pair is an independent binary label.

  logits = exp(logit_scale) * image @ text.T + logit_bias, labels +1 on the diagonal, -1 elsewhere;
  loss = -sum(log_sigmoid(labels * logits)) / batch, i.e. the mean over images of each row's sum
  over ALL texts of the global batch (big_vision's siglip trainer).
  image_embeds, text_embeds: [batch, width], L2-normalised by the caller.
  logit_scale, logit_bias: scalars; the scale is a LOG (SigLIP inits log 10 and bias -10), not
    clamped by default (big_vision does not), or clamped at `max_log_scale` if given.
  axis_name: as `contrastive_loss`. Metrics: "i2t_top1", "t2i_top1", "scale", "bias".
  """
  _check_pair(image_embeds, text_embeds, "siglip_loss")
  scale = _scale(logit_scale, max_log_scale)
  bias = jnp.asarray(logit_bias, jnp.float32)
  image_embeds = image_embeds.astype(jnp.float32)
  text_embeds = text_embeds.astype(jnp.float32)
  all_texts, offset = _gather(text_embeds, axis_name)
  n, n_global = image_embeds.shape[0], all_texts.shape[0]
  targets = offset + jnp.arange(n)
  logits = scale * image_embeds @ all_texts.T + bias  # [batch, global_batch]
  labels = jnp.where(targets[:, None] == jnp.arange(n_global)[None, :], 1.0, -1.0)
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
  # Text->image accuracy only: the loss needs no gathered images, so keep them off the tape.
  all_images, _ = _gather(lax.stop_gradient(image_embeds), axis_name)
  logits_t2i = lax.stop_gradient(scale) * text_embeds @ all_images.T
  return loss, {"i2t_top1": _top1(logits, targets), "t2i_top1": _top1(logits_t2i, targets),
                "scale": scale, "bias": bias}


# --- Detection (OWL-ViT): set-prediction losses and the bipartite matcher --------------------
#
# Shapes. Predictions: pred_logits [batch, preds, queries] (one prediction per image patch;
# padding queries' logits are -1e6), pred_boxes [batch, preds, 4] cxcywh in [0, 1]. Targets:
# boxes [batch, boxes, 4] cxcywh, labels [batch, boxes, queries] multi-hot (box j is an instance
# of query k; a box may answer several queries), box_mask [batch, boxes] (real boxes; padding
# rows are all zero), query_mask [batch, queries] (real queries).
#
# As in DETR/scenic, every real box is matched to one distinct prediction by a minimum-cost
# bipartite matching (under stop_gradient); the class loss then asks each matched prediction for
# its box's label row and every other prediction for all-zeros, and the box losses (L1 + 1-GIoU)
# act on the matched pairs only.

MATCHERS = ("jax", "scipy")
NORMALIZATIONS = ("per_example", "global")


def sigmoid_focal_loss(logits: jnp.ndarray, targets: jnp.ndarray, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0) -> jnp.ndarray:
  """Elementwise sigmoid focal loss (Lin et al. 2017; scenic's `focal_sigmoid_cross_entropy`).

  loss = BCE(logits, targets) * (1 - p_t)^gamma * (alpha * y + (1 - alpha) * (1 - y)), with
  p = sigmoid(logits), p_t = y * p + (1 - y) * (1 - p). alpha=None: no alpha weighting; gamma=0
  and alpha=None: plain binary cross-entropy. logits, targets: same shape [...] -> [...].
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  if logits.shape != targets.shape:
    raise ValueError(f"sigmoid_focal_loss: logits {tuple(logits.shape)} and targets "
                     f"{tuple(targets.shape)} must have one shape.")
  # log_sigmoid on both sides keeps the BCE finite for logits like the -1e6 of padding queries.
  loss = -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))
  if gamma:
    p = jax.nn.sigmoid(logits)
    one_minus_p_t = targets * (1 - p) + (1 - targets) * p
    loss = loss * one_minus_p_t ** gamma
  if alpha is not None:
    loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
  return loss


def _fill_invalid(cost: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Replaces entries that are not `valid` or not finite by a finite cost above every valid one.

  cost [batch, preds, boxes], valid broadcastable to it -> [batch, preds, boxes]. The fill is per
  example (max valid + 10% + 10, as scenic's `max * 1.1 + 10` but safe for negative maxima), so
  it never wins against a real entry and keeps the matcher's arithmetic finite.
  """
  valid = valid & jnp.isfinite(cost)
  max_valid = jnp.max(jnp.where(valid, cost, -jnp.inf), axis=(1, 2), keepdims=True)
  max_valid = jnp.where(jnp.isfinite(max_valid), max_valid, 0.0)
  fill = max_valid + 0.1 * jnp.abs(max_valid) + 10.0
  return jnp.where(valid, cost, fill)


def detection_cost(pred_logits: jnp.ndarray, pred_boxes: jnp.ndarray, labels: jnp.ndarray,
                   boxes: jnp.ndarray, box_mask: jnp.ndarray, *, class_weight: float,
                   bbox_weight: float, giou_weight: float, focal_alpha: Optional[float],
                   focal_gamma: float) -> jnp.ndarray:
  """Matching cost of every (prediction, box) pair (scenic's owl_vit `compute_cost`).

  pred_logits [b, n, q], pred_boxes [b, n, 4] cxcywh, labels [b, m, q] multi-hot, boxes [b, m, 4]
  cxcywh, box_mask [b, m] -> cost [b, n, m] =
    class_weight * sum_k labels[m, k] * (pos[n, k] - neg[n, k])    (not divided by #labels)
    + bbox_weight * |pred_box - box|_1 (cxcywh) - giou_weight * GIoU(pred_box, box),
  where pos = -log sigmoid(l) and neg = -log sigmoid(-l) are the costs of calling the query
  present / absent, focal-weighted (pos *= alpha * sigmoid(-l)^gamma, neg *= (1 - alpha) *
  sigmoid(l)^gamma; alpha None: no alpha factor). Padding boxes' columns and non-finite entries
  get a large finite cost (see `_fill_invalid`). Labels of padding queries must be zero.
  """
  pred_logits = jnp.asarray(pred_logits, jnp.float32)
  pred_boxes = jnp.asarray(pred_boxes, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  box_mask = jnp.asarray(box_mask, bool)
  _check_detection_shapes(pred_logits, pred_boxes, labels, boxes, box_mask, "detection_cost")
  pos = -jax.nn.log_sigmoid(pred_logits)
  neg = -jax.nn.log_sigmoid(-pred_logits)
  if focal_gamma:
    pos = pos * jax.nn.sigmoid(-pred_logits) ** focal_gamma
    neg = neg * jax.nn.sigmoid(pred_logits) ** focal_gamma
  if focal_alpha is not None:
    pos, neg = focal_alpha * pos, (1 - focal_alpha) * neg
  # HIGHEST: a TF32/bf16 matmul would round the class cost, and with it the matching.
  cost_class = jnp.einsum("bnq,bmq->bnm", pos - neg, labels, precision=lax.Precision.HIGHEST)
  cost_bbox = jnp.sum(jnp.abs(pred_boxes[:, :, None, :] - boxes[:, None, :, :]), axis=-1)
  cost_giou = -box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred_boxes),
                                       box_ops.cxcywh_to_xyxy(boxes))
  cost = class_weight * cost_class + bbox_weight * cost_bbox + giou_weight * cost_giou
  return _fill_invalid(cost, box_mask[:, None, :])


def _check_detection_shapes(pred_logits, pred_boxes, labels, boxes, box_mask, where):
  b, n, q = pred_logits.shape if pred_logits.ndim == 3 else (None,) * 3
  m = boxes.shape[1] if boxes.ndim == 3 else None
  expected = {"pred_logits": (b, n, q), "pred_boxes": (b, n, 4), "labels": (b, m, q),
              "boxes": (b, m, 4), "box_mask": (b, m)}
  found = {"pred_logits": pred_logits.shape, "pred_boxes": pred_boxes.shape,
           "labels": labels.shape, "boxes": boxes.shape, "box_mask": box_mask.shape}
  if b is None or m is None or any(tuple(found[k]) != v for k, v in expected.items()):
    raise ValueError(
        f"{where}: expected pred_logits [b, n, q], pred_boxes [b, n, 4], labels [b, m, q], "
        f"boxes [b, m, 4], box_mask [b, m]; found "
        + ", ".join(f"{k} {tuple(v)}" for k, v in found.items()) + ".")


def _jv_assign(cost: jnp.ndarray, num_rows: jnp.ndarray) -> jnp.ndarray:
  """Min-cost assignment of rows [0, num_rows) of cost [m, n] (m <= n) to distinct columns.

  Shortest augmenting paths with dual potentials (Jonker-Volgenant; the variant of Crouse 2016
  that scipy's `linear_sum_assignment` implements): rows are inserted one at a time, each by a
  Dijkstra search over reduced costs `cost[i, j] - u[i] - v[j]` (>= 0 for the current matching),
  then the potentials are updated and the path flipped. Each row costs O(rows_so_far * n).
  Returns col4row [m] int32, -1 for rows >= num_rows. One example; vmap over the batch.
  """
  m, n = cost.shape
  rows = jnp.arange(m)

  def insert_row(cur, state):
    u, v, col4row, row4col = state

    def search_cond(s):
      return (s["sink"] < 0) & (s["steps"] < n)  # steps: a guard, n columns bound the search

    def search_step(s):
      i = s["i"]
      reduced = s["min_val"] + cost[i] - u[i] - v
      better = ~s["sc"] & (reduced < s["shortest"])
      shortest = jnp.where(better, reduced, s["shortest"])
      path = jnp.where(better, i, s["path"])
      open_cost = jnp.where(s["sc"], jnp.inf, shortest)
      low = jnp.min(open_cost)
      ties = open_cost == low
      # Among equally short columns prefer a free one: the search ends there, one step early.
      free_ties = ties & (row4col < 0)
      j = jnp.where(jnp.any(free_ties), jnp.argmax(free_ties), jnp.argmax(ties))
      return {"i": jnp.maximum(row4col[j], 0), "sink": jnp.where(row4col[j] < 0, j, -1),
              "min_val": low, "shortest": shortest, "path": path,
              "sr": s["sr"].at[i].set(True), "sc": s["sc"].at[j].set(True),
              "steps": s["steps"] + 1}

    s = lax.while_loop(search_cond, search_step, {
        "i": cur, "sink": jnp.int32(-1), "min_val": jnp.zeros((), cost.dtype),
        "shortest": jnp.full((n,), jnp.inf, cost.dtype), "path": jnp.full((n,), -1, jnp.int32),
        "sr": jnp.zeros((m,), bool), "sc": jnp.zeros((n,), bool), "steps": jnp.int32(0)})
    min_val, shortest = s["min_val"], s["shortest"]
    # Dual update: keeps reduced costs >= 0 and those on the matching (and the new path) at 0.
    row_delta = jnp.where(rows == cur, min_val,
                          min_val - shortest[jnp.maximum(col4row, 0)])
    u = jnp.where(s["sr"], u + row_delta, u)
    v = jnp.where(s["sc"], v - (min_val - shortest), v)

    def flip_cond(f):
      return ~f[1] & (f[0] >= 0)  # j < 0 only if the search failed, impossible for finite costs

    def flip_step(f):
      j, _, col4row, row4col = f
      i = s["path"][j]
      row4col = row4col.at[j].set(i)
      nxt = col4row[i]
      col4row = col4row.at[i].set(j)
      return nxt, i == cur, col4row, row4col

    _, _, col4row, row4col = lax.while_loop(
        flip_cond, flip_step, (s["sink"], jnp.asarray(False), col4row, row4col))
    return u, v, col4row, row4col

  state = (jnp.zeros((m,), cost.dtype), jnp.zeros((n,), cost.dtype),
           jnp.full((m,), -1, jnp.int32), jnp.full((n,), -1, jnp.int32))
  return lax.fori_loop(0, num_rows, insert_row, state)[2]


def _match_jax(cost: jnp.ndarray, box_mask: jnp.ndarray) -> jnp.ndarray:
  """cost [b, n, m] (finite), box_mask [b, m] -> pred_index [b, m] int32, -1 for padding boxes."""

  def one(cost_nm, mask):
    # Real boxes first (stable), so the row loop stops after them: padding rows take no
    # prediction and cost no time.
    order = jnp.argsort(~mask, stable=True)
    col4row = _jv_assign(cost_nm.T[order], jnp.sum(mask).astype(jnp.int32))
    return jnp.full(mask.shape, -1, jnp.int32).at[order].set(col4row)

  return jax.vmap(one)(cost, box_mask)


def _scipy_host(cost: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
  """Host side of method="scipy": cost [..., n, m], box_mask [..., m] -> [..., m] int32."""
  import scipy.optimize  # pylint: disable=g-import-not-at-top
  cost, box_mask = np.asarray(cost), np.asarray(box_mask, bool)
  n, m = cost.shape[-2:]
  flat_cost, flat_mask = cost.reshape(-1, n, m), box_mask.reshape(-1, m)
  out = np.full(flat_mask.shape, -1, np.int32)
  for k in range(flat_cost.shape[0]):
    real = np.flatnonzero(flat_mask[k])
    if real.size:
      # Padding columns sliced away: they can neither take a prediction nor cost any time.
      box_rows, preds = scipy.optimize.linear_sum_assignment(flat_cost[k][:, real].T)
      out[k, real[box_rows]] = preds
  return out.reshape(box_mask.shape)


def _match_scipy(cost: jnp.ndarray, box_mask: jnp.ndarray) -> jnp.ndarray:
  # broadcast_all: under vmap the host function sees one array with the mapped axes in front.
  # Under jit with a sharded batch, XLA gathers the operands onto one device for the callback
  # (and warns "Involuntary full rematerialization"): prefer method="jax" with the pjit backend.
  return jax.pure_callback(_scipy_host, jax.ShapeDtypeStruct(box_mask.shape, jnp.int32),
                           cost, box_mask, vmap_method="broadcast_all")


def hungarian_matching(cost: jnp.ndarray, box_mask: jnp.ndarray,
                       method: str = "jax") -> jnp.ndarray:
  """Minimum-cost matching of every real box to a distinct prediction, jittable and pmap-able.

  cost [b, n, m] (predictions x boxes, e.g. `detection_cost`), box_mask [b, m] bool, m <= n.
  Returns pred_index [b, m] int32: the prediction matched to box j, minimising the summed cost
  over real boxes; -1 for padding boxes (box_mask False), which take no prediction. No gradient
  (the cost goes through stop_gradient). Non-finite costs are replaced by a large finite one.
  method: "jax" (shortest augmenting paths in lax loops, vmapped; runs on the accelerator) or
  "scipy" (`scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback`).
  """
  cost = lax.stop_gradient(jnp.asarray(cost, jnp.float32))
  box_mask = jnp.asarray(box_mask, bool)
  if cost.ndim != 3 or box_mask.shape != (cost.shape[0], cost.shape[2]):
    raise ValueError(f"hungarian_matching: expected cost [b, n, m] and box_mask [b, m]; found "
                     f"cost {tuple(cost.shape)}, box_mask {tuple(box_mask.shape)}.")
  if cost.shape[2] > cost.shape[1]:
    raise ValueError(f"hungarian_matching: more boxes (m={cost.shape[2]}) than predictions "
                     f"(n={cost.shape[1]}) in cost {tuple(cost.shape)}; every box needs its own "
                     "prediction.")
  cost = _fill_invalid(cost, box_mask[:, None, :])
  if method == "jax":
    return _match_jax(cost, box_mask)
  if method == "scipy":
    return _match_scipy(cost, box_mask)
  raise ValueError(f"hungarian_matching: method={method!r}; expected one of {MATCHERS}.")


def _pair_boxes(pred_boxes, boxes, fn):
  """fn (iou/generalized_iou) of paired boxes [b, m, 4] cxcywh -> [b, m]."""
  a = box_ops.cxcywh_to_xyxy(pred_boxes)[..., None, :]
  t = box_ops.cxcywh_to_xyxy(boxes)[..., None, :]
  return fn(a, t)[..., 0, 0]


def detection_loss(outputs: Dict[str, jnp.ndarray], targets: Dict[str, jnp.ndarray], *,
                   matcher="jax", class_weight: float = 1.0, bbox_weight: float = 1.0,
                   giou_weight: float = 1.0, cost_class_weight: Optional[float] = None,
                   cost_bbox_weight: Optional[float] = None,
                   cost_giou_weight: Optional[float] = None,
                   focal_alpha: Optional[float] = 0.3, focal_gamma: float = 2.0,
                   normalization: str = "per_example", axis_name: Optional[str] = None
                   ) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """OWL-ViT's set-prediction loss: Hungarian matching, then focal class loss + L1 + GIoU.

  outputs: {"pred_logits" [b, n, q], "pred_boxes" [b, n, 4] cxcywh}; targets: {"boxes" [b, m, 4]
  cxcywh, "labels" [b, m, q] multi-hot, "box_mask" [b, m], "query_mask" [b, q]}.
  matcher: a `hungarian_matching` method name, or a callable (cost [b,n,m], box_mask) -> [b, m].
  cost_*_weight: the matching cost's weights; None takes the loss weight (as scenic does).
  The class loss is the focal loss over ALL predictions x real queries (matched prediction ->
  its box's label row; every other prediction -> zeros), summed; the box losses are L1 (summed
  over cxcywh) and 1 - GIoU over matched pairs. Each is normalised by the number of real boxes:
  "per_example" (scenic's): per image, floor 1, then the mean over the batch; "global": the
  batch's sum over the batch's total boxes (floor 1). Under pmap pass `axis_name`: the total is
  then taken over all devices and scaled so that the train step's pmean of this loss is the
  global-batch value (loss = local sum * devices / lax.psum(local total)).
  Returns (loss, metrics): loss = class_weight * loss_class + bbox_weight * loss_bbox +
  giou_weight * loss_giou; metrics loss_class, loss_bbox, loss_giou (unweighted), num_boxes
  (mean real boxes per image) and matched_iou (mean IoU of the matched pairs).
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"detection_loss: normalization={normalization!r}; expected one of "
                     f"{NORMALIZATIONS}.")
  for name, d, keys in (("outputs", outputs, ("pred_logits", "pred_boxes")),
                        ("targets", targets, ("boxes", "labels", "box_mask", "query_mask"))):
    missing = [k for k in keys if k not in d]
    if missing:
      raise KeyError(f"detection_loss: {name} lacks {missing}; found keys {sorted(d)}.")
  logits = jnp.asarray(outputs["pred_logits"], jnp.float32)
  pred_boxes = jnp.asarray(outputs["pred_boxes"], jnp.float32)
  boxes = jnp.asarray(targets["boxes"], jnp.float32)
  box_mask = jnp.asarray(targets["box_mask"], bool)
  query_mask = jnp.asarray(targets["query_mask"], bool)
  labels = jnp.asarray(targets["labels"], jnp.float32)
  _check_detection_shapes(logits, pred_boxes, labels, boxes, box_mask, "detection_loss")
  b, n, q = logits.shape
  if query_mask.shape != (b, q):
    raise ValueError(f"detection_loss: expected query_mask [b, q] = {(b, q)}; found "
                     f"{tuple(query_mask.shape)}.")
  # Padding boxes and padding queries carry no label, whatever the batch holds there.
  labels = labels * box_mask[:, :, None] * query_mask[:, None, :]

  cost = detection_cost(
      lax.stop_gradient(logits), lax.stop_gradient(pred_boxes), labels, boxes, box_mask,
      class_weight=class_weight if cost_class_weight is None else cost_class_weight,
      bbox_weight=bbox_weight if cost_bbox_weight is None else cost_bbox_weight,
      giou_weight=giou_weight if cost_giou_weight is None else cost_giou_weight,
      focal_alpha=focal_alpha, focal_gamma=focal_gamma)
  match = matcher if callable(matcher) else (
      lambda c, mask: hungarian_matching(c, mask, method=matcher))
  pred_index = lax.stop_gradient(match(cost, box_mask))
  matched = box_mask & (pred_index >= 0)

  # Class targets [b, n, q]: scatter each matched box's label row onto its prediction; unmatched
  # boxes go to index n, out of range, and are dropped.
  scatter_index = jnp.where(matched, pred_index, n)
  class_targets = jnp.zeros((b, n, q), jnp.float32).at[
      jnp.arange(b)[:, None], scatter_index].add(labels, mode="drop")
  focal = sigmoid_focal_loss(logits, class_targets, alpha=focal_alpha, gamma=focal_gamma)
  class_sum = jnp.sum(jnp.where(query_mask[:, None, :], focal, 0.0), axis=(1, 2))  # [b]

  matched_boxes = jnp.take_along_axis(pred_boxes, jnp.maximum(pred_index, 0)[..., None], axis=1)
  l1 = jnp.sum(jnp.abs(matched_boxes - boxes), axis=-1)
  giou = _pair_boxes(matched_boxes, boxes, box_ops.generalized_iou)
  bbox_sum = jnp.sum(jnp.where(matched, l1, 0.0), axis=1)
  giou_sum = jnp.sum(jnp.where(matched, 1.0 - giou, 0.0), axis=1)

  num_boxes = jnp.sum(box_mask, axis=1).astype(jnp.float32)  # [b]
  if normalization == "per_example":
    normalize = lambda per_example: jnp.mean(per_example / jnp.maximum(num_boxes, 1.0))
  else:
    total, devices = jnp.sum(num_boxes), 1.0
    if axis_name is not None:
      # x devices: the train step's pmean of (local sum * devices / total) is (sum / total).
      total, devices = lax.psum(total, axis_name), lax.psum(1.0, axis_name)
    normalize = lambda per_example: jnp.sum(per_example) * devices / jnp.maximum(total, 1.0)
  loss_class, loss_bbox, loss_giou = (normalize(class_sum), normalize(bbox_sum),
                                      normalize(giou_sum))
  loss = class_weight * loss_class + bbox_weight * loss_bbox + giou_weight * loss_giou
  pair_iou = lax.stop_gradient(_pair_boxes(matched_boxes, boxes, box_ops.iou))
  num_matched = jnp.sum(matched)
  metrics = {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou,
             "num_boxes": jnp.mean(num_boxes),
             "matched_iou": jnp.sum(jnp.where(matched, pair_iou, 0.0))
                            / jnp.maximum(num_matched, 1).astype(jnp.float32)}
  return loss, metrics
