"""OWL-ViT (v1) and OWLv2 open-vocabulary detectors: CLIP's towers, every image token kept, and
per-token class, box (and, v2, objectness) heads.

  model = OwlViT(**configs.models.owl_vit_kwargs(configs.models.get_owl_vit_config("b32")))
  out = model.apply({"params": params}, images, tokens)      # dict, see OwlViT.__call__
  q, idx = model.apply(v, query_images, boxes, method=OwlViT.embed_image_query)  # one-shot

Params: `img/...` (the CLIP image tower, VisionTransformer names, no projection), `txt/...` (the
CLIP text tower, `txt/head` = text projection), `merged_class_token/{scale,bias}` (LayerNorm after
patch tokens * class token), `class_head/{dense0,logit_shift,logit_scale}`,
`box_head/{dense0,dense1,dense2}`, and with `objectness=True` `objectness_head/{dense0,...}`.
The forward pass follows scenic's `TextZeroShotDetectionModule` and HF's
`OwlViTForObjectDetection` / `Owlv2ForObjectDetection` (which agree on everything computed here).
Images come in already normalised (the input pipeline's `normalize('clip')`), as for CLIP.
"""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import box_ops
from vit_jax.models import clip as clip_model
from vit_jax.models import text as text_model
from vit_jax.models import vit

Dtype = Any

MASKED_LOGIT = -1e6  # scenic's value for padding queries (HF uses finfo.min)
BOX_BIAS_KINDS = ("both", "location", "size", "none")


def _logit(x: np.ndarray, eps: float = 1e-4) -> np.ndarray:
  """scenic's / HF's inverse sigmoid with `eps` on both sides: finite at 0 and 1."""
  return np.log(x + eps) - np.log1p(-x + eps)


def box_bias(grid_h: int, grid_w: int, kind: str = "both") -> np.ndarray:
  """The box head's fixed prior, [grid_h * grid_w, 4] (cx, cy, w, h) logits, numpy float32.

  Each token's box starts at its patch's bottom-right CORNER ((col + 1) / grid_w,
  (row + 1) / grid_h; scenic's `normalize_grid_corner_coordinates` says corners, not centres, on
  purpose) and at one patch in size (1 / grid_w, 1 / grid_h), as inverse sigmoids with eps 1e-4
  (HF's `compute_box_bias`; scenic takes 1 / grid_w for both sizes: the same on square grids).
  Tokens are row-major, as the image tower emits them. `kind`: 'location' or 'size' keeps only
  that half ('none': zeros).
  """
  if kind not in BOX_BIAS_KINDS:
    raise ValueError(f"box_bias={kind!r}: expected one of {BOX_BIAS_KINDS}.")
  xs = np.arange(1, grid_w + 1, dtype=np.float64) / grid_w
  ys = np.arange(1, grid_h + 1, dtype=np.float64) / grid_h
  xx, yy = np.meshgrid(xs, ys, indexing="xy")  # [grid_h, grid_w] each
  xy = np.clip(np.stack([xx, yy], axis=-1).reshape(-1, 2), 0.0, 1.0)
  wh = np.broadcast_to(np.array([1.0 / grid_w, 1.0 / grid_h]), xy.shape)
  xy_bias, wh_bias = _logit(xy), _logit(wh)
  if kind in ("size", "none"):
    xy_bias = np.zeros_like(xy_bias)
  if kind in ("location", "none"):
    wh_bias = np.zeros_like(wh_bias)
  return np.concatenate([xy_bias, wh_bias], axis=-1).astype(np.float32)


def _flatten_features(feats: jnp.ndarray) -> Tuple[jnp.ndarray, Tuple[int, int]]:
  """[b, gh, gw, d] or [b, n, d] (square grid) -> ([b, n, d], (gh, gw))."""
  if feats.ndim == 4:
    b, gh, gw, d = feats.shape
    return feats.reshape(b, gh * gw, d), (gh, gw)
  if feats.ndim != 3:
    raise ValueError(f"Image features: expected [batch, grid_h, grid_w, width] or [batch, "
                     f"tokens, width], found shape {feats.shape}.")
  n = feats.shape[1]
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(f"Image features [batch, {n}, width]: {n} tokens is not a square grid; pass "
                     "the [batch, grid_h, grid_w, width] feature map instead.")
  return feats, (side, side)


class PredictorMLP(nn.Module):
  """dense0 -> gelu -> dense1 -> gelu -> dense2 (zero kernel: the output starts at its bias).
  [..., width] -> [..., out_dim]. HF's `OwlViTBoxPredictionHead` (exact gelu); scenic's
  `PredictorMLP(num_layers=3)` (flax's tanh gelu: `approximate_gelu=True`)."""
  out_dim: int
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = lambda n, name, **kw: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name, **kw)
    x = nn.gelu(dense(width, "dense0")(x), approximate=self.approximate_gelu)
    x = nn.gelu(dense(width, "dense1")(x), approximate=self.approximate_gelu)
    return dense(self.out_dim, "dense2", kernel_init=nn.initializers.zeros)(x)


class ClassHead(nn.Module):
  """Per-token class embeddings and, given queries, logits (scenic's `ClassPredictor`).

  image_feats [b, n, width]; query_embeds [b, q, embed_dim] (contracted as HF's einsum
  '...pd,...qd->...pq'); query_mask [b, q] bool. Logits: (cos(class_embed, query) + shift) *
  (elu(scale) + 1), padding queries -1e6.
  """
  embed_dim: int
  class_bias_prior: float = 0.01
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_feats, query_embeds=None, query_mask=None) -> Dict[str, jnp.ndarray]:
    dense = lambda n, name, **kw: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name, **kw)
    class_embeds = dense(self.embed_dim, "dense0")(image_feats).astype(jnp.float32)
    # Created on every call, so that the params tree does not depend on whether queries came.
    prior = float(np.log(self.class_bias_prior) - np.log1p(-self.class_bias_prior))
    shift = dense(1, "logit_shift", bias_init=nn.initializers.constant(prior))(image_feats)
    scale = nn.elu(dense(1, "logit_scale")(image_feats)) + 1.0
    if query_embeds is None:
      return {"class_embeds": class_embeds}
    norm = lambda e: e / (jnp.linalg.norm(e, axis=-1, keepdims=True) + 1e-6)
    class_embeds = norm(class_embeds)
    query_embeds = norm(query_embeds.astype(jnp.float32))
    logits = jnp.einsum("...pd,...qd->...pq", class_embeds, query_embeds)
    logits = (logits + shift.astype(jnp.float32)) * scale.astype(jnp.float32)
    if query_mask is not None:
      mask = jnp.asarray(query_mask, bool)
      if mask.ndim > 1:
        mask = mask[..., None, :]  # [b, 1, q]
      logits = jnp.where(mask, logits, MASKED_LOGIT)
    return {"class_embeds": class_embeds, "pred_logits": logits}


class OwlViT(nn.Module):
  """images [b, H, W, 3] (normalised) + text queries -> per-token boxes and class logits.

  Attributes:
    image: VisionTransformer keyword arguments (a CLIP image config section); the tower runs with
      `classifier='token_unpooled'` and `num_classes=None` whatever the section says.
    text: TextTransformer keyword arguments (context_length 16 for OWL-ViT).
    embed_dim: the text projection's width = the class embeddings' width.
    objectness: OWLv2's objectness head (on gradient-stopped features).
    box_bias: 'both' | 'location' | 'size' (| 'none'): which half of the box prior to add.
    class_bias_prior: `class_head/logit_shift/bias` starts at logit(prior) (scenic's trainer).
    head_approximate_gelu: the MLP heads' gelu: erf (False, HF) or tanh (True, scenic's flax).
    remat, remat_policy, dtype, param_dtype: passed to both towers (dtypes to the heads too).
  """
  image: Any
  text: Any
  embed_dim: int
  objectness: bool = False
  box_bias: str = "both"
  class_bias_prior: float = 0.01
  head_approximate_gelu: bool = False
  remat: bool = False
  remat_policy: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  model_name: Optional[str] = None

  def setup(self):
    common = dict(remat=self.remat, remat_policy=self.remat_policy, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    image = {**dict(self.image), "classifier": "token_unpooled", "num_classes": None, **common}
    self.img = vit.VisionTransformer(**image)
    self.txt = text_model.TextTransformer(embed_dim=self.embed_dim, **{**dict(self.text), **common})
    eps = float(dict(self.image).get("layernorm_epsilon", 1e-5))  # HF: vision layer_norm_eps
    self.merged_class_token = nn.LayerNorm(epsilon=eps, dtype=self.dtype,
                                           param_dtype=self.param_dtype)
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.class_head = ClassHead(self.embed_dim, self.class_bias_prior, **dt)
    self.box_head = PredictorMLP(4, self.head_approximate_gelu, **dt)
    if self.objectness:
      self.objectness_head = PredictorMLP(1, self.head_approximate_gelu, **dt)

  def image_features(self, images, train: bool = False) -> jnp.ndarray:
    """[b, H, W, 3] -> the merged token map [b, grid_h, grid_w, width]: every patch token after
    the final LayerNorm, times the class token, LayerNorm'd (`merged_class_token`)."""
    if images.ndim != 4:
      raise ValueError(f"Images: expected [batch, height, width, channels], found shape "
                       f"{images.shape}.")
    ph, pw = vit._pair(dict(self.image)["patches"]["size"])  # pylint: disable=protected-access
    gh, gw = images.shape[1] // ph, images.shape[2] // pw
    x = self.img(images, train=train)  # [b, 1 + gh * gw, width]
    x = self.merged_class_token(x[:, 1:] * x[:, :1])
    return x.reshape(x.shape[0], gh, gw, x.shape[-1])

  def embed_text(self, tokens, train: bool = False) -> jnp.ndarray:
    """int [..., L] -> projected, unnormalised text embeddings [..., embed_dim] (fp32)."""
    lead = tokens.shape[:-1]
    z = self.txt(tokens.reshape(-1, tokens.shape[-1]), train=train)
    return z.reshape(*lead, z.shape[-1])

  def class_predictor(self, image_feats, query_embeds=None, query_mask=None):
    """image_feats [b, n, width] (or the [b, gh, gw, width] map), query_embeds [b, q, embed_dim]
    (None: class embeddings only), query_mask [b, q] bool (False: logit -1e6).

    Returns {'class_embeds': [b, n, embed_dim] (L2-normalised when queries are given, as scenic
    and HF return them; the raw dense0 output otherwise), 'pred_logits': [b, n, q]}.
    """
    feats, _ = _flatten_features(image_feats)
    return self.class_head(feats, query_embeds, query_mask)

  def box_predictor(self, image_feats) -> jnp.ndarray:
    """[b, gh, gw, width] (or [b, n, width] of a square grid) -> boxes [b, n, 4] (cx, cy, w, h)
    in [0, 1] = sigmoid(box head + box_bias(gh, gw)), fp32."""
    feats, (gh, gw) = _flatten_features(image_feats)
    bias = jnp.asarray(box_bias(gh, gw, self.box_bias))
    return jax.nn.sigmoid(self.box_head(feats).astype(jnp.float32) + bias)

  def objectness_predictor(self, image_feats) -> jnp.ndarray:
    """[b, n, width] (or the map) -> objectness logits [b, n] (fp32). The head sees
    gradient-stopped features (OWLv2: objectness must not shape the backbone)."""
    if not self.objectness:
      raise ValueError("objectness_predictor: this model has objectness=False (OWL-ViT v1).")
    feats, _ = _flatten_features(image_feats)
    return self.objectness_head(jax.lax.stop_gradient(feats))[..., 0].astype(jnp.float32)

  def embed_image_query(self, query_images, query_boxes, train: bool = False):
    """One-shot (image-conditioned) query embeddings, vectorised over the batch.

    query_images [b, H, W, 3]; query_boxes [b, 4] (cx, cy, w, h) in [0, 1] around the object
    (HF's `image_guided_detection` uses the whole image, [0.5, 0.5, 1, 1]). Returns
    (query_embeds [b, embed_dim], the raw class embedding of the chosen token; box_index [b]).

    scenic's / HF's heuristic: the IoU of the query box with every predicted box (GIoU when all
    IoUs are 0); keep the tokens within 0.8x of the best IoU (GIoU case, best <= 0: scenic's
    1.2x, as HF's 0.8x would keep none and drop the query); of those, the one whose class
    embedding has the LOWEST dot product with the image's mean class embedding ("only one
    embedding per object is good": the most object-specific one).
    """
    feats = self.image_features(query_images, train=train)
    class_embeds = self.class_predictor(feats)["class_embeds"]  # [b, n, e]
    boxes = box_ops.cxcywh_to_xyxy(self.box_predictor(feats))  # [b, n, 4]
    query = box_ops.cxcywh_to_xyxy(jnp.asarray(query_boxes, jnp.float32))[:, None]  # [b, 1, 4]
    ious = box_ops.iou(query, boxes)[:, 0]  # [b, n]
    gious = box_ops.generalized_iou(query, boxes)[:, 0]
    scores = jnp.where(jnp.all(ious == 0, axis=-1, keepdims=True), gious, ious)
    best = jnp.max(scores, axis=-1, keepdims=True)
    selected = scores >= best - 0.2 * jnp.abs(best)  # 0.8 * best, or 1.2 * best when negative
    mean = jnp.mean(class_embeds, axis=1)  # [b, e]
    sim = jnp.einsum("be,bne->bn", mean, class_embeds)
    index = jnp.argmin(jnp.where(selected, sim, jnp.inf), axis=-1)  # [b]
    return class_embeds[jnp.arange(class_embeds.shape[0]), index], index

  def __call__(self, images, tokens=None, *, query_embeds=None, query_mask=None,
               train: bool = False) -> Dict[str, jnp.ndarray]:
    """images [b, H, W, 3]; queries from `tokens` int [b, q, L] or `query_embeds` [b, q, e].

    A query is padding (logit -1e6) when its token row starts with 0 (scenic's and HF's
    `tokens[..., 0] > 0`) or `query_mask` [b, q] is False. Returns a dict:
      pred_logits [b, n, q] (absent without queries), pred_boxes [b, n, 4] (cx, cy, w, h in
      [0, 1]), class_embeds [b, n, embed_dim] (see class_predictor), image_feats [b, n, width],
      query_embeds [b, q, embed_dim] (text queries: L2-normalised, as HF's `text_embeds`; given
      ones: as given) and, with objectness, objectness_logits [b, n].
    """
    if tokens is not None and query_embeds is not None:
      raise ValueError("Pass either tokens or query_embeds, not both.")
    if tokens is not None:
      if tokens.ndim != 3:
        raise ValueError(f"Text queries: expected int tokens [batch, queries, length], found "
                         f"shape {tokens.shape}.")
      query_embeds = clip_model.l2_normalize(self.embed_text(tokens, train=train))
      valid = tokens[..., 0] > 0
      query_mask = valid if query_mask is None else jnp.logical_and(valid, query_mask)
    feature_map = self.image_features(images, train=train)
    feats, _ = _flatten_features(feature_map)
    out = dict(self.class_predictor(feats, query_embeds, query_mask))
    out["pred_boxes"] = self.box_predictor(feature_map)
    out["image_feats"] = feats
    if query_embeds is not None:
      out["query_embeds"] = query_embeds
    if self.objectness:
      out["objectness_logits"] = self.objectness_predictor(feats)
    return out
