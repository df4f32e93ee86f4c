"""OWL-ViT / OWLv2 checkpoints <-> models/owl_vit.py: HF `OwlViTForObjectDetection` /
`Owlv2ForObjectDetection` files, scenic's flax msgpack checkpoints, and any CLIP file as the
backbone of a fresh detector.

  model, params = checkpoints_convert.load_model("owlvit-base-patch32/")   # HF directory
  model, params = checkpoints_convert.load_model("checkpoint_140000")      # scenic msgpack
  params = load_backbone("openai-clip-vit-base-patch32/", model_config, 768, params)
  export_hf_owl_vit(params, model_config, "out_dir")

The towers go through clip.py's HF CLIPModel translation (the `owlvit.` / `owlv2.` prefix
stripped: the rest is a CLIPModel state dict, `pre_layernorm` spelled correctly); the detector
heads are translated here. Our tree has no visual projection or logit_scale (the detector does not
use them): they are dropped on reading, and written on export as zeros / log(1 / 0.07).
"""
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

from absl import logging
import ml_collections
import numpy as np

from vit_jax.checkpoints_convert import clip
from vit_jax.checkpoints_convert import common
from vit_jax.checkpoints_convert import core
from vit_jax.checkpoints_convert import torch as torch_formats

HF_FORMAT = "HF transformers OWL-ViT"
SCENIC_FORMAT = "scenic OWL-ViT (flax msgpack)"
_PREFIXES = ("owlvit.", "owlv2.")
_PATCH = "vision_model.embeddings.patch_embedding.weight"
# HF detection-head modules -> our names (LayerNorm: weight -> scale).
_HF_HEADS = {
    "layer_norm": "merged_class_token",
    "class_head.dense0": "class_head/dense0",
    "class_head.logit_shift": "class_head/logit_shift",
    "class_head.logit_scale": "class_head/logit_scale",
    **{f"{head}.dense{i}": f"{head}/dense{i}" for head in ("box_head", "objectness_head")
       for i in range(3)},
}
# CLIP config fields that are OWL-ViT's, not CLIP's (configs/models.get_owl_vit_config).
_OWL_FIELDS = ("objectness", "box_bias", "class_bias_prior", "head_approximate_gelu")
_DROPPED = ("img/head/kernel", "logit_scale", "logit_bias")


def hf_prefix(keys) -> Optional[str]:
  """'owlvit.' | 'owlv2.' when the keys are an HF OWL-ViT detector's, else None."""
  keys = set(keys)
  for prefix in _PREFIXES:
    if prefix + _PATCH in keys and "box_head.dense0.weight" in keys:
      return prefix
  return None


def _is_ours(keys) -> bool:
  """Our own OWL-ViT names (a vit_jax detection run's params): towers and both heads."""
  keys = set(keys)
  return "class_head/dense0/kernel" in keys and "box_head/dense0/kernel" in keys and any(
      k.startswith("img/") for k in keys)


def is_owl_vit(keys) -> bool:
  """Whether a state dict's keys are an HF OWL-ViT / OWLv2 detector."""
  return hf_prefix(keys) is not None


def is_scenic_msgpack(path: str) -> bool:
  """A flax msgpack file (scenic's `checkpoint_N`, or `*.msgpack`): a msgpack map at byte 0.

  Pickles start with 0x80 (PROTO), zips with 'PK', safetensors with a u64 header length; a
  msgpack map of 1-15 entries starts with 0x81-0x8f (map16/32: 0xde/0xdf).
  """
  if os.path.isdir(path) or not os.path.exists(path):
    return False
  if path.endswith(".msgpack"):
    return True
  if os.path.splitext(path)[1].lower() in (".npz", ".safetensors", ".bin", ".pth", ".pt",
                                           ".ckpt", ".pkl", ".json"):
    return False
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) == 9 and head[8:9] == b"{":  # safetensors
    return False
  return bool(head) and (0x81 <= head[0] <= 0x8f or head[0] in (0xde, 0xdf))


# ----------------------------------------------------------------------------------------------
# Model configs.


def owl_config_from_clip(clip_config, *, objectness: bool, head_approximate_gelu: bool = False):
  """An OWL-ViT model config (configs/models.py layout) with `clip_config`'s towers."""
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(clip_config.to_dict())
  c.image.classifier = "token_unpooled"
  c.objectness = bool(objectness)
  c.box_bias = "both"
  c.class_bias_prior = 0.01
  c.head_approximate_gelu = bool(head_approximate_gelu)
  c.name = "custom"
  for name in models.OWL_VIT_MODEL_NAMES:
    p = models.get_owl_vit_config(name)
    if (clip.architecture(p) == clip.architecture(c) and p.objectness == c.objectness):
      c.name = name
      break
  return c


def clip_view(model_config):
  """The CLIP model config of an OWL-ViT config's towers (what clip.py fits and exports)."""
  d = model_config.to_dict()
  for k in _OWL_FIELDS:
    d.pop(k, None)
  d["image"]["classifier"] = "token"
  d["text"].pop("extra_tokens", None)  # a CLIP file has no added-vocabulary table
  d.setdefault("logit_scale_init", math.log(1 / 0.07))
  d.setdefault("logit_bias_init", None)
  return ml_collections.ConfigDict(d)


def _module(model_config, module_kwargs=None):
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  from vit_jax.models import owl_vit  # pylint: disable=g-import-not-at-top
  return owl_vit.OwlViT(**models.owl_vit_kwargs(model_config), **dict(module_kwargs or {}))


def target_shapes(model_config, module_kwargs=None) -> Dict[str, object]:
  """{flat name: ShapeDtypeStruct} of `OwlViT(model_config)` at its image size and context."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  model = _module(model_config, module_kwargs)
  h, w = vit._pair(model_config.image_size)  # pylint: disable=protected-access
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3)),
      jnp.zeros((1, 1, model_config.text.context_length), jnp.int32)))
  return common.flatten(shapes["params"])


# ----------------------------------------------------------------------------------------------
# HF OwlViTForObjectDetection / Owlv2ForObjectDetection -> ours.


def _translate_heads(sd: Mapping[str, np.ndarray], path: str) -> Dict[str, np.ndarray]:
  """The detection heads of an HF state dict (keys without the owlvit. prefix), our names."""
  flat, unknown = {}, []
  for key, value in sd.items():
    m = re.match(r"^(.+)\.(weight|bias)$", key)
    if not m or m.group(1) not in _HF_HEADS:
      unknown.append(key)
      continue
    name, kind = _HF_HEADS[m.group(1)], m.group(2)
    value = np.asarray(value)
    if name == "merged_class_token":
      flat[f"{name}/{'scale' if kind == 'weight' else 'bias'}"] = value
    else:  # Linear [out, in] -> Dense [in, out]
      flat[f"{name}/{'kernel' if kind == 'weight' else 'bias'}"] = (
          value.T if kind == "weight" else value)
  if unknown:
    raise common.UnsupportedCheckpointError(
        f"{path}: {len(unknown)} keys an HF OWL-ViT detector does not have: {sorted(unknown)[:12]}")
  return flat


def translate_hf_owl_vit(sd: Mapping[str, np.ndarray], hf_config: Optional[Mapping] = None, *,
                         path: str = "<state dict>") -> Tuple[object, Dict, List[str]]:
  """HF OWL-ViT / OWLv2 detector state dict (+ config.json dict) -> (model_config, flat params,
  notes). The towers go through clip.translate_hf_clip; visual projection and logit_scale are
  dropped (the detector does not use them)."""
  prefix = hf_prefix(sd)
  if prefix is None:
    raise common.CheckpointError(f"{path}: not an HF OWL-ViT detector (no owlvit.{_PATCH} / "
                                 f"box_head.*). First keys: {sorted(sd)[:8]}")
  sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
  towers = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  heads = {k: v for k, v in sd.items() if not k.startswith(prefix)}
  notes = []
  if "visual_projection.weight" not in towers:  # clip.py needs one to infer embed_dim
    e = np.shape(towers["text_projection.weight"])[0]
    w = np.shape(towers[_PATCH])[0]
    towers["visual_projection.weight"] = np.zeros((e, w), np.float32)
  clip_config, clip_params = clip.translate_hf_clip(towers, hf_config, path=path)
  flat = common.flatten(clip_params)
  dropped = [k for k in _DROPPED if flat.pop(k, None) is not None]
  notes.append(f"dropped {', '.join(dropped)} (visual projection / contrastive scale: the "
               "detector does not use them)")
  flat.update(_translate_heads(heads, path))
  objectness = any(k.startswith("objectness_head/") for k in flat)
  if hf_config is not None:
    kind = hf_config.get("model_type")
    if kind == "owlvit" and objectness:
      notes.append("WARNING: config.json says owlvit (v1) but the file has an objectness head")
  c = owl_config_from_clip(clip_config, objectness=objectness)
  if hf_config is None:
    notes.append("no config.json: assumed quick_gelu, LayerNorm eps 1e-5 and 64-wide heads")
  return c, flat, notes


# ----------------------------------------------------------------------------------------------
# scenic (flax msgpack) -> ours. Names: scenic's OWL-ViT modules (notes 3e/4g); the CLIP towers'
# attention kernels are already [width, heads, head_dim], as ours.

_SCENIC_BLOCK = {"ln_0": "LayerNorm_0", "attn/query": "MultiHeadDotProductAttention_1/query",
                 "attn/key": "MultiHeadDotProductAttention_1/key",
                 "attn/value": "MultiHeadDotProductAttention_1/value",
                 "attn/out": "MultiHeadDotProductAttention_1/out", "ln_1": "LayerNorm_2",
                 "mlp/c_fc": "MlpBlock_3/Dense_0", "mlp/c_proj": "MlpBlock_3/Dense_1"}
_SCENIC_TOP = {
    "backbone/clip/visual/conv1/kernel": "img/embedding/kernel",
    "backbone/clip/visual/ln_pre/scale": "img/Transformer/pre_norm/scale",
    "backbone/clip/visual/ln_pre/bias": "img/Transformer/pre_norm/bias",
    "backbone/clip/visual/ln_post/scale": "img/Transformer/encoder_norm/scale",
    "backbone/clip/visual/ln_post/bias": "img/Transformer/encoder_norm/bias",
    "backbone/clip/text/token_embedding/embedding": "txt/token_embedding/embedding",
    "backbone/clip/text/ln_final/scale": "txt/Transformer/encoder_norm/scale",
    "backbone/clip/text/ln_final/bias": "txt/Transformer/encoder_norm/bias",
    "backbone/clip/text/text_projection/kernel": "txt/head/kernel",
    "backbone/merged_class_token/scale": "merged_class_token/scale",
    "backbone/merged_class_token/bias": "merged_class_token/bias",
    **{f"class_head/{s}/{l}": f"class_head/{o}/{l}" for s, o in (
        ("Dense_0", "dense0"), ("logit_shift", "logit_shift"), ("logit_scale", "logit_scale"))
       for l in ("kernel", "bias")},
    **{f"{s}/Dense_{i}/{l}": f"{o}/dense{i}/{l}" for s, o in (
        ("obj_box_head", "box_head"), ("objectness_head", "objectness_head"))
       for i in range(3) for l in ("kernel", "bias")},
}
_SCENIC_DROPPED = ("backbone/clip/visual/proj/kernel", "backbone/clip/logit_scale")


def read_scenic(path: str) -> Dict[str, np.ndarray]:
  """{'/'-joined scenic name: array} of a flax msgpack checkpoint's model params (under
  `params/`, `optimizer/target/` or at the root). msgpack_restore runs no code from the file."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  if not isinstance(tree, Mapping):
    raise common.CheckpointError(f"{path}: a msgpack file, but not a map of params.")
  for root in (("params",), ("optimizer", "target"), ("optimizer", "target", "params"), ()):
    node = tree
    for k in root:
      node = node.get(k) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping) and "backbone" in node:
      return {k: np.asarray(v) for k, v in common.flatten(node).items()}
  raise common.CheckpointError(
      f"{path}: a msgpack checkpoint without an OWL-ViT tree (expected backbone/... under "
      f"params/, optimizer/target/ or the root). Top-level keys: {sorted(tree)[:8]}")


def translate_scenic(flat: Mapping[str, np.ndarray], *, path: str = "<scenic tree>"):
  """scenic's flat OWL-ViT params -> (model_config, our flat params, notes)."""
  out, unknown = {}, []
  for key, value in flat.items():
    m = re.match(r"^backbone/clip/(visual|text)/transformer/resblocks_(\d+)/(.+)/"
                 r"(kernel|bias|scale)$", key)
    if m and m.group(3) in _SCENIC_BLOCK:
      tower = "img" if m.group(1) == "visual" else "txt"
      out[f"{tower}/{common.BLOCK.format(m.group(2))}{_SCENIC_BLOCK[m.group(3)]}/"
          f"{m.group(4)}"] = value
    elif key in _SCENIC_TOP:
      out[_SCENIC_TOP[key]] = value
    elif key == "backbone/clip/visual/class_embedding":
      out["img/cls"] = value.reshape(1, 1, -1)
    elif key == "backbone/clip/visual/positional_embedding":
      out[f"img/{common.POSEMB}"] = value.reshape(1, *value.shape[-2:])
    elif key == "backbone/clip/text/positional_embedding":
      out[f"txt/{common.POSEMB}"] = value.reshape(1, *value.shape[-2:])
    elif key not in _SCENIC_DROPPED:
      unknown.append(key)
  if unknown:
    raise common.UnsupportedCheckpointError(
        f"{path}: {len(unknown)} params this OWL-ViT does not have: {sorted(unknown)[:12]}")
  # The towers' config from the shapes, with scenic's CLIP choices (quick_gelu, eps 1e-5).
  e = np.shape(out["txt/head/kernel"])[1]
  shapes = dict(out, **{"img/head/kernel": np.zeros((out["img/embedding/kernel"].shape[-1], e))})
  act = {t: ("quick_gelu", False, 1e-5) for t in ("img", "txt")}
  clip_config = clip.config_from_params(shapes, act, path=path)
  objectness = any(k.startswith("objectness_head/") for k in out)
  # scenic's heads use flax's nn.gelu (tanh form).
  c = owl_config_from_clip(clip_config, objectness=objectness, head_approximate_gelu=True)
  notes = ["dropped visual/proj and logit_scale (the detector does not use them)",
           "heads compute with tanh gelu (scenic's flax nn.gelu; HF's port uses erf)"]
  return c, out, notes


# ----------------------------------------------------------------------------------------------
# Fitting to a model (image / text position embeddings) and load_model.


def _fit_towers(fmt: str, path: str, model_config, flat: Mapping[str, np.ndarray], *,
                file_config, context_length, resize_method, text_resize_method,
                notes: List[str]) -> Dict[str, np.ndarray]:
  """The `img/`, `txt/` params fitted to model_config's towers at its image_size and
  `context_length` (through clip.fit: the CLIP path's posemb resampling and checks)."""
  towers = {k: v for k, v in flat.items() if k.startswith(("img/", "txt/"))}
  src_view = clip_view(file_config)
  e = int(src_view.embed_dim)
  towers["img/head/kernel"] = np.zeros((towers["img/embedding/kernel"].shape[-1], e), np.float32)
  towers["logit_scale"] = np.asarray(math.log(1 / 0.07), np.float32)
  ckpt = clip.ClipCheckpoint(fmt, path, src_view, towers, [])
  _, params, _, fit_notes = clip.fit(ckpt, clip_view(model_config),
                                     context_length=context_length, resize_method=resize_method,
                                     text_resize_method=text_resize_method)
  notes.extend(fit_notes)
  out = common.flatten(params)
  for k in _DROPPED:
    out.pop(k, None)
  return out


def fit(fmt: str, path: str, file_config, flat: Mapping[str, np.ndarray], model_config=None, *,
        image_size=None, context_length: Optional[int] = None, resize_method: str = "bilinear",
        text_resize_method: str = "truncate", module_kwargs: Optional[Mapping] = None,
        notes: Optional[List[str]] = None):
  """Fits an OWL-ViT checkpoint's flat params to `OwlViT(model_config)` (default: the file's own
  config) at `image_size` with `context_length` tokens. Returns (model, params, config, notes)."""
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  notes = list(notes or [])
  c = ml_collections.ConfigDict((model_config or file_config).to_dict())
  if image_size is not None:
    h, w = vit._pair(image_size)  # pylint: disable=protected-access
    c = ml_collections.ConfigDict({**c.to_dict(), "image_size": h if h == w else (h, w)})
  if context_length is not None:
    c.text.context_length = int(context_length)
  out = _fit_towers(fmt, path, c, flat, file_config=file_config,
                    context_length=c.text.context_length, resize_method=resize_method,
                    text_resize_method=text_resize_method, notes=notes)
  out.update({k: v for k, v in flat.items() if not k.startswith(("img/", "txt/"))})
  params = core.match_target(out, target_shapes(c, module_kwargs), fmt=fmt, path=path)
  for note in notes:
    logging.info("checkpoints_convert: %s: %s", fmt, note)
  return _module(c, module_kwargs), common.unflatten(params), c, notes


def read(path: str):
  """(format, model_config, flat params, notes) of an HF OWL-ViT file/directory or a scenic
  msgpack checkpoint."""
  if is_scenic_msgpack(path):
    c, flat, notes = translate_scenic(read_scenic(path), path=path)
    return SCENIC_FORMAT, c, flat, notes
  state = core.read_state(path)
  c, flat, notes = translate_hf_owl_vit(state.arrays, state.hf_config, path=state.path)
  return HF_FORMAT, c, flat, notes


def load(path: str, *, model_config=None, image_size=None, context_length: Optional[int] = None,
         resize_method: str = "bilinear", text_resize_method: str = "truncate",
         module_kwargs: Optional[Mapping] = None, overrides: Optional[Mapping] = None,
         state: Optional[core.State] = None):
  """core.load_model for an OWL-ViT file (HF or scenic): (OwlViT module, params)."""
  if state is not None:
    fmt = HF_FORMAT
    c, flat, notes = translate_hf_owl_vit(state.arrays, state.hf_config, path=state.path)
    path = state.path
  else:
    fmt, c, flat, notes = read(path)
  if overrides:
    model_config = core.override_config(model_config if model_config is not None else c,
                                        overrides)
  model, params, _, _ = fit(fmt, path, c, flat, model_config, image_size=image_size,
                            context_length=context_length, resize_method=resize_method,
                            text_resize_method=text_resize_method, module_kwargs=module_kwargs,
                            notes=notes)
  return model, params


def load_backbone(path: str, model_config, image_size, params: Mapping, *,
                  resize_method: str = "bilinear", text_resize_method: str = "truncate",
                  vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                  hidden_act: Optional[str] = None) -> Dict:
  """scenic's `init_from.codebase='clip'`: the `img`/`txt` towers from any CLIP file clip.py
  reads (HF CLIPModel, OpenAI `.pt`, open_clip, our CLIP `.npz`), everything else (the heads,
  `merged_class_token`, an added-vocabulary table) kept from `params`.

  Image position embeddings are resampled to `image_size`, text ones truncated to the model's
  context length (16); the visual projection and logit_scale are dropped. Returns a tree with
  exactly `params`' names, shapes and dtypes (numpy), or raises CheckpointMismatchError.
  """
  ckpt = clip.read(path, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act)
  notes: List[str] = []
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  c = model_config.to_dict()
  if image_size is not None:
    h, w = vit._pair(image_size)  # pylint: disable=protected-access
    c["image_size"] = h if h == w else (h, w)  # a config field: the int a square size is
  c = ml_collections.ConfigDict(c)
  view = clip_view(c)
  _, clip_params, _, fit_notes = clip.fit(
      ckpt, view, image_size=image_size, context_length=c.text.context_length,
      resize_method=resize_method, text_resize_method=text_resize_method)
  del fit_notes  # clip.fit logged them
  notes.append("dropped the CLIP visual projection and logit_scale (unused by the detector); "
               "heads kept from the given params")
  src = {k: v for k, v in common.flatten(clip_params).items() if k not in _DROPPED}
  target = {k: np.asarray(v) for k, v in common.flatten(params).items()}
  kept = [k for k in target if k not in src]
  src.update({k: target[k] for k in kept})
  out = core.match_target(src, target, fmt=ckpt.format, path=ckpt.path)
  for note in notes:
    logging.info("checkpoints_convert: %s: %s", ckpt.format, note)
  return common.unflatten(out)


def load_pretrained(path: str, model_config, params: Mapping, *, image_size,
                    resize_method: str = "bilinear") -> Dict:
  """The detection task's init from `config.pretrained_path`, into the tree of `params`.

  An OWL-ViT file (HF OwlViT/Owlv2 file or directory, scenic msgpack) gives every param it holds
  (towers and heads); a CLIP file (anything clip.py reads) gives the towers only, the heads stay
  as initialised (`load_backbone`). Params the file cannot have, such as added-vocabulary
  embeddings (`txt/extra_token_embedding`), are kept from `params`. Image position embeddings
  are resampled to `image_size`. Returns numpy arrays with exactly `params`' names and shapes,
  or raises CheckpointMismatchError naming the key and both shapes.
  """
  if is_scenic_msgpack(path):
    state, fmt = None, SCENIC_FORMAT
  else:
    state, fmt = core.read_state(path), HF_FORMAT
    if _is_ours(state.arrays):  # this codebase's own OWL-ViT tree (a run's workdir / orbax)
      target = {k: np.asarray(v) for k, v in common.flatten(params).items()}
      src = {k: v for k, v in state.arrays.items() if k != "query_embeddings"}
      return common.unflatten(core.match_target(src, target, fmt="vit_jax OWL-ViT",
                                                path=state.path))
    if not is_owl_vit(state.arrays):
      return load_backbone(path, model_config, image_size, params, resize_method=resize_method)
  _, loaded = load(path, model_config=model_config, image_size=image_size,
                   resize_method=resize_method, state=state)
  src = dict(common.flatten(loaded))
  target = {k: np.asarray(v) for k, v in common.flatten(params).items()}
  kept = sorted(k for k in target if k not in src)
  if kept:
    logging.info("checkpoints_convert: %s: not in the file, kept as initialised: %s", fmt, kept)
  src.update({k: target[k] for k in kept})
  return common.unflatten(core.match_target(src, target, fmt=fmt, path=path))


# ----------------------------------------------------------------------------------------------
# Ours -> HF OwlViTForObjectDetection / Owlv2ForObjectDetection.


def hf_owl_vit_state_dict(params: Mapping, model_config) -> Dict[str, np.ndarray]:
  """Our OWL-ViT params -> HF detector state dict (its names, torch layouts, float32); the
  visual projection is written as zeros and logit_scale as log(1 / 0.07)."""
  flat = {k: np.asarray(v, np.float32) for k, v in common.flatten(params).items()}
  if "txt/extra_token_embedding/embedding" in flat or model_config.text.get("eot_token_id"):
    raise common.UnsupportedCheckpointError(
        "HF OWL-ViT cannot hold this model: it has added-vocabulary tokens (extra_tokens / "
        "eot_token_id), and HF pools the text at the largest token id.")
  towers = {k: v for k, v in flat.items() if k.startswith(("img/", "txt/"))}
  towers["img/head/kernel"] = np.zeros((flat["img/embedding/kernel"].shape[-1],
                                        int(model_config.embed_dim)), np.float32)
  towers["logit_scale"] = np.asarray(math.log(1 / 0.07), np.float32)
  prefix = "owlv2." if model_config.get("objectness") else "owlvit."
  sd = {}
  for k, v in clip.hf_clip_state_dict(common.unflatten(towers), clip_view(model_config)).items():
    sd[prefix + k.replace("vision_model.pre_layrnorm", "vision_model.pre_layernorm")] = v
  for theirs, ours in _HF_HEADS.items():
    if ours == "merged_class_token":
      sd[theirs + ".weight"], sd[theirs + ".bias"] = flat[ours + "/scale"], flat[ours + "/bias"]
    elif ours + "/kernel" in flat:
      sd[theirs + ".weight"], sd[theirs + ".bias"] = flat[ours + "/kernel"].T, flat[ours + "/bias"]
  return {k: np.array(v, order="C") for k, v in sd.items()}


def hf_owl_vit_config(params: Mapping, model_config) -> dict:
  """The config.json of an HF OwlViT (Owlv2) detector holding `params`."""
  v2 = bool(model_config.get("objectness"))
  kind = "owlv2" if v2 else "owlvit"
  flat = common.flatten(params)
  towers = {k: v for k, v in flat.items() if k.startswith(("img/", "txt/"))}
  towers["img/head/kernel"] = np.zeros((1, int(model_config.embed_dim)))
  config = clip.hf_clip_config(common.unflatten(towers), clip_view(model_config))
  config["architectures"] = ["Owlv2ForObjectDetection" if v2 else "OwlViTForObjectDetection"]
  config["model_type"] = kind
  config["text_config"]["model_type"] = f"{kind}_text_model"
  config["text_config"]["pad_token_id"] = 0
  config["vision_config"]["model_type"] = f"{kind}_vision_model"
  if int(model_config.embed_dim) != int(model_config.text.width):
    # HF's class head projects to the text width and compares with projection_dim embeddings.
    raise common.UnsupportedCheckpointError(
        f"HF OWL-ViT needs embed_dim == text width; this model has {model_config.embed_dim} vs "
        f"{model_config.text.width}.")
  return config


def export_hf_owl_vit(params: Mapping, model_config, out_dir: str) -> str:
  """Writes an HF detector directory (`config.json` + `model.safetensors`) that
  `OwlViTForObjectDetection.from_pretrained` (objectness models: `Owlv2ForObjectDetection`)
  loads; no torch needed."""
  torch_formats.write_hf_dir(hf_owl_vit_state_dict(params, model_config),
                            hf_owl_vit_config(params, model_config), out_dir)
  logging.info("checkpoints_convert: wrote %s: visual projection zeros, logit_scale log(1/0.07) "
               "(not used by the detector)", out_dir)
  return out_dir
