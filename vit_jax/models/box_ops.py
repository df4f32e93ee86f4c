"""Box geometry, the one copy: format conversions, areas, IoU and generalized IoU (GIoU).

Pure jax.numpy; works on numpy inputs too (host post-processing) and broadcasts over leading
axes. Formats: `cxcywh` = (center x, center y, width, height), what OWL-ViT predicts, in [0, 1]
of the (padded, square) model input; `xyxy` = (x0, y0, x1, y1); `xywh` = COCO's pixel
(x, y, width, height), used only at the file boundary.
"""
import jax.numpy as jnp


def cxcywh_to_xyxy(boxes):
  """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes):
  """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
  x0, y0, x1, y1 = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def xywh_to_xyxy(boxes):
  """[..., 4] COCO (x, y, w, h) -> [..., 4] (x0, y0, x1, y1)."""
  x, y, w, h = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
  return jnp.stack([x, y, x + w, y + h], axis=-1)


def xyxy_to_xywh(boxes):
  """[..., 4] (x0, y0, x1, y1) -> [..., 4] COCO (x, y, w, h)."""
  x0, y0, x1, y1 = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
  return jnp.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def area(boxes_xyxy):
  """[..., 4] xyxy -> [...]; degenerate (inverted) boxes have area 0."""
  b = jnp.asarray(boxes_xyxy)
  return jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)


def _intersection_union(a, b):
  """a [..., n, 4], b [..., m, 4] xyxy -> (intersection, union), each [..., n, m]."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[..., :, None] + area(b)[..., None, :] - inter
  return inter, union


def iou(a, b, eps: float = 1e-9):
  """Pairwise IoU. a [..., n, 4], b [..., m, 4] xyxy -> [..., n, m] in [0, 1].

  `eps` keeps two empty boxes at IoU 0 rather than NaN.
  """
  inter, union = _intersection_union(a, b)
  return inter / jnp.maximum(union, eps)


def generalized_iou(a, b, eps: float = 1e-9):
  """Pairwise generalized IoU (Rezatofighi et al. 2019): IoU - (|C| - |A u B|) / |C|, C the
  smallest enclosing box. a [..., n, 4], b [..., m, 4] xyxy -> [..., n, m] in [-1, 1]."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  inter, union = _intersection_union(a, b)
  lt = jnp.minimum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  enclosing = wh[..., 0] * wh[..., 1]
  return inter / jnp.maximum(union, eps) - (enclosing - union) / jnp.maximum(enclosing, eps)
