"""Mixup and CutMix on whole batches inside tf.data (after batching), giving soft labels.

Each batch is mixed with itself rolled by one example, with one λ ~ Beta(alpha, alpha) per batch, as
upstream AugReg / big_vision do. Randomness is stateless, from the batch's seed.
"""
import tensorflow as tf


def sample_beta(seed, alpha: float) -> tf.Tensor:
  """λ ~ Beta(alpha, alpha) as G1 / (G1 + G2) of two Gamma(alpha) draws; float32 []."""
  g = tf.random.stateless_gamma([2], seed, alpha=tf.constant(alpha, tf.float32))
  return g[0] / (g[0] + g[1])


def mixup(batch: dict, seed, alpha: float, key="image", label_key="labels") -> dict:
  """image = λ x + (1-λ) roll(x), labels likewise, with the same λ; image [b, h, w, c] -> float32."""
  lam = sample_beta(seed, alpha)
  out = dict(batch)
  for k in (key, label_key):
    x = tf.cast(batch[k], tf.float32)
    out[k] = lam * x + (1 - lam) * tf.roll(x, 1, axis=0)
  return out


def cutmix(batch: dict, seed, alpha: float, key="image", label_key="labels") -> dict:
  """Pastes a box of roll(x) into x; box area ≈ (1-λ) of the image, clipped at the borders, and the
  labels mix with weight = the pasted area fraction exactly. image [b, h, w, c] -> float32."""
  s_lam, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  lam = sample_beta(s_lam, alpha)
  images = tf.cast(batch[key], tf.float32)  # as mixup, so a switch between them has one dtype
  h, w = tf.shape(images)[1], tf.shape(images)[2]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  cut = tf.sqrt(1.0 - lam)
  cut_h, cut_w = tf.cast(tf.round(hf * cut), tf.int32), tf.cast(tf.round(wf * cut), tf.int32)
  cy = tf.random.stateless_uniform([], s_y, 0, h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, w, dtype=tf.int32)
  y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + (cut_h + 1) // 2, 0, h)
  x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + (cut_w + 1) // 2, 0, w)
  rows, cols = tf.range(h), tf.range(w)
  inside = (((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])
  area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / (hf * wf)
  out = dict(batch)
  out[key] = tf.where(inside[None, :, :, None], tf.roll(images, 1, axis=0), images)
  labels = tf.cast(batch[label_key], tf.float32)
  out[label_key] = (1 - area) * labels + area * tf.roll(labels, 1, axis=0)
  return out


def get_batch_op(mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5):
  """fn(batch, seed) -> batch applying mixup and/or cutmix, or None if both alphas are 0.

  With both alphas > 0, each batch gets cutmix with probability switch_prob, else mixup.
  """
  for name, v in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
    if v < 0:
      raise ValueError(f"config.{name} must be >= 0, got {v}.")
  if not 0 <= switch_prob <= 1:
    raise ValueError(f"config.mix_switch_prob must be in [0, 1], got {switch_prob}.")
  if mixup_alpha and cutmix_alpha:
    def both(batch, seed):
      s_switch, s_mix = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
      use_cutmix = tf.random.stateless_uniform([], s_switch) < switch_prob
      return tf.cond(use_cutmix, lambda: cutmix(batch, s_mix, cutmix_alpha),
                     lambda: mixup(batch, s_mix, mixup_alpha))
    return both
  if mixup_alpha:
    return lambda batch, seed: mixup(batch, seed, mixup_alpha)
  if cutmix_alpha:
    return lambda batch, seed: cutmix(batch, seed, cutmix_alpha)
  return None
