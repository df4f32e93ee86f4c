"""JAX `.npz` checkpoints: upstream vision_transformer / AugReg, and big_vision ViT.

Upstream files already use this codebase's names ('/'-joined paths such as
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`), so reading them is
identity. big_vision names the block's children with linen's per-type counters
(`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`), may stack the blocks for
`lax.scan` (`Transformer/encoderblock/...` with a leading depth axis), and keeps `pos_embedding`
at the top without a class-token row (the class token is concatenated after the embedding is
added); all of that is translated here to the upstream layout.

What the arrays cannot tell, the MLP activation and the LayerNorm epsilon, is recorded by
`export_npz` as extra entries under `__vit_jax__/` when they differ from upstream's (tanh gelu,
1e-6), and read back here. They are float arrays, with the activation's name in the key
(`__vit_jax__/activation/gelu_erf` = 1.0, `__vit_jax__/layernorm_epsilon` = 1e-12 as float64):
timm's `_load_weights` reads only the names it knows, and upstream's `load_pretrained` keeps
unknown names as extra (unused) params, which only a float leaf survives in its training step
(jax.grad refuses integer leaves, device_put refuses strings). big_vision's `merge_params` refuses
any unknown name: load such a file there with `dont_load=["__vit_jax__/.*"]`.
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

METADATA = "__vit_jax__/"
# (mlp_activation, approximate_gelu) <-> the name recorded in the file.
_ACTIVATIONS = {("gelu", True): "gelu_tanh", ("gelu", False): "gelu_erf",
                ("quick_gelu", True): "quick_gelu", ("quick_gelu", False): "quick_gelu"}
UPSTREAM_ACTIVATION, UPSTREAM_EPSILON = "gelu_tanh", 1e-6


def activation_name(model_config) -> str:
  """gelu_tanh | gelu_erf | quick_gelu: what a model config's MLP computes."""
  key = (model_config.get("mlp_activation", "gelu"),
         bool(model_config.get("approximate_gelu", True)))
  if key not in _ACTIVATIONS:
    raise ValueError(f"Unknown MLP activation {key[0]!r}: expected gelu or quick_gelu.")
  return _ACTIVATIONS[key]


def metadata_arrays(activation: str, layernorm_epsilon: float,
                    prefix: str = "") -> Dict[str, np.ndarray]:
  """The `__vit_jax__/{prefix}...` entries recording an activation name and an epsilon."""
  return {f"{METADATA}{prefix}activation/{activation}": np.ones((), np.float32),
          f"{METADATA}{prefix}layernorm_epsilon": np.asarray(layernorm_epsilon, np.float64)}


def split_metadata(arrays: Mapping[str, np.ndarray], path: str = ""
                   ) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, object]]]:
  """(arrays without `__vit_jax__/` entries, {prefix: {"activation": name, "layernorm_epsilon":
  float}}); prefix is "" for a ViT, "img/" or "txt/" for a CLIP tower."""
  rest, meta = {}, {}
  for k, v in arrays.items():
    if not k.startswith(METADATA):
      rest[k] = v
      continue
    m = re.match(r"^(.*?)(activation/([A-Za-z0-9_]+)|layernorm_epsilon)$", k[len(METADATA):])
    if not m:
      raise common.CheckpointError(f"{path}: unknown metadata entry {k!r}: expected "
                                   f"{METADATA}[PREFIX/]activation/NAME or layernorm_epsilon.")
    entry = meta.setdefault(m.group(1), {})
    if m.group(3):
      if m.group(3) not in _ACTIVATIONS.values():
        raise common.UnsupportedCheckpointError(
            f"{path}: {k!r} records activation {m.group(3)!r}; expected one of "
            f"{sorted(set(_ACTIVATIONS.values()))}.")
      entry["activation"] = m.group(3)
    else:
      entry["layernorm_epsilon"] = float(np.asarray(v))
  return rest, meta


def activation_fields(activation: str) -> Dict[str, object]:
  """A recorded activation name -> model-config fields (mlp_activation, approximate_gelu)."""
  if activation == "quick_gelu":
    return {"mlp_activation": "quick_gelu", "approximate_gelu": False}
  return {"mlp_activation": "gelu", "approximate_gelu": activation == "gelu_tanh"}


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
  flat, meta = split_metadata(arrays, path)
  meta = meta.get("", {})
  activation = meta.get("activation", UPSTREAM_ACTIVATION)
  if activation == "quick_gelu":
    raise common.UnsupportedCheckpointError(
        f"{path}: the .npz records activation quick_gelu, which the ViT readers do not carry "
        "(a CLIP image tower? CLIP files load with checkpoints_convert.load_model).")
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
  if meta:
    notes.append(f"the file records activation {activation} and LayerNorm epsilon "
                 f"{meta.get('layernorm_epsilon', UPSTREAM_EPSILON):g}")
  return common.Checkpoint(
      format=fmt, path=path, params=flat, notes=notes, posemb_kind=posemb_kind,
      # Without a record, both codebases' defaults: tanh-approximate gelu, LayerNorm eps 1e-6.
      approximate_gelu=activation == "gelu_tanh",
      layernorm_epsilon=float(meta.get("layernorm_epsilon", UPSTREAM_EPSILON)),
      num_heads=_num_heads(flat))


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


def export_npz(params: Mapping, path: str, model_config=None) -> Dict[str, Tuple[int, ...]]:
  """Writes `params` as an upstream-style `.npz` (what upstream `load`, big_vision's
  `fix_old_checkpoints` and timm's `_load_weights` read). Returns {name: shape}.

  With `model_config`, an activation or LayerNorm epsilon other than upstream's is recorded in
  `__vit_jax__/` entries (module docstring), so that reading the file back computes the same.
  """
  arrays = to_npz_dict(params)
  if model_config is not None:
    activation = activation_name(model_config)
    eps = float(model_config.get("layernorm_epsilon", UPSTREAM_EPSILON))
    if activation != UPSTREAM_ACTIVATION or eps != UPSTREAM_EPSILON:
      arrays.update(metadata_arrays(activation, eps))
  write_npz(arrays, path)
  return {k: tuple(v.shape) for k, v in arrays.items()}


def write_npz(arrays: Mapping[str, np.ndarray], path: str) -> None:
  """Writes {name: array} to exactly `path` (np.savez would otherwise append ".npz")."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
