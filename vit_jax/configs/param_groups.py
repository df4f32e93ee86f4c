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
