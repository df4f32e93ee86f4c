"""PyTorch-world checkpoints: HF transformers ViT and timm `vit_*`, read and (HF) written.

Files: `.safetensors` (read with `safetensors.numpy`: no torch needed), and `.bin`/`.pth`
pickles (read with `torch.load(weights_only=True)`; torch is imported only then). Layout
conversions: torch Linear weight [out, in] -> flax kernel [in, out]; conv OIHW -> HWIO; fused or
separate q/k/v [heads*head_dim, width] -> [width, heads, head_dim].
"""
import json
import os
import pickle
import re
from typing import Dict, List, Mapping, Optional

import numpy as np

from vit_jax.checkpoints_convert import common

B = common.BLOCK
_ATTN = "MultiHeadDotProductAttention_1/"


# ----------------------------------------------------------------------------------------------
# Reading files.


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """{name: array} from a `.safetensors` file, without torch."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    return dict(safetensors.numpy.load_file(path))
  except TypeError:
    # numpy has no bfloat16, so safetensors.numpy refuses BF16 files; read the (simple) format
    # ourselves with ml_dtypes: u64 header length, JSON header, then the raw little-endian data.
    return _read_safetensors_bf16(path)


def _read_safetensors_bf16(path: str) -> Dict[str, np.ndarray]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    out[name] = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def read_pickle(path: str) -> Dict[str, np.ndarray]:
  """{name: array} from a torch pickle (`.bin`, `.pth`), refusing anything but tensors/containers.

  `weights_only=True` makes torch's unpickler reject every global outside a small allow-list, so
  a file whose unpickling would call arbitrary code fails before anything runs.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise common.CheckpointError(
        f"{path} is a PyTorch pickle: reading it needs torch (pip install torch), or convert it "
        "to .safetensors, which needs no torch.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise common.UnsafeCheckpointError(
        f"{path}: refused. Loading it needs code execution (its pickle references globals that "
        "torch.load(weights_only=True) does not allow), so nothing from it was run. If you trust "
        f"the file, re-save its state_dict as .safetensors. torch said: {e}") from e
  flat = {}

  def visit(prefix, value):
    if isinstance(value, torch.Tensor):
      t = value.detach().cpu()
      flat[prefix] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    elif isinstance(value, Mapping):
      for k, v in value.items():
        visit(f"{prefix}.{k}" if prefix else str(k), v)
    # Other values (epoch counters, strings) carry no weights.

  visit("", obj)
  return flat


def read_hf_config(directory: str) -> Optional[dict]:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# HF transformers ViTModel / ViTForImageClassification.

# Per-block names: the on-disk names every hub checkpoint uses (and save_pretrained still writes),
# then transformers 5.x's in-memory names (written by save_pretrained(save_original_format=False)).
_HF_BLOCK = {
    "layernorm_before": "LayerNorm_0",
    "attention.attention.query": _ATTN + "query",
    "attention.attention.key": _ATTN + "key",
    "attention.attention.value": _ATTN + "value",
    "attention.output.dense": _ATTN + "out",
    "layernorm_after": "LayerNorm_2",
    "intermediate.dense": "MlpBlock_3/Dense_0",
    "output.dense": "MlpBlock_3/Dense_1",
    # transformers >= 5 module names:
    "attention.q_proj": _ATTN + "query",
    "attention.k_proj": _ATTN + "key",
    "attention.v_proj": _ATTN + "value",
    "attention.o_proj": _ATTN + "out",
    "mlp.fc1": "MlpBlock_3/Dense_0",
    "mlp.fc2": "MlpBlock_3/Dense_1",
}
_HF_TOP = {
    "embeddings.cls_token": "cls",
    "embeddings.position_embeddings": common.POSEMB,
    "embeddings.patch_embeddings.projection": "embedding",
    "layernorm": "Transformer/encoder_norm",
    "pooler.dense": "pre_logits",
    "classifier": "head",
}


def is_hf(keys) -> bool:
  return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys)


def translate_hf(sd: Mapping[str, np.ndarray], config: Optional[dict], *,
                 num_heads: Optional[int] = None, path: str = "") -> common.Checkpoint:
  """HF ViT state dict (+ its config.json, when there is one) -> `Checkpoint`."""
  notes: List[str] = []
  config = dict(config or {})
  if config.get("model_type", "vit") != "vit":
    raise common.UnsupportedCheckpointError(
        f"{path}: config.json says model_type={config.get('model_type')!r}; only 'vit' "
        "(ViTModel / ViTForImageClassification) is supported.")
  if not config:
    notes.append("no config.json: assumed ViTConfig defaults (exact gelu, LayerNorm eps 1e-12)")
  act = config.get("hidden_act", "gelu")
  approximate = {"gelu": False, "gelu_python": False, "gelu_new": True,
                 "gelu_pytorch_tanh": True, "gelu_fast": True}.get(act)
  if approximate is None:
    raise common.UnsupportedCheckpointError(f"{path}: hidden_act={act!r} is not a gelu this ViT "
                                            "computes (gelu = erf, gelu_pytorch_tanh = tanh).")
  if config.get("pooler_act", "tanh") != "tanh":
    raise common.UnsupportedCheckpointError(
        f"{path}: pooler_act={config['pooler_act']!r}; pre_logits here is Dense + tanh.")

  strip = "vit." if any(k.startswith("vit.") for k in sd) else ""
  width = int(sd[strip + "embeddings.patch_embeddings.projection.weight"].shape[0])
  heads = config.get("num_attention_heads") or num_heads or common.preset_num_heads(width)
  out: Dict[str, np.ndarray] = {}
  hints: Dict[str, str] = {}
  for key, value in sd.items():
    name = key[len(strip):] if key.startswith(strip) else key
    m = re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _HF_BLOCK:
      _put(out, B.format(m.group(1)) + _HF_BLOCK[m.group(2)], m.group(3), value, heads, path)
      continue
    m = re.match(r"^(.+)\.(weight|bias)$", name)
    if m and m.group(1) in _HF_TOP:
      _put(out, _HF_TOP[m.group(1)], m.group(2), value, heads, path)
    elif name in _HF_TOP:
      out[_HF_TOP[name]] = value
    elif name == "embeddings.mask_token":
      notes.append("dropped embeddings.mask_token (used only for masked-image-modeling inputs)")
    else:
      out[key] = value  # untranslated: reported as unexpected when fitted to a model
      if "patch_embeddings.backbone" in key:
        hints["hybrid"] = "hybrid (ResNet-stem) ViT checkpoints are not supported"

  if config.get("qkv_bias") is False:
    # No q/k/v biases is the same as zero biases.
    for i in range(config.get("num_hidden_layers", 0)):
      for n in ("query", "key", "value"):
        kernel = out.get(B.format(i) + _ATTN + n + "/kernel")
        if kernel is not None:
          out[B.format(i) + _ATTN + n + "/bias"] = np.zeros(kernel.shape[1:], kernel.dtype)
    notes.append("qkv_bias=False: q/k/v biases set to zero")

  grid = None
  if config.get("image_size") and config.get("patch_size"):
    size = config["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = config["patch_size"]
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (size[0] // patch[0], size[1] // patch[1])
  return common.Checkpoint(
      format="HF transformers", path=path, params=out, notes=notes, hints=hints,
      approximate_gelu=approximate, layernorm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
      num_heads=heads, grid=grid)


def _put(out, name, kind, value, heads, path):
  """Stores one torch parameter under our name, converting its layout."""
  value = np.asarray(value)
  leaf = name.rsplit("/", 1)[-1]
  if name == "embedding":
    out[f"{name}/{'kernel' if kind == 'weight' else 'bias'}"] = (
        value.transpose(2, 3, 1, 0) if kind == "weight" else value)  # OIHW -> HWIO
  elif name.startswith(("Transformer/encoder_norm",)) or "LayerNorm" in leaf:
    out[f"{name}/{'scale' if kind == 'weight' else 'bias'}"] = value
  elif leaf in ("query", "key", "value", "out") and heads is None:
    raise common.CheckpointError(
        f"{path}: the file does not record the number of attention heads and the width matches "
        "no upstream preset: pass the model config (--model or --num-heads on the command line).")
  elif leaf in ("query", "key", "value"):
    if kind == "weight":  # [heads*head_dim, width] -> [width, heads, head_dim]
      out[f"{name}/kernel"] = value.T.reshape(value.shape[1], heads, -1)
    else:
      out[f"{name}/bias"] = value.reshape(heads, -1)
  elif leaf == "out":
    if kind == "weight":  # [width, heads*head_dim] -> [heads, head_dim, width]
      out[f"{name}/kernel"] = value.T.reshape(heads, -1, value.shape[0])
    else:
      out[f"{name}/bias"] = value
  elif kind == "weight":  # Dense: [out, in] -> [in, out]
    out[f"{name}/kernel"] = value.T
  else:
    out[f"{name}/bias"] = value


# ----------------------------------------------------------------------------------------------
# timm VisionTransformer (`vit_*`).

_TIMM_BLOCK = {
    "norm1": "LayerNorm_0",
    "attn.proj": _ATTN + "out",
    "norm2": "LayerNorm_2",
    "mlp.fc1": "MlpBlock_3/Dense_0",
    "mlp.fc2": "MlpBlock_3/Dense_1",
}
_TIMM_TOP = {
    "cls_token": "cls",
    "pos_embed": common.POSEMB,
    "patch_embed.proj": "embedding",
    "norm": "Transformer/encoder_norm",
    "pre_logits.fc": "pre_logits",  # timm < 0.6 representation layer (Linear + Tanh)
    "head": "head",
}
# timm features with no counterpart in this ViT, and why a checkpoint using them is refused.
_TIMM_UNSUPPORTED = {
    "fc_norm": "fc_norm: timm normalises after pooling (global_pool='avg' default); this ViT "
               "applies encoder_norm before pooling. Build the timm model with fc_norm=False.",
    "ls1": "layer scale (ls1/ls2.gamma, e.g. DeiT-3) is not implemented",
    "reg_token": "register tokens are not implemented",
    "dist_token": "DeiT distillation token/head is not implemented",
    "attn_pool": "timm's attention pooling head is not converted (use big_vision MAP .npz)",
    "q_norm": "QK-norm is not implemented",
    "norm_pre": "pre-transformer LayerNorm (CLIP-style norm_pre) is not implemented",
    "patch_embed.backbone": "hybrid (ResNet-stem) ViT checkpoints are not supported",
}


def is_timm(keys) -> bool:
  return any(k.endswith("patch_embed.proj.weight") for k in keys)


def unwrap_timm(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """timm training checkpoints nest the weights ('model.', 'state_dict.'); DDP adds 'module.'."""
  sd = dict(sd)
  while not any(k.startswith("patch_embed.") for k in sd):
    for prefix in ("model.", "state_dict.", "module."):
      if any(k.startswith(prefix) and "patch_embed." in k for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        break
    else:
      break
  return sd


def translate_timm(sd: Mapping[str, np.ndarray], *, num_heads: Optional[int] = None,
                   path: str = "") -> common.Checkpoint:
  """timm `vit_*` state dict -> `Checkpoint` (exact gelu, LayerNorm eps 1e-6, as timm builds)."""
  sd = unwrap_timm(sd)
  notes: List[str] = []
  width = int(sd["patch_embed.proj.weight"].shape[0])
  heads = num_heads or common.preset_num_heads(width)
  out: Dict[str, np.ndarray] = {}
  hints: Dict[str, str] = {}
  for key, value in sd.items():
    m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m and m.group(2) == "attn.qkv":
      # Fused [3*width, width] in q, k, v order (timm's _load_weights concatenates them so).
      for name, part in zip(("query", "key", "value"), np.split(np.asarray(value), 3, axis=0)):
        _put(out, B.format(m.group(1)) + _ATTN + name, m.group(3), part, heads, path)
      continue
    if m and m.group(2) in _TIMM_BLOCK:
      _put(out, B.format(m.group(1)) + _TIMM_BLOCK[m.group(2)], m.group(3), value, heads, path)
      continue
    m = re.match(r"^(.+)\.(weight|bias)$", key)
    if m and m.group(1) in _TIMM_TOP:
      _put(out, _TIMM_TOP[m.group(1)], m.group(2), value, heads, path)
    elif key in _TIMM_TOP:
      out[_TIMM_TOP[key]] = np.asarray(value)
    else:
      out[key] = value  # untranslated: reported as unexpected when fitted to a model
      for feature, why in _TIMM_UNSUPPORTED.items():
        if feature in key:
          hints[feature] = why
  if common.POSEMB in out:
    out[common.POSEMB] = common.posemb_with_class_row(out[common.POSEMB], "cls" in out, notes)
  return common.Checkpoint(format="timm", path=path, params=out, notes=notes, hints=hints,
                           approximate_gelu=False, layernorm_epsilon=1e-6, num_heads=heads)


# ----------------------------------------------------------------------------------------------
# Writing an HF directory.


def hf_state_dict(params: Mapping, model_config) -> Dict[str, np.ndarray]:
  """Our params -> HF `ViTForImageClassification` state dict (hub names, torch layouts)."""
  flat = {k: np.asarray(v, np.float32) for k, v in common.flatten(params).items()}
  sd = {
      "vit.embeddings.cls_token": flat["cls"],
      "vit.embeddings.position_embeddings": flat[common.POSEMB],
      "vit.embeddings.patch_embeddings.projection.weight":
          flat["embedding/kernel"].transpose(3, 2, 0, 1),  # HWIO -> OIHW
      "vit.embeddings.patch_embeddings.projection.bias": flat["embedding/bias"],
      "vit.layernorm.weight": flat["Transformer/encoder_norm/scale"],
      "vit.layernorm.bias": flat["Transformer/encoder_norm/bias"],
  }
  if "head/kernel" in flat:
    sd["classifier.weight"] = flat["head/kernel"].T
    sd["classifier.bias"] = flat["head/bias"]
  for i in range(model_config.transformer.num_layers):
    src, dst = B.format(i), f"vit.encoder.layer.{i}."
    for ours, theirs in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
      sd[dst + theirs + ".weight"] = flat[src + ours + "/scale"]
      sd[dst + theirs + ".bias"] = flat[src + ours + "/bias"]
    for n in ("query", "key", "value"):
      k = flat[src + _ATTN + n + "/kernel"]  # [width, heads, head_dim]
      sd[dst + f"attention.attention.{n}.weight"] = k.reshape(k.shape[0], -1).T
      sd[dst + f"attention.attention.{n}.bias"] = flat[src + _ATTN + n + "/bias"].reshape(-1)
    k = flat[src + _ATTN + "out/kernel"]  # [heads, head_dim, width]
    sd[dst + "attention.output.dense.weight"] = k.reshape(-1, k.shape[-1]).T
    sd[dst + "attention.output.dense.bias"] = flat[src + _ATTN + "out/bias"]
    for ours, theirs in (("Dense_0", "intermediate.dense"), ("Dense_1", "output.dense")):
      sd[dst + theirs + ".weight"] = flat[src + "MlpBlock_3/" + ours + "/kernel"].T
      sd[dst + theirs + ".bias"] = flat[src + "MlpBlock_3/" + ours + "/bias"]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def export_hf(params: Mapping, model_config, out_dir: str, *, image_size=None,
              id2label: Optional[Mapping[int, str]] = None) -> str:
  """Writes an HF `ViTForImageClassification` directory: `config.json` + `model.safetensors`.

  `transformers` loads it with `from_pretrained(out_dir)`; no torch is needed to write it.
  `image_size` (int or (h, w)) defaults to the square grid the position embeddings imply.
  HF's ViT has a class token, no pre_logits and no MAP head, so only such models export.
  """
  from vit_jax.checkpoints_convert import posemb  # pylint: disable=g-import-not-at-top
  c = model_config
  flat = common.flatten(params)
  if c.classifier != "token" or "cls" not in flat:
    raise common.UnsupportedCheckpointError(
        f"HF ViT pools the class token; a classifier={c.classifier!r} model cannot be exported "
        "to it (export .npz instead).")
  if c.get("representation_size") is not None:
    raise common.UnsupportedCheckpointError(
        "HF ViTForImageClassification has no pre_logits layer; this model has "
        f"representation_size={c.representation_size}. Export .npz instead.")
  ph, pw = tuple(c.patches.size)
  if ph != pw:
    raise common.UnsupportedCheckpointError(f"HF ViT needs square patches, found {(ph, pw)}.")
  if image_size is None:
    rows, cols = posemb.grid_from_tokens(flat[common.POSEMB].shape[1] - 1)
    image_size = (rows * ph, cols * pw)
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  num_classes = int(flat["head/kernel"].shape[-1]) if "head/kernel" in flat else None
  labels = dict(id2label or {i: f"LABEL_{i}" for i in range(num_classes or 0)})
  config = {
      "architectures": ["ViTForImageClassification" if num_classes else "ViTModel"],
      "model_type": "vit",
      "hidden_size": int(c.hidden_size),
      "num_hidden_layers": int(c.transformer.num_layers),
      "num_attention_heads": int(c.transformer.num_heads),
      "intermediate_size": int(c.transformer.mlp_dim),
      # Keep the activation the weights were trained with: tanh gelu is HF's gelu_pytorch_tanh.
      "hidden_act": "gelu_pytorch_tanh" if c.get("approximate_gelu", True) else "gelu",
      "layer_norm_eps": float(c.get("layernorm_epsilon", 1e-6)),
      "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0,
      "image_size": h if h == w else [h, w],
      "patch_size": ph,
      "num_channels": int(flat["embedding/kernel"].shape[2]),
      "qkv_bias": True,
      "encoder_stride": ph,
      "id2label": {str(k): v for k, v in labels.items()},
      "label2id": {v: int(k) for k, v in labels.items()},
      "dtype": "float32",
  }
  return write_hf_dir(hf_state_dict(params, c), config, out_dir)


def write_hf_dir(state_dict: Mapping[str, np.ndarray], config: dict, out_dir: str) -> str:
  """`out_dir/config.json` + `out_dir/model.safetensors` (torch layouts, numpy values): what
  `transformers.*.from_pretrained(out_dir)` reads; no torch needed to write it."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  safetensors.numpy.save_file(dict(state_dict), os.path.join(out_dir, "model.safetensors"),
                              metadata={"format": "pt"})
  return out_dir
