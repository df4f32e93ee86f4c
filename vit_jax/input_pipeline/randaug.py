"""RandAugment (Cubuk et al. 2019) in pure TF: the paper's 14 ops, stateless, no tensorflow_addons.

Magnitude scale: strength grows monotonically with the magnitude m. At m = 10 each op reaches the
maximum of upstream's TPU/big_vision implementation (rotate 30°, shear 0.3, translate 45% of the
side, enhance factor 1 ± 0.9, posterize to 4 bits), and keeps growing past it, so that AugReg's
magnitudes 15 and 20 are stronger still: at m = 20 rotate 60°, shear 0.6, translate 90%, enhance
1 ± 1.8 (clipped at 0), posterize to 1 bit, solarize everything. (Upstream maps m > 10 linearly too,
but its posterize and solarize get *weaker* as m grows and are no-ops from m = 20.)
"""
import math

import tensorflow as tf

MAX_MAGNITUDE = 30
FILL_VALUE = 128.0  # grey for pixels that geometric ops bring in from outside the image, as upstream


def _blend(degenerate, image, factor):
  """degenerate + factor * (image - degenerate) in [0, 255]: PIL ImageEnhance's formula."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image):
  """[h, w, 1] luma with PIL's "L" weights."""
  if image.shape[-1] == 1:
    return image
  return tf.tensordot(image, tf.constant([[0.299], [0.587], [0.114]]), 1)


# Elementwise selects below are written as arithmetic with 0/1 masks: tf.where on whole images is
# several times slower on CPU, and RandAugment's cost decides the pipeline's speed.


def _transform(image, matrix):
  """Projective warp of float [h, w, c]: output (x, y) takes input at matrix @ (x, y, 1); nearest
  neighbour as upstream (and cheaper than bilinear)."""
  shape = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.stack(matrix)[None], tf.float32),
      output_shape=shape, fill_value=FILL_VALUE, interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def autocontrast(image, m, sign):
  """Stretches each channel to [0, 255]."""
  del m, sign
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return (image - offset) * scale


def equalize(image, m, sign):
  """Histogram equalisation per channel, PIL ImageOps.equalize's lookup table."""
  del m, sign
  channels = image.shape[-1]
  # Value v of channel k is bin 256k + v: one histogram and one gather for all channels
  # (unsorted_segment_sum is ~20% faster than tf.math.bincount on CPU here).
  bins = tf.cast(image, tf.int32) + 256 * tf.range(channels)
  histo = tf.reshape(tf.math.unsorted_segment_sum(tf.ones_like(bins), bins, 256 * channels),
                     [channels, 256])
  top = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.int32)
  last = tf.gather(histo, top, batch_dims=1)  # count of each channel's top value
  step = (tf.reduce_sum(histo, axis=1) - last) // 255  # [c]
  safe = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(histo, axis=1) + safe // 2) // safe
  lut = tf.clip_by_value(tf.concat([tf.zeros_like(lut[:, :1]), lut[:, :-1]], 1), 0, 255)
  lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])  # one grey level: unchanged
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), bins), tf.float32)


def rotate(image, m, sign):
  """Rotates by ±3m degrees about the centre."""
  angle = sign * 3.0 * m * math.pi / 180
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
  y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def solarize(image, m, sign):
  """Inverts pixels >= 256 (1 - m/20): none at m = 0, the upper half at 10, all from 20."""
  del sign
  threshold = tf.maximum(256.0 * (1.0 - m / 20.0), 0.0)
  return image + tf.cast(image >= threshold, tf.float32) * (255.0 - 2.0 * image)


def color(image, m, sign):
  """Saturation: blends with the grayscale image, factor 1 ± 0.09m (>= 0)."""
  return _blend(_grayscale(image), image, tf.maximum(1.0 + sign * 0.09 * m, 0.0))


def posterize(image, m, sign):
  """Keeps round(8 - 0.4m) bits (at least 1) of each value."""
  del sign
  bits = tf.clip_by_value(tf.round(8.0 - 0.4 * m), 1.0, 8.0)
  shift = tf.cast(8.0 - bits, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift),
                                       shift), tf.float32)


def contrast(image, m, sign):
  """Blends with the mean grey level, factor 1 ± 0.09m (>= 0)."""
  mean = tf.reduce_mean(_grayscale(image))
  return _blend(mean, image, tf.maximum(1.0 + sign * 0.09 * m, 0.0))


def brightness(image, m, sign):
  """Blends with black, factor 1 ± 0.09m (>= 0)."""
  return _blend(tf.zeros_like(image), image, tf.maximum(1.0 + sign * 0.09 * m, 0.0))


def sharpness(image, m, sign):
  """Blends with PIL's SMOOTH-filtered image (border pixels kept), factor 1 ± 0.09m (>= 0)."""
  # PIL's SMOOTH kernel is [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum + 4 centre) / 13;
  # the box as two separable 3-tap sums of slices costs less than a depthwise convolution.
  rows = image[:-2] + image[1:-1] + image[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  smooth = tf.round((box + 4.0 * image[1:-1, 1:-1]) / 13.0)
  degenerate = image + tf.pad(smooth - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])
  return _blend(degenerate, image, tf.maximum(1.0 + sign * 0.09 * m, 0.0))


def shear_x(image, m, sign):
  """Shears horizontally by ±0.03m about the centre row."""
  shear = sign * 0.03 * m
  cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1) / 2
  return _transform(image, [1.0, shear, -shear * cy, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, m, sign):
  """Shears vertically by ±0.03m about the centre column."""
  shear = sign * 0.03 * m
  cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1) / 2
  return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, -shear * cx, 0.0, 0.0])


def _shift(image, fraction, axis):
  """Shifts by round(fraction * size) whole pixels along axis (0: down, 1: right), filling grey:
  a pad and a slice, much cheaper than a warp, and what a nearest-neighbour warp gives."""
  size = tf.shape(image)[axis]
  shift = tf.clip_by_value(tf.cast(tf.round(fraction * tf.cast(size, tf.float32)), tf.int32),
                           -size, size)
  pads = [[0, 0], [0, 0], [0, 0]]
  pads[axis] = [tf.maximum(shift, 0), tf.maximum(-shift, 0)]
  padded = tf.pad(image, pads, constant_values=FILL_VALUE)
  begin = [0, 0, 0]
  begin[axis] = tf.maximum(-shift, 0)
  return tf.slice(padded, tf.stack(begin), tf.shape(image))


def translate_x(image, m, sign):
  """Shifts horizontally by ±4.5m % of the width (upstream: 100 px of 224 at m = 10)."""
  return _shift(image, sign * 0.045 * m, axis=1)


def translate_y(image, m, sign):
  """Shifts vertically by ±4.5m % of the height."""
  return _shift(image, sign * 0.045 * m, axis=0)


def identity(image, m, sign):
  del m, sign
  return image


# The paper's 14 ops (upstream's TPU code has 16: Invert, Cutout, SolarizeAdd, and no Identity).
OPS = {
    "Identity": identity, "AutoContrast": autocontrast, "Equalize": equalize, "Rotate": rotate,
    "Solarize": solarize, "Color": color, "Posterize": posterize, "Contrast": contrast,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y,
}


def apply_op(name: str, image: tf.Tensor, magnitude: float, sign: float = 1.0) -> tf.Tensor:
  """One op by name on uint8 [h, w, c] -> uint8 (for tests and inspection)."""
  out = OPS[name](tf.cast(image, tf.float32), tf.constant(magnitude, tf.float32),
                  tf.constant(sign, tf.float32))
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float) -> tf.Tensor:
  """Applies `num_layers` ops, each drawn uniformly (with a random sign) from OPS.

  Args:
    image: uint8 [h, w, c] (c static).
    seed: int64 [2] stateless seed.
  Returns:
    uint8 [h, w, c].
  """
  x = tf.cast(image, tf.float32)
  m = tf.constant(magnitude, tf.float32)
  branches = list(OPS.values())
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)
                               if num_layers else tf.zeros([0, 2], tf.int64)):
    s_op, s_sign = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 2))
    which = tf.random.stateless_uniform([], s_op, 0, len(branches), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    # Rounding after each op keeps integer pixel values, as the uint8 images upstream ops see.
    x = tf.switch_case(which, [lambda f=f: tf.round(f(x, m, sign)) for f in branches])
    x = tf.ensure_shape(tf.clip_by_value(x, 0.0, 255.0), image.shape)
  return tf.cast(x, tf.uint8)
