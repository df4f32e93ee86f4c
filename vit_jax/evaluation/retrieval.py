"""Image-text retrieval recall R@k (COCO / Flickr30k style), as pure numpy on a split's embeddings.

Retrieval ranks every item against the WHOLE split, so unlike accuracy it cannot be summed batch
by batch: the caller collects the unpadded image and text embeddings of the split (all hosts'),
then calls `retrieval_metrics` once.

Ties are scored pessimistically: a wrong item with exactly the same similarity as the right one
ranks ahead of it. A collapsed model (every embedding equal) then scores 0, not a perfect 1;
with continuous embeddings ties do not occur and the choice changes nothing.
"""
import math
from typing import Dict, Optional, Sequence

import numpy as np


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{what}: expected [n, width]; found shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: {int(np.sum(~np.isfinite(x)))} non-finite values.")
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _mask(mask, n: int, what: str) -> np.ndarray:
  if mask is None:
    return np.ones(n, bool)
  mask = np.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"{what}: expected [{n}] (one flag per row); found shape {mask.shape}.")
  return mask.astype(bool)


def retrieval_metrics(image_embeds: np.ndarray, text_embeds: np.ndarray,
                      text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      image_mask: Optional[np.ndarray] = None,
                      text_mask: Optional[np.ndarray] = None,
                      chunk_size: int = 1024) -> Dict[str, float]:
  """Recall@k both ways, by cosine similarity (embeddings are L2-normalised here).

  image_embeds: [n_img, width]; text_embeds: [n_txt, width].
  text_to_image: int [n_txt], the row of image_embeds each caption belongs to; an image may have
    several captions, and every (unpadded) image needs at least one.
  image_mask [n_img], text_mask [n_txt]: False on padding rows (the eval batches' `_mask`), which
    are dropped before ranking; a padded image's captions are dropped with it. None: all real.
  image->text: a hit when ANY of the image's captions is among its k most similar captions.
  text->image: a hit when the caption's own image is among its k most similar images.
  chunk_size: rows scored at a time, bounding memory to [chunk_size, n] similarities.
  Returns {"i2t/R@k": fraction, "t2i/R@k": fraction} for each k, in [0, 1].
  """
  images = _unit_rows(image_embeds, "image_embeds")
  texts = _unit_rows(text_embeds, "text_embeds")
  if images.shape[1] != texts.shape[1]:
    raise ValueError(f"retrieval_metrics: image width {images.shape[1]} != text width "
                     f"{texts.shape[1]}.")
  owner = np.asarray(text_to_image)
  if owner.shape != (texts.shape[0],) or not np.issubdtype(owner.dtype, np.integer):
    raise ValueError(f"text_to_image: expected int [{texts.shape[0]}] (one image row per "
                     f"caption); found {owner.dtype} {owner.shape}.")
  image_keep = _mask(image_mask, images.shape[0], "image_mask")
  text_keep = _mask(text_mask, texts.shape[0], "text_mask")
  if text_keep.any() and (owner[text_keep].min() < 0 or owner[text_keep].max() >= len(images)):
    raise ValueError(f"text_to_image: indices must lie in [0, {len(images)}); found "
                     f"[{owner[text_keep].min()}, {owner[text_keep].max()}].")
  text_keep &= image_keep[np.clip(owner, 0, len(images) - 1)]
  # Drop padding and renumber the images that remain.
  new_index = np.cumsum(image_keep) - 1
  images, texts, owner = images[image_keep], texts[text_keep], new_index[owner[text_keep]]
  n_img, n_txt = images.shape[0], texts.shape[0]
  if not n_img:
    raise ValueError("retrieval_metrics: no (unpadded) images.")
  uncaptioned = np.setdiff1d(np.arange(n_img), owner)
  if uncaptioned.size:
    raise ValueError(f"retrieval_metrics: {uncaptioned.size} of {n_img} images have no caption "
                     f"(first: {uncaptioned[:5].tolist()}); image->text recall is undefined.")
  ks = [int(k) for k in ks]
  if not ks or min(ks) < 1:
    raise ValueError(f"retrieval_metrics: ks must be positive; found {ks}.")

  # Rank of the right answer = number of WRONG items at least as similar (pessimistic ties).
  i2t_rank = np.empty(n_img, np.int64)
  for s in range(0, n_img, chunk_size):
    rows = np.arange(s, min(s + chunk_size, n_img))
    sims = images[rows] @ texts.T  # [chunk, n_txt]
    mine = owner[None, :] == rows[:, None]
    best = np.max(np.where(mine, sims, -np.inf), axis=1)  # the image's best caption
    i2t_rank[rows] = np.sum((sims >= best[:, None]) & ~mine, axis=1)
  t2i_rank = np.empty(n_txt, np.int64)
  for s in range(0, n_txt, chunk_size):
    rows = np.arange(s, min(s + chunk_size, n_txt))
    sims = texts[rows] @ images.T  # [chunk, n_img]
    mine = np.arange(n_img)[None, :] == owner[rows, None]
    right = sims[np.arange(len(rows)), owner[rows]]
    t2i_rank[rows] = np.sum((sims >= right[:, None]) & ~mine, axis=1)

  out = {}
  for k in ks:
    out[f"i2t/R@{k}"] = float(np.mean(i2t_rank < k))
  for k in ks:
    out[f"t2i/R@{k}"] = float(np.mean(t2i_rank < k))
  return out


def chance_recall(n: int, k: int, num_relevant: int = 1) -> float:
  """R@k of a random ranking of `n` candidates of which `num_relevant` are right.

  1 - C(n - m, k) / C(n, k): the chance that at least one of the m right items is among k drawn
  without replacement. text->image: `chance_recall(n_images, k)`; image->text with m captions per
  image: `chance_recall(n_captions, k, m)`.
  """
  if n < 1 or k < 1 or not 1 <= num_relevant <= n:
    raise ValueError(f"chance_recall: expected n >= 1, k >= 1, 1 <= num_relevant <= n; found "
                     f"n={n}, k={k}, num_relevant={num_relevant}.")
  if k >= n - num_relevant + 1:
    return 1.0
  return 1.0 - math.comb(n - num_relevant, k) / math.comb(n, k)
