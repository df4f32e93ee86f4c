"""JAX `.npz` checkpoints: upstream vision_transformer / AugReg, and big_vision ViT.

Upstream files already use this codebase's names ('/'-joined paths such as
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`), so reading them is
identity. big_vision names the block's children with linen's per-type counters
(`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`), may stack the blocks for
`lax.scan` (`Transformer/encoderblock/...` with a leading depth axis), and keeps `pos_embedding`
at the top without a class-token row (the class token is concatenated after the embedding is
added); all of that is translated here to the upstream layout.
"""
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from vit_jax.checkpoints_convert import common

# Translation of big_vision's in-block names to upstream's (pre-linen global counters).
_BV_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
# Whole-train-state prefixes: big_vision (`params/`) and old flax optimizers (`opt/target/`).
_STATE_PREFIXES = ("params/", "opt/target/")


def read_arrays(path: str) -> Dict[str, np.ndarray]:
  """{'/'-joined name: array} from an `.npz`, never unpickling (object arrays are refused)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except ValueError as e:  # numpy's message for object arrays mentions allow_pickle
    raise common.UnsafeCheckpointError(
        f"{path}: the .npz holds pickled object arrays, which are refused (they can run code on "
        f"load). Only plain numeric arrays are read. ({e})") from e
  out = {}
  for k, v in arrays.items():
    if v.dtype.kind == "V" and v.dtype.itemsize == 2:
      # big_vision stores bfloat16 as raw 2-byte records (npz has no bfloat16).
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      v = v.view(ml_dtypes.bfloat16)
    out[k] = v
  return out


def is_npz_tree(keys) -> bool:
  return any(k.endswith("embedding/kernel") for k in keys)


def translate(arrays: Mapping[str, np.ndarray], *, subtree: Optional[str] = None,
              path: str = "") -> common.Checkpoint:
  """Upstream or big_vision `.npz` arrays -> a `Checkpoint` in this codebase's names."""
  flat = dict(arrays)
  for prefix in _STATE_PREFIXES:
    if any(k.startswith(prefix + "embedding/") or (subtree and k.startswith(prefix + subtree))
           for k in flat):
      # The rest of a train state (optimizer moments, step) is not the model: keep params only.
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      break
  if subtree:  # big_vision's `file.npz:img` picks one tower of a multi-model checkpoint
    sub = subtree.strip("/") + "/"
    flat = {k[len(sub):]: v for k, v in flat.items() if k.startswith(sub)}
    if not flat:
      raise common.CheckpointError(f"{path}: no arrays under the sub-model '{subtree}'.")

  _refuse_other_models(flat, path)
  notes: List[str] = []
  big_vision = False

  if any(k.startswith("Transformer/encoderblock/") for k in flat):
    # lax.scan layout: one block whose arrays carry a leading [depth] axis.
    big_vision = True
    stacked = {k: flat.pop(k) for k in list(flat) if k.startswith("Transformer/encoderblock/")}
    depths = {v.shape[0] for v in stacked.values()}
    if len(depths) != 1:
      raise common.CheckpointError(f"{path}: scanned encoder blocks disagree on depth: {depths}.")
    depth = depths.pop()
    for k, v in stacked.items():
      rest = k[len("Transformer/encoderblock/"):]
      for i in range(depth):
        flat[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
    notes.append(f"unstacked {depth} scanned encoder blocks")

  renamed = {}
  for k, v in flat.items():
    m = re.match(r"^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$", k)
    if m and m.group(2) in _BV_BLOCK_NAMES:
      big_vision = True
      k = m.group(1) + _BV_BLOCK_NAMES[m.group(2)] + m.group(3)
    renamed[k] = v
  flat = renamed

  # Position embedding: upstream keeps it at Transformer/posembed_input; big_vision at the top
  # (and pre-2022 big_vision at Transformer/pos_embedding).
  posemb_kind = "learned"
  for old in ("pos_embedding", "Transformer/pos_embedding"):
    if old in flat:
      big_vision = True
      flat[common.POSEMB] = flat.pop(old)
  if common.POSEMB in flat:
    flat[common.POSEMB] = common.posemb_with_class_row(flat[common.POSEMB], "cls" in flat, notes)
  elif big_vision:
    # big_vision's only other posemb type is the fixed sincos2d, which is not stored.
    posemb_kind = "sincos2d"
    notes.append("no position embedding stored: the model used big_vision's fixed sincos2d")

  fmt = "big_vision .npz" if big_vision else "upstream .npz"
  return common.Checkpoint(
      format=fmt, path=path, params=flat, notes=notes, posemb_kind=posemb_kind,
      # Both codebases use flax's defaults: tanh-approximate gelu, LayerNorm epsilon 1e-6.
      approximate_gelu=True, layernorm_epsilon=1e-6, num_heads=_num_heads(flat))


def _num_heads(flat) -> Optional[int]:
  kernel = flat.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
  return int(kernel.shape[1]) if kernel is not None and kernel.ndim == 3 else None


def _refuse_other_models(flat, path):
  if any(k.startswith(("conv_root/", "block1/")) for k in flat):
    raise common.UnsupportedCheckpointError(
        f"{path}: this is a hybrid ResNet+ViT (R50+ViT / R26+S / R+Ti) checkpoint: its patch "
        "embedding is a ResNet stem (conv_root/, block1/...), which this ViT does not implement.")
  if any("MixerBlock_" in k for k in flat):
    raise common.UnsupportedCheckpointError(f"{path}: this is an MLP-Mixer checkpoint, not a ViT.")


def to_npz_dict(params: Mapping) -> Dict[str, np.ndarray]:
  """Our params tree -> {upstream '/'-joined name: array}; upstream's names are ours as-is."""
  return {k: np.asarray(v) for k, v in common.flatten(params).items()}


def export_npz(params: Mapping, path: str) -> Dict[str, Tuple[int, ...]]:
  """Writes `params` as an upstream-style `.npz` (what upstream `load`, big_vision's
  `fix_old_checkpoints` and timm's `_load_weights` read). Returns {name: shape}."""
  arrays = to_npz_dict(params)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
    np.savez(f, **arrays)
  return {k: tuple(v.shape) for k, v in arrays.items()}
