"""Position-embedding resampling to a new patch grid, and big_vision's fixed sincos embedding.

The one place that resizes `pos_embedding` ([1, prefix + rows * cols, width]); every loader calls
`resample_posemb`. Methods (the names `config.posemb_resize_method` takes):

  bilinear           upstream vision_transformer and big_vision: `scipy.ndimage.zoom(order=1)`
                     on the [rows, cols, width] grid (corner-aligned).
  bicubic            HF transformers' `interpolate_pos_encoding`: torch `F.interpolate(mode=
                     'bicubic', align_corners=False)`, Keys cubic with a = -0.75, edges clamped.
  bicubic_antialias  timm's `resample_abs_pos_embed` default (`antialias=True`): PIL-style cubic
                     (a = -0.5) whose support widens when shrinking, weights renormalised at edges.

The two bicubic variants are written as dense [new, old] weight matrices in numpy (applied
separably), so they need no torch, and match torch's kernels to float32 rounding.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np

METHODS = ("bilinear", "bicubic", "bicubic_antialias")


def grid_from_tokens(num_tokens: int) -> Tuple[int, int]:
  """The square (rows, cols) grid holding `num_tokens` patch tokens, or raise ValueError."""
  side = int(round(math.sqrt(num_tokens)))
  if side * side != num_tokens:
    raise ValueError(
        f"Cannot tell the patch grid of {num_tokens} position embeddings: not a square number. "
        "Pass the image size (image_size=(height, width)) so the grid is known.")
  return side, side


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel W(x) with parameter `a` (support |x| < 2)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(old: int, new: int) -> np.ndarray:
  """[new, old] weights of torch's bicubic resize (align_corners=False, no antialias)."""
  scale = old / new
  # Half-pixel centres; unlike linear modes, torch does not clamp the source coordinate for cubic.
  src = (np.arange(new) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base
  weights = np.zeros((new, old))
  for k in range(-1, 3):  # the four taps at base-1 .. base+2
    idx = np.clip(base + k, 0, old - 1).astype(int)  # edge taps repeat the border value
    np.add.at(weights, (np.arange(new), idx), _cubic(t - k, a=-0.75))
  return weights


def _bicubic_antialias_matrix(old: int, new: int) -> np.ndarray:
  """[new, old] weights of torch's `antialias=True` bicubic (the PIL resampling scheme)."""
  scale = old / new
  support_scale = max(scale, 1.0)  # shrinking widens the filter: that is the anti-aliasing
  support = 2.0 * support_scale
  weights = np.zeros((new, old))
  for i in range(new):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), old)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) / support_scale, a=-0.5)
    weights[i, lo:hi] = w / w.sum()
  return weights


def resample_grid(grid: np.ndarray, new_grid: Sequence[int], method: str) -> np.ndarray:
  """Resamples a [rows, cols, width] grid of embeddings to [new_rows, new_cols, width]."""
  if method not in METHODS:
    raise ValueError(f"Unknown posemb resize method {method!r}: expected one of {METHODS}.")
  rows, cols, _ = grid.shape
  new_rows, new_cols = (int(v) for v in new_grid)
  if (rows, cols) == (new_rows, new_cols):
    return grid
  if method == "bilinear":
    import scipy.ndimage  # pylint: disable=g-import-not-at-top  # only this method needs scipy
    zoom = (new_rows / rows, new_cols / cols, 1)
    out = scipy.ndimage.zoom(grid.astype(np.float32), zoom, order=1)
    assert out.shape[:2] == (new_rows, new_cols), (out.shape, new_grid)
    return out
  matrix = _bicubic_matrix if method == "bicubic" else _bicubic_antialias_matrix
  wr, wc = matrix(rows, new_rows), matrix(cols, new_cols)
  out = np.einsum("ir,rcd,jc->ijd", wr, grid.astype(np.float64), wc)
  return out.astype(np.float32)


def resample_posemb(posemb: np.ndarray, *, num_prefix: int, old_grid: Optional[Sequence[int]],
                    new_grid: Sequence[int], method: str) -> np.ndarray:
  """Resamples [1, num_prefix + rows*cols, width] position embeddings to `new_grid`.

  The first `num_prefix` rows (the class token's) are kept as they are. `old_grid` None means
  square. Returns [1, num_prefix + new_rows*new_cols, width] in the input's dtype.
  """
  prefix, tokens = posemb[:, :num_prefix], posemb[0, num_prefix:]
  old_grid = tuple(old_grid) if old_grid else grid_from_tokens(len(tokens))
  if old_grid[0] * old_grid[1] != len(tokens):
    raise ValueError(f"Position embeddings have {len(tokens)} patch tokens, which is not the "
                     f"grid {old_grid}.")
  grid = resample_grid(tokens.reshape(*old_grid, -1), new_grid, method)
  out = np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1]).astype(posemb.dtype)], axis=1)
  return out.astype(posemb.dtype)


def sincos_2d(rows: int, cols: int, width: int, temperature: float = 10_000.) -> np.ndarray:
  """big_vision's fixed 2-D sin-cos position embedding (MoCo v3 layout): [1, rows*cols, width].

  Checkpoints of big_vision models with `posemb='sincos2d'` store no position embedding; this
  recreates it (at any grid, so no resampling is needed).
  """
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, found {width}.")
  y, x = np.mgrid[:rows, :cols]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)
