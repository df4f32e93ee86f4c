"""What every checkpoint reader shares: the `Checkpoint` record, errors, and tree helpers."""
import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from vit_jax.checkpoints_convert import posemb

POSEMB = "Transformer/posembed_input/pos_embedding"
BLOCK = "Transformer/encoderblock_{}/"


class CheckpointError(ValueError):
  """A checkpoint could not be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
  """The file needs code execution (a pickle with arbitrary globals) to load; it is refused."""


class UnsupportedCheckpointError(CheckpointError):
  """A recognised checkpoint of an architecture this ViT does not implement."""


class CheckpointMismatchError(CheckpointError):
  """The converted checkpoint's keys or shapes differ from the model's."""

  def __init__(self, *, fmt: str, path: str, missing: Sequence[str], unexpected: Sequence[str],
               mismatched: Sequence[Tuple[str, tuple, tuple]], hints: Mapping[str, str] = ()):
    self.format, self.path = fmt, path
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.mismatched = list(mismatched)
    lines = [f"Checkpoint {path} (detected format: {fmt}) does not match the model: "
             f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
             f"{len(self.mismatched)} shape mismatches."]
    lines += [f"  missing (in the model, not in the checkpoint): {k}" for k in self.missing]
    lines += [f"  unexpected (in the checkpoint, not in the model): {k}" for k in self.unexpected]
    lines += [f"  shape mismatch: {k}: model expects {e}, checkpoint has {f}"
              for k, e, f in self.mismatched]
    lines += [f"  note: {h}" for h in dict(hints).values()]
    super().__init__("\n".join(lines))


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint translated to this codebase's names, before it is fitted to a model.

  `params` is flat: {'/'-joined upstream name: array}. Keys a reader could not translate keep
  their original names, so that fitting reports them as unexpected. The position embedding,
  when present, has a class-token row iff `cls` is present (upstream's layout).
  """
  format: str  # "upstream .npz" | "big_vision .npz" | "HF transformers" | "timm"
  path: str
  params: Dict[str, np.ndarray]
  approximate_gelu: bool  # what the source model computed with: tanh gelu (True) or erf (False)
  layernorm_epsilon: float
  num_heads: Optional[int] = None
  grid: Optional[Tuple[int, int]] = None  # (rows, cols) of the stored posemb, when the file says
  posemb_kind: str = "learned"  # learned | sincos2d (big_vision's fixed one, not stored)
  notes: List[str] = dataclasses.field(default_factory=list)
  hints: Dict[str, str] = dataclasses.field(default_factory=dict)  # why a key is unsupported

  @property
  def num_classes(self) -> Optional[int]:
    head = self.params.get("head/kernel")
    return None if head is None else int(head.shape[-1])

  @property
  def patch_size(self) -> Tuple[int, int]:
    k = self.params["embedding/kernel"]
    return int(k.shape[0]), int(k.shape[1])

  def source_grid(self) -> Tuple[int, int]:
    """(rows, cols) of the stored position embedding: from the file, else assumed square."""
    tokens = self.params[POSEMB].shape[1] - int("cls" in self.params)
    if self.grid and self.grid[0] * self.grid[1] == tokens:
      return self.grid
    return posemb.grid_from_tokens(tokens)

  def image_size(self) -> Tuple[int, int]:
    """(height, width) the checkpoint was made for: its posemb grid times the patch size."""
    if POSEMB in self.params:
      rows, cols = self.source_grid()
    elif self.grid:
      rows, cols = self.grid
    else:
      raise CheckpointError(f"{self.path}: the checkpoint stores no position embedding to take "
                            "the image size from; pass image_size.")
    return rows * self.patch_size[0], cols * self.patch_size[1]

  def model_config(self) -> ml_collections.ConfigDict:
    """The model config this checkpoint was made with (as far as the arrays and file say)."""
    from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
    p = self.params
    if "embedding/kernel" not in p:
      raise CheckpointError(f"{self.path} ({self.format}): no patch embedding "
                            "(embedding/kernel); cannot infer the model.")
    width = int(p["embedding/kernel"].shape[-1])
    layers = 0
    while BLOCK.format(layers) + "LayerNorm_0/scale" in p:
      layers += 1
    mlp = p.get(BLOCK.format(0) + "MlpBlock_3/Dense_0/kernel")
    heads = self.num_heads or preset_num_heads(width)
    if heads is None:
      raise CheckpointError(
          f"{self.path} ({self.format}): the file does not say how many attention heads the "
          f"width-{width} model has, and no preset has that width. Pass a model config "
          "(--model on the command line).")
    c = models.get_model_config("b16")
    c.patches.size = self.patch_size
    c.hidden_size = width
    c.transformer.num_layers = layers
    c.transformer.mlp_dim = int(mlp.shape[-1]) if mlp is not None else 4 * width
    c.transformer.num_heads = int(heads)
    if "cls" in p:
      c.classifier = "token"
    elif any(k.startswith("MAPHead_0/") for k in p):
      c.classifier = "map"
    else:
      c.classifier = "gap"
    c.representation_size = (int(p["pre_logits/kernel"].shape[-1]) if "pre_logits/kernel" in p
                             else None)
    c.approximate_gelu = self.approximate_gelu
    c.layernorm_epsilon = self.layernorm_epsilon
    c.name = preset_name(c) or "custom"
    return c


def _is_square(n: int) -> bool:
  return n >= 0 and int(round(math.sqrt(n))) ** 2 == n


def posemb_with_class_row(pe: np.ndarray, has_cls: bool, notes: List[str]) -> np.ndarray:
  """Gives [1, tokens, width] position embeddings a class-token row when the model has `cls`.

  big_vision and timm's `no_embed_class` models add the position embedding to the patches only
  and concatenate the class token afterwards; a zero row for the class token computes the same.
  Rows are a square number without the class row, a square number plus one with it.
  """
  rows = pe.shape[1]
  if has_cls and _is_square(rows) and not (rows > 1 and _is_square(rows - 1)):
    notes.append("position embeddings had no class-token row (class token concatenated after "
                 "them): added a zero row, which computes the same")
    return np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
  return pe


def preset_num_heads(width: int) -> Optional[int]:
  """Heads of the upstream ViT size (Ti/S/B/L/H) with this width, for files that omit them."""
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  for name in ("ViT-Ti_16", "ViT-S_16", "ViT-B_16", "ViT-L_16", "ViT-H_14"):
    c = models.get_model_config(name)
    if c.hidden_size == width:
      return int(c.transformer.num_heads)
  return None


def preset_name(c) -> Optional[str]:
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  for name in models.MODEL_NAMES:
    p = models.get_model_config(name)
    if (tuple(p.patches.size) == tuple(c.patches.size) and p.hidden_size == c.hidden_size and
        p.transformer.num_layers == c.transformer.num_layers and
        p.transformer.mlp_dim == c.transformer.mlp_dim and
        p.transformer.num_heads == c.transformer.num_heads):
      return name
  return None


def flatten(tree: Mapping, prefix: str = "") -> Dict[str, object]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping[str, object]) -> Dict[str, object]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: Dict[str, object] = {}
  for k, v in flat.items():
    node = tree
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def num_params(flat: Mapping[str, np.ndarray]) -> int:
  return int(sum(np.prod(v.shape) for v in flat.values()))
