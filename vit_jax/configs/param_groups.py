"""Ready-made fine-tuning recipes on `config.param_groups` / `config.layerwise_lr_decay`.

Each returns a dict of config overrides, used as `config.update(param_groups.backbone_head())`.
Plain Python (no jax) so that configs stay cheap to load; optim.py reads the result. The CLIP
recipes (`clip_full`, `lit`, `locked_text`) expect the CLIP tree's top level: `img` (image tower),
`txt` (text tower), `logit_scale` (and `logit_bias`); `lora` works on any model's tree.
"""
from typing import Any, Dict, Optional

# The ViT's stem: patch embedding, class token, position embedding (upstream param names).
_STEM = "embedding|cls|Transformer/posembed_input"
# LoRA's default targets (the paper's choice, W_q and W_v): every encoder block's attention query
# and value kernels, in any tower (ViT, both CLIP towers, OWL-ViT's backbone).
LORA_TARGETS = r"(.*/)?encoderblock_\d+/MultiHeadDotProductAttention_1/(query|value)/kernel"
_TOWERS = ("img", "txt")


def backbone_head(head_lr_mult: float = 10.0) -> Dict[str, Any]:
  """Fresh head learns `head_lr_mult` times faster than the pretrained backbone."""
  return dict(param_groups=[
      ("head/.*", dict(name="head", lr_mult=head_lr_mult)),
      (".*", dict(name="backbone")),
  ])


def freeze_first_blocks(k: int, freeze_stem: bool = True) -> Dict[str, Any]:
  """Freezes encoder blocks 0..k-1 (and the stem below them); the rest trains at base_lr."""
  frozen = [f"Transformer/encoderblock_({'|'.join(str(i) for i in range(k))})"] if k > 0 else []
  if freeze_stem:
    frozen.append(_STEM)
  if not frozen:
    return dict(param_groups=[(".*", dict(name="trainable"))])
  return dict(param_groups=[
      (f"({'|'.join(frozen)})(/.*)?", dict(name="frozen", frozen=True)),
      (".*", dict(name="trainable")),
  ])


def layerwise_decay(factor: float = 0.65) -> Dict[str, Any]:
  """MAE/BEiT fine-tuning: AdamW, wd 0.05 (not on biases/norms/embeddings), LR decayed by depth.

  A leaf in layer l (stem 0, block i at i+1, head at depth+1) trains at
  base_lr * factor ** (depth + 1 - l). 0.65 is MAE's ViT-B value (0.75 for L/H).
  """
  return dict(optimizer="adamw", b1=0.9, b2=0.999, weight_decay=0.05, wd_mask="default",
              layerwise_lr_decay=factor)


def clip_full(tower_lr_mult: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
  """Both CLIP towers train; `tower_lr_mult` ({"img": m, "txt": m}, missing: 1.0) scales a
  tower's LR. `logit_scale` (and `logit_bias`) train at base_lr, in group "rest"."""
  mults = dict(tower_lr_mult or {})
  unknown = sorted(set(mults) - set(_TOWERS))
  if unknown:
    raise ValueError(f"clip_full(tower_lr_mult={mults!r}): unknown towers {unknown}; expected "
                     f"keys among {list(_TOWERS)}.")
  return dict(param_groups=[
      *[(f"{t}/.*", dict(name=t, lr_mult=float(mults.get(t, 1.0)))) for t in _TOWERS],
      (".*", dict(name="rest")),
  ])


def _locked(tower: str, train_head: bool) -> Dict[str, Any]:
  groups = [(f"{tower}/.*", dict(name=f"{tower}_locked", frozen=True)),
            (".*", dict(name="trainable"))]
  if train_head:
    groups.insert(0, (f"{tower}/head/.*", dict(name=f"{tower}_head")))
  return dict(param_groups=groups)


def lit(train_head: bool = False) -> Dict[str, Any]:
  """LiT (Zhai et al. 2022): the image tower is locked (`img/.*` frozen, no optimizer state);
  the text tower and `logit_scale` train. `train_head`: the image projection `img/head` trains
  too (for an image tower taken from a classifier, whose head is not a CLIP projection)."""
  return _locked("img", train_head)


def locked_text(train_head: bool = False) -> Dict[str, Any]:
  """The text tower is locked (`txt/.*` frozen); the image tower and `logit_scale` train.
  `train_head`: the text projection `txt/head` trains too."""
  return _locked("txt", train_head)


def lora(rank: int = 8, alpha: float = 16.0, targets: str = LORA_TARGETS) -> Dict[str, Any]:
  """LoRA (models/lora.py): adapters of rank `rank` on the kernels matching `targets` (a regex
  `re.fullmatch`ed on '/'-joined kernel paths), merged with scale alpha / rank; only the adapters
  (`lora/...`) train, every base param is frozen and holds no optimizer state. The task adds the
  adapters at init when `config.lora.rank > 0`."""
  if int(rank) != rank or rank < 1:
    raise ValueError(f"lora(rank={rank!r}): expected an integer >= 1.")
  return dict(
      lora=dict(rank=int(rank), alpha=float(alpha), targets=targets),
      param_groups=[
          ("lora/.*", dict(name="lora")),
          (".*", dict(name="frozen", frozen=True)),
      ])


# OWL-ViT (models/owl_vit.py): `img` (image tower) with `merged_class_token` (the LayerNorm
# after merging the class token: part of the image embedder), `txt` (text tower; its
# `extra_token_embedding` holds domain-vocabulary tokens), `class_head`, `box_head`,
# `objectness_head` (OWLv2), `query_embeddings` (learned queries, when configured).
_OWL_HEADS = "(class_head|box_head|objectness_head|query_embeddings)"
_OWL_TEXT_MODES = ("train", "frozen", "new_tokens")


def _owl_text_groups(text: str, lr: float) -> list:
  if text not in _OWL_TEXT_MODES:
    raise ValueError(f"OWL-ViT recipe: text={text!r}; expected one of {list(_OWL_TEXT_MODES)}.")
  if text == "train":
    return [("txt/.*", dict(name="text", base_lr=lr))]
  frozen = [("txt/.*", dict(name="text_frozen", frozen=True))]
  if text == "new_tokens":  # only the added tokens' embeddings learn (config.detection.new_tokens)
    frozen.insert(0, ("txt/extra_token_embedding/.*", dict(name="new_tokens", base_lr=lr)))
  return frozen


def owl_vit_seeds(vision_lr: float = 1e-5, text_lr: float = 2e-5, head_lr: float = 5e-4,
                  text: str = "train") -> Dict[str, Any]:
  """The specification articles' OWL-ViT fine-tuning recipe: AdamW (b2 0.999, wd 0.01),
  500 warmup steps then cosine, clip 1.0, with one LR per part: vision tower 1e-5, text tower
  2e-5, class head and box head 5e-4 (the objectness head and learned queries go with the heads;
  the merged-class-token LayerNorm with the vision tower). `text`: 'train', 'frozen', or
  'new_tokens' (the text tower is frozen except the embeddings of added vocabulary)."""
  return dict(
      optimizer="adamw", b1=0.9, b2=0.999, weight_decay=0.01, grad_norm_clip=1.0,
      warmup_steps=500, decay_type="cosine", base_lr=head_lr,
      param_groups=[
          *_owl_text_groups(text, text_lr),
          ("(img|merged_class_token)/.*", dict(name="vision", base_lr=vision_lr)),
          (f"{_OWL_HEADS}(/.*)?", dict(name="heads", base_lr=head_lr)),
      ])


def owl_vit_scenic(lr: float = 5e-5, text_lr: float = 2e-6) -> Dict[str, Any]:
  """scenic's OWL-ViT recipe (configs/clip_b32.py): Adam (b1 0.9, b2 0.999, no weight decay),
  clip 1.0, 1000 linear warmup steps then cosine; the text tower at 2e-6, everything else
  (image tower and heads) at 5e-5 (L/14: 2e-5). scenic also clips each example's gradient
  (per_example_clipping, through a DP aggregator with zero noise); this preset clips the batch
  gradient only."""
  return dict(
      optimizer="adamw", b1=0.9, b2=0.999, weight_decay=0.0, grad_norm_clip=1.0,
      warmup_steps=1000, decay_type="cosine", base_lr=lr,
      param_groups=[
          ("txt/.*", dict(name="text", base_lr=text_lr)),
          (".*", dict(name="image_and_heads", base_lr=lr)),
      ])


def owl_vit_heads(head_lr: float = 5e-4) -> Dict[str, Any]:
  """Both towers (and the merged-class-token norm) frozen; only the detection heads (and
  learned queries) train: the cheapest adaptation, and a baseline for the others."""
  return dict(
      optimizer="adamw", b1=0.9, b2=0.999, weight_decay=0.01, grad_norm_clip=1.0,
      base_lr=head_lr,
      param_groups=[
          (f"{_OWL_HEADS}(/.*)?", dict(name="heads")),
          (".*", dict(name="towers_frozen", frozen=True)),
      ])


def owl_vit_lora(rank: int = 8, alpha: float = 16.0, head_lr: float = 5e-4,
                 lora_lr: float = 1e-4) -> Dict[str, Any]:
  """LoRA adapters on both towers' q/v projections (`lora(rank, alpha)`), with the detection
  heads trainable (they start fresh, unlike CLIP's projections); every tower weight is frozen."""
  out = lora(rank, alpha)
  out.update(
      optimizer="adamw", b1=0.9, b2=0.999, weight_decay=0.01, grad_norm_clip=1.0,
      base_lr=head_lr,
      param_groups=[
          ("lora/.*", dict(name="lora", base_lr=lora_lr)),
          (f"{_OWL_HEADS}(/.*)?", dict(name="heads")),
          (".*", dict(name="frozen", frozen=True)),
      ])
  return out
