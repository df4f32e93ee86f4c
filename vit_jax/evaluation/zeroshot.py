"""Zero-shot classification of a dual encoder: prompt-ensembled class embeddings, top-1/top-5.

Two halves, because the class embeddings depend on the params but not on the images:
- `class_embeddings(...)` runs the text tower over every (class, template) prompt once per
  evaluation, on the host's schedule (fixed-size batches, one compiled shape), and returns
  numpy `[classes, width]`;
- `make_eval_fn(encode_image_fn)` gives `eval_fn(params, class_embeds, batch) -> per-device
  sums` for the eval loop: the class embeddings are an ARGUMENT, not a closure constant, so one
  compiled step serves every evaluation (a captured array would be baked into the program and
  force a recompile whenever the params, hence the embeddings, change). To run it through a
  back-end whose eval step is `(params, batch)`, pass the pair as the first argument, e.g.
  `backend.compile_eval_step(lambda pc, b: eval_fn(pc[0], pc[1], b))` called with
  `(params, backend.put_state(class_embeds))`.
Sums, not means, as `accuracy.py`: padding rows (`batch["_mask"]` False) never count.
"""
from typing import Callable, Dict, Sequence, Union

from jax import lax
import jax.numpy as jnp
import numpy as np

from vit_jax.evaluation import prompts


def _normalize(x, xp=np, eps=1e-12):
  """L2-normalise rows (as torch's F.normalize: a zero row stays zero instead of becoming NaN)."""
  return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)


def class_embeddings(encode_text_fn: Callable, tokenizer_fn: Callable, classnames: Sequence[str],
                     templates: Union[str, Sequence[str]] = prompts.DEFAULT,
                     batch_size: int = 256) -> np.ndarray:
  """Prompt-ensembled text embedding per class (OpenAI's Prompt_Engineering_for_ImageNet).

  For each class: encode `template.format(classname)` for every template, L2-normalise each,
  average, renormalise.
  encode_text_fn: tokens [batch_size, seq] -> [batch_size, width] (the text tower with its
    params bound, typically jitted; it always sees `batch_size` rows: the last batch is padded).
  tokenizer_fn: list of strings -> int tokens [len, seq].
  templates: anything `prompts.get_templates` takes.
  Returns float32 numpy [classes, width], unit rows.
  """
  templates = prompts.get_templates(templates)
  classnames = list(classnames)
  if not classnames:
    raise ValueError("class_embeddings: expected at least one class name; found none.")
  if batch_size < 1:
    raise ValueError(f"class_embeddings: batch_size must be >= 1; found {batch_size}.")
  texts = [t.format(c) for c in classnames for t in templates]  # class-major
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    tokens = np.asarray(tokenizer_fn(chunk))
    if tokens.shape[0] != len(chunk):
      raise ValueError(f"tokenizer_fn: expected {len(chunk)} rows of tokens for {len(chunk)} "
                       f"texts; found shape {tokens.shape}.")
    pad = batch_size - len(chunk)
    if pad:
      tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)])
    emb = np.asarray(encode_text_fn(tokens), np.float32)
    if emb.ndim != 2 or emb.shape[0] != batch_size:
      raise ValueError(f"encode_text_fn: expected [{batch_size}, width] for tokens "
                       f"{tokens.shape}; found {emb.shape}.")
    out.append(emb[:len(chunk)])
  emb = np.concatenate(out).reshape(len(classnames), len(templates), -1)
  return _normalize(_normalize(emb).mean(axis=1))


def make_eval_fn(encode_image_fn: Callable, k: int = 5) -> Callable:
  """Returns `eval_fn(params, class_embeds, batch) -> per-device sums` (see the module doc).

  encode_image_fn(params, images [batch, H, W, C]) -> [batch, width]; normalised here.
  class_embeds: [classes, width], unit rows (from `class_embeddings`).
  batch: "image", "labels" (one-hot [batch, classes] or int [batch]), "_mask" [batch].
  Sums: "top1", "top5" (label among the k=5 best classes; all classes if there are fewer),
  "count". Ties between classes go to the lower class index (lax.top_k's order).
  """

  def eval_fn(params, class_embeds, batch):
    images = _normalize(encode_image_fn(params, batch["image"]).astype(jnp.float32), jnp)
    logits = images @ class_embeds.astype(jnp.float32).T  # [batch, classes]
    labels = batch["labels"]
    if labels.ndim == 2:
      if labels.shape[1] != class_embeds.shape[0]:
        raise ValueError(f"zero-shot eval: labels have {labels.shape[1]} classes; the class "
                         f"embeddings {class_embeds.shape[0]}.")
      labels = jnp.argmax(labels, axis=-1)
    _, top = lax.top_k(logits, min(k, logits.shape[-1]))  # [batch, k]
    hits = top == labels[:, None].astype(top.dtype)
    mask = batch["_mask"].astype(jnp.float32)
    return {"top1": jnp.sum(hits[:, 0] * mask), "top5": jnp.sum(jnp.any(hits, -1) * mask),
            "count": jnp.sum(mask)}

  return eval_fn


def finalize(sums: Dict[str, float]) -> Dict[str, float]:
  count = float(sums["count"])
  if not count:
    raise ValueError("zero-shot eval: no (unpadded) examples were counted.")
  return {"top1": float(sums["top1"]) / count, "top5": float(sums["top5"]) / count,
          "num_examples": count}
