"""Loss functions: pure, jax-only. Classification: logits and labels [batch, classes] -> [batch];
image-text (CLIP InfoNCE, SigLIP): embeddings [batch, width] -> (scalar, metrics)."""
import math
from typing import Dict, Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp
import optax


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
