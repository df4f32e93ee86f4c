"""CLIP dual encoder: the ViT image tower (`img`) and the causal text tower (`txt`), projected
into one embedding space, with a learned logit scale (and, for SigLIP, a logit bias).

  model = CLIP(**configs.models.clip_kwargs(configs.models.get_clip_config("b32")))
  out = model.apply({"params": params}, images, tokens)   # dict, see CLIP.__call__
  z = model.apply({"params": params}, images, method=CLIP.encode_image)   # [batch, embed_dim]

Params: `img/...` (VisionTransformer names, `img/head` is the projection), `txt/...`
(TextTransformer names, `txt/head` is the projection), `logit_scale` (scalar, the LOG of the
logit multiplier, as OpenAI and HF store it) and, with `logit_bias_init` set, `logit_bias`.
"""
import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import text as text_model
from vit_jax.models import vit

Dtype = Any

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's temperature 0.07


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """x / ||x|| over the last axis, in fp32. [batch, width] -> [batch, width].

  The floor on the squared norm keeps the value and the gradient finite for an all-zero row and
  changes nothing for any norm above 1e-6.
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class CLIP(nn.Module):
  """images [batch, height, width, 3] and int tokens [batch, tokens] -> embeddings and logits.

  Attributes:
    image: VisionTransformer keyword arguments (a model config section: `patches`,
      `hidden_size`, `transformer`, `pre_norm`, ...); `num_classes` is `embed_dim`.
    text: TextTransformer keyword arguments (`width`, `num_layers`, `num_heads`, `mlp_dim`,
      `vocab_size`, `context_length`, ...).
    embed_dim: the shared embedding width (the towers' projections' output).
    logit_scale_init: initial LOG scale (CLIP: log(1/0.07); SigLIP: log(10)).
    logit_bias_init: None (CLIP: no bias) or the initial `logit_bias` (SigLIP: -10).
    max_logit_scale: the multiplier is clamped at this (CLIP: 100); None: no clamp.
    remat, remat_policy, dtype, param_dtype: passed to both towers.
  """
  image: Any
  text: Any
  embed_dim: int
  logit_scale_init: float = LOGIT_SCALE_INIT
  logit_bias_init: Optional[float] = None
  max_logit_scale: Optional[float] = 100.0
  remat: bool = False
  remat_policy: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  model_name: Optional[str] = None

  def setup(self):
    common = dict(remat=self.remat, remat_policy=self.remat_policy, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    self.img = vit.VisionTransformer(num_classes=self.embed_dim, **{**dict(self.image), **common})
    self.txt = text_model.TextTransformer(embed_dim=self.embed_dim,
                                          **{**dict(self.text), **common})
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init),
                                  (), jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init),
                                   (), jnp.float32)

  def encode_image(self, images, *, train: bool = False) -> jnp.ndarray:
    """[batch, height, width, 3] -> projected, unnormalised [batch, embed_dim] (fp32), as HF's
    `CLIPModel.get_image_features`."""
    return self.img(images, train=train)

  def encode_text(self, tokens, *, train: bool = False) -> jnp.ndarray:
    """int [batch, tokens] -> projected, unnormalised [batch, embed_dim] (fp32), as HF's
    `CLIPModel.get_text_features`."""
    return self.txt(tokens, train=train)

  def __call__(self, images, tokens, *, train: bool = False) -> Dict[str, jnp.ndarray]:
    """Either input may be None: then only the other tower runs (and there are no logits).

    Returns a dict:
      image_embeds: [batch_images, embed_dim], L2-normalised (as HF `CLIPModel`'s output);
      text_embeds: [batch_texts, embed_dim], L2-normalised;
      logits_per_image: [batch_images, batch_texts] =
        exp(min(logit_scale, log(max_logit_scale))) * image_embeds @ text_embeds.T (+ logit_bias);
      logits_per_text: its transpose;
      logit_scale: the LOG scale param as stored, unclamped (losses.contrastive_loss takes it);
      logit_bias: the bias param, when the model has one.
    """
    out = {"logit_scale": self.logit_scale}
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    if images is not None:
      out["image_embeds"] = l2_normalize(self.encode_image(images, train=train))
    if tokens is not None:
      out["text_embeds"] = l2_normalize(self.encode_text(tokens, train=train))
    if images is not None and tokens is not None:
      log_scale = self.logit_scale
      if self.max_logit_scale is not None:
        log_scale = jnp.minimum(log_scale, math.log(self.max_logit_scale))
      logits = jnp.exp(log_scale) * out["image_embeds"] @ out["text_embeds"].T
      if self.logit_bias_init is not None:
        logits = logits + self.logit_bias
      out["logits_per_image"] = logits
      out["logits_per_text"] = logits.T
    return out
