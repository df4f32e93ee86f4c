"""Ready-made fine-tuning recipes on `config.param_groups` / `config.layerwise_lr_decay`.

Each returns a dict of config overrides, used as `config.update(param_groups.backbone_head())`.
Plain Python (no jax) so that configs stay cheap to load; optim.py reads the result.
"""
from typing import Any, Dict

# The ViT's stem: patch embedding, class token, position embedding (upstream param names).
_STEM = "embedding|cls|Transformer/posembed_input"


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
