"""CLIP checkpoints <-> the CLIP here (models/clip.py): HF `CLIPModel` files, our `.npz`, and
(read only) OpenAI's `.pt` (TorchScript) and open_clip state dicts.

The interchange format is the HF `CLIPModel` state dict with numpy values: `vision_model.*`
(`pre_layrnorm`, sic, is the real key), `text_model.*`, `visual_projection.weight`,
`text_projection.weight`, `logit_scale`. Other CLIP formats (OpenAI `.pt`, open_clip) are turned
into that dict and the `CLIPConfig` kwargs that describe it first (openai_clip.py), so every CLIP
source ends in `translate_hf_clip`:

  model_config, params = translate_hf_clip(state_dict, hf_config_or_None)
  sd = hf_clip_state_dict(params, model_config); export_hf_clip(params, model_config, out_dir)
  model, params = checkpoints_convert.load_model(path, image_size=768, context_length=16)

Our tree: `img/...` (VisionTransformer names: `embedding`, `cls`,
`Transformer/{posembed_input, pre_norm, encoderblock_{i}, encoder_norm}`, `head` = the projection),
`txt/...` (`token_embedding`, `Transformer/...`, `head`), `logit_scale` [, `logit_bias`]. Our
`.npz` stores those '/'-joined names and, under `__vit_jax__/{img,txt}/`, each tower's activation
and LayerNorm epsilon (npz.py).
"""
import re
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

from absl import logging
import ml_collections
import numpy as np

from vit_jax.checkpoints_convert import common
from vit_jax.checkpoints_convert import core
from vit_jax.checkpoints_convert import npz
from vit_jax.checkpoints_convert import openai_clip
from vit_jax.checkpoints_convert import posemb
from vit_jax.checkpoints_convert import torch as torch_formats

_ATTN = "MultiHeadDotProductAttention_1/"
_POSEMB = common.POSEMB
# HF CLIPEncoderLayer children -> our Encoder1DBlock's.
_HF_BLOCK = {
    "layer_norm1": "LayerNorm_0",
    "self_attn.q_proj": _ATTN + "query",
    "self_attn.k_proj": _ATTN + "key",
    "self_attn.v_proj": _ATTN + "value",
    "self_attn.out_proj": _ATTN + "out",
    "layer_norm2": "LayerNorm_2",
    "mlp.fc1": "MlpBlock_3/Dense_0",
    "mlp.fc2": "MlpBlock_3/Dense_1",
}
# HF module (without .weight/.bias) -> (tower, our name).
_HF_TOP = {
    "vision_model.embeddings.patch_embedding": ("img", "embedding"),
    "vision_model.pre_layrnorm": ("img", "Transformer/pre_norm"),
    "vision_model.pre_layernorm": ("img", "Transformer/pre_norm"),  # OWL-ViT's spelling
    "vision_model.post_layernorm": ("img", "Transformer/encoder_norm"),
    "visual_projection": ("img", "head"),
    "text_model.final_layer_norm": ("txt", "Transformer/encoder_norm"),
    "text_projection": ("txt", "head"),
}
_HF_TOWER = {"vision_model": "img", "text_model": "txt"}
# HF hidden_act -> our (mlp_activation, approximate_gelu).
_HF_ACT = {"quick_gelu": ("quick_gelu", False), "gelu": ("gelu", False),
           "gelu_python": ("gelu", False), "gelu_pytorch_tanh": ("gelu", True),
           "gelu_new": ("gelu", True), "gelu_fast": ("gelu", True)}
# CLIPVisionConfig / CLIPTextConfig defaults: what HF computes with when config.json omits a key.
_HF_DEFAULTS = {"img": {"num_attention_heads": 12, "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-5},
                "txt": {"num_attention_heads": 8, "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-5}}
_TOWER_NAMES = {"img": "vision", "txt": "text"}
HF_FORMAT = "HF transformers CLIP"
NPZ_FORMAT = "vit_jax CLIP .npz"
OPENAI_FORMAT = "OpenAI CLIP (TorchScript)"  # any TorchScript archive in OpenAI's layout
OPEN_CLIP_FORMAT = "open_clip state dict"  # torch.save / safetensors in OpenAI's layout
# What `hidden_act` may say for OpenAI / open_clip files (HF's names, as config.json has them).
HIDDEN_ACTS = tuple(sorted(_HF_ACT))
TEXT_RESIZE_METHODS = ("truncate",) + posemb.METHODS
# One torch parameter -> our name and layout (attention head split, Linear/conv transposes).
_put = torch_formats._put  # pylint: disable=protected-access


def is_hf_clip(keys) -> bool:
  keys = set(keys)
  return ("vision_model.embeddings.patch_embedding.weight" in keys and
          "text_model.embeddings.token_embedding.weight" in keys)


def is_clip_npz(keys) -> bool:
  keys = set(keys)
  return "img/embedding/kernel" in keys and "txt/token_embedding/embedding" in keys


def is_clip(keys) -> bool:
  """Whether a file's keys are a CLIP checkpoint this module reads: HF CLIPModel, our .npz, or
  OpenAI's layout (OpenAI, open_clip). The last includes the variants that are then refused
  (ResNet, open_clip's `visual.trunk.` timm tower) so that they are told why, and are never
  taken for timm ViTs (`visual.trunk.patch_embed.proj.weight` looks like one)."""
  keys = list(keys)
  return is_hf_clip(keys) or is_clip_npz(keys) or openai_clip.is_openai_clip(keys)


def describe_format(keys, path: Optional[str] = None) -> str:
  """The format name of a CLIP file's keys (`path` tells OpenAI's TorchScript from open_clip)."""
  keys = list(keys)
  if is_hf_clip(keys):
    return HF_FORMAT
  if is_clip_npz(keys):
    return NPZ_FORMAT
  return OPENAI_FORMAT if path and openai_clip.is_torchscript(path) else OPEN_CLIP_FORMAT


# ----------------------------------------------------------------------------------------------
# HF CLIPModel state dict -> our params.


def _tower_configs(hf_config: Optional[Mapping]) -> Dict[str, Optional[dict]]:
  """{"img": vision_config, "txt": text_config} of a CLIPConfig dict (None: no config.json).

  Older config.json files also carry `*_config_dict`, which HF lets override `*_config`.
  """
  if hf_config is None:
    return {"img": None, "txt": None}
  out = {}
  for tower, name in (("img", "vision"), ("txt", "text")):
    sub = {**(hf_config.get(f"{name}_config") or {}),
           **(hf_config.get(f"{name}_config_dict") or {})}
    out[tower] = {**_HF_DEFAULTS[tower], **sub}
  return out


def _num_heads(tower: str, width: int, cfg: Optional[dict], override: Optional[int],
               path: str) -> int:
  heads = override or (cfg or {}).get("num_attention_heads")
  if heads is None:
    # OpenAI's rule (all its CLIPs, and open_clip's): 64-wide heads.
    heads = width // 64
    if heads < 1 or width % 64:
      raise common.CheckpointError(
          f"{path}: the {_TOWER_NAMES[tower]} tower is {width} wide and nothing records its "
          "number of attention heads (no config.json; the 64-wide-heads rule does not divide "
          f"it): pass {_TOWER_NAMES[tower]}_heads.")
  if width % heads:
    raise common.CheckpointError(f"{path}: {_TOWER_NAMES[tower]} width {width} is not divisible "
                                 f"by its {heads} attention heads.")
  return int(heads)


def _activation(tower: str, cfg: Optional[dict], path: str) -> Tuple[str, bool, float]:
  """(mlp_activation, approximate_gelu, layernorm_epsilon) a tower's config says."""
  cfg = cfg or _HF_DEFAULTS[tower]
  act = cfg["hidden_act"]
  if act not in _HF_ACT:
    raise common.UnsupportedCheckpointError(
        f"{path}: {_TOWER_NAMES[tower]}_config.hidden_act={act!r}; expected one of "
        f"{sorted(_HF_ACT)}.")
  return _HF_ACT[act] + (float(cfg["layer_norm_eps"]),)


def translate_hf_clip(sd: Mapping[str, np.ndarray], hf_config: Optional[Mapping] = None, *,
                      vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                      path: str = "<state dict>"):
  """HF `CLIPModel` state dict (+ its config.json as a dict, or None) -> (model_config, params).

  Widths, depths, MLP sizes, vocabulary, context length, patch and image size come from the
  arrays' shapes; attention heads from the config (else `vision_heads`/`text_heads`, else
  OpenAI's width // 64); activation and LayerNorm epsilon from the config (else quick_gelu and
  1e-5, OpenAI's). `*.position_ids` buffers are ignored. Returns a CLIP model config
  (configs/models.py layout) and a nested dict of numpy arrays, our CLIP's params tree.
  """
  towers = _tower_configs(hf_config)
  sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
  widths = {}
  for tower, key, axis in (("img", "vision_model.embeddings.patch_embedding.weight", 0),
                           ("txt", "text_model.embeddings.token_embedding.weight", 1)):
    if key not in sd:
      raise common.CheckpointError(f"{path}: no {key}: not an HF CLIPModel state dict. First "
                                   f"keys: {sorted(sd)[:8]}")
    widths[tower] = int(np.shape(sd[key])[axis])
  heads = {"img": _num_heads("img", widths["img"], towers["img"], vision_heads, path),
           "txt": _num_heads("txt", widths["txt"], towers["txt"], text_heads, path)}

  flat: Dict[str, np.ndarray] = {}
  unknown: List[str] = []
  for key, value in sd.items():
    value = np.asarray(value)
    m = re.match(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m and m.group(3) in _HF_BLOCK:
      tower = _HF_TOWER[m.group(1)]
      out = {}
      _put(out, common.BLOCK.format(m.group(2)) + _HF_BLOCK[m.group(3)], m.group(4), value,
           heads[tower], path)
      flat.update({f"{tower}/{k}": v for k, v in out.items()})
      continue
    m = re.match(r"^(.+)\.(weight|bias)$", key)
    if m and m.group(1) in _HF_TOP:
      tower, name = _HF_TOP[m.group(1)]
      if name == "Transformer/pre_norm":  # a LayerNorm that torch._put does not know by name
        flat[f"img/{name}/{'scale' if m.group(2) == 'weight' else 'bias'}"] = value
      else:
        out = {}
        _put(out, name, m.group(2), value, heads[tower], path)
        flat.update({f"{tower}/{k}": v for k, v in out.items()})
    elif key == "vision_model.embeddings.class_embedding":
      flat["img/cls"] = value.reshape(1, 1, -1)
    elif key == "vision_model.embeddings.position_embedding.weight":
      flat[f"img/{_POSEMB}"] = value[None]
    elif key == "text_model.embeddings.position_embedding.weight":
      flat[f"txt/{_POSEMB}"] = value[None]
    elif key == "text_model.embeddings.token_embedding.weight":
      flat["txt/token_embedding/embedding"] = value
    elif key in ("logit_scale", "logit_bias"):
      flat[key] = value.reshape(())
    else:
      unknown.append(key)
  if unknown:
    raise common.UnsupportedCheckpointError(
        f"{path}: {len(unknown)} keys an HF CLIPModel does not have: {sorted(unknown)[:12]}")

  act = {t: _activation(t, towers[t], path) for t in ("img", "txt")}
  grid = None
  vcfg = towers["img"] or {}
  if vcfg.get("image_size") and vcfg.get("patch_size"):
    size, patch = (np.broadcast_to(np.asarray(vcfg[k]), (2,)) for k in ("image_size", "patch_size"))
    grid = tuple(int(s) // int(p) for s, p in zip(size, patch))
  model_config = config_from_params(flat, act, grid=grid, path=path)
  note = _pooling_note(towers["txt"], model_config.text.vocab_size)
  if note:
    logging.warning("checkpoints_convert: %s: %s", path, note)
  return model_config, common.unflatten(flat)


def _pooling_note(text_config: Optional[dict], vocab_size: int) -> Optional[str]:
  """Where HF would pool the text at another token than this model does, say so."""
  eos = (text_config or {}).get("eos_token_id")
  # HF pools at the first eos_token_id, or (its legacy eos_token_id=2) at the argmax as OpenAI.
  if eos is None or eos in (2, vocab_size - 1):
    return None
  return (f"text_config.eos_token_id={eos}: HF pools the text at that token, this model at the "
          "largest token id; they agree only where the EOT token has the largest id")


def config_from_params(flat: Mapping[str, np.ndarray], activations: Mapping[str, tuple], *,
                       grid: Optional[Tuple[int, int]] = None, path: str = ""):
  """The CLIP model config our flat params imply; `activations[tower]` = (mlp_activation,
  approximate_gelu, layernorm_epsilon). `grid`: the image patch grid, when the file says."""
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  need = ["img/embedding/kernel", f"img/{_POSEMB}", "img/head/kernel",
          "txt/token_embedding/embedding", f"txt/{_POSEMB}", "txt/head/kernel"]
  absent = [k for k in need if k not in flat]
  if absent:
    raise common.CheckpointError(f"{path}: a CLIP checkpoint needs {absent}; not found.")

  def tower(prefix):
    layers = 0
    while f"{prefix}/{common.BLOCK.format(layers)}LayerNorm_0/scale" in flat:
      layers += 1
    if not layers:
      raise common.CheckpointError(f"{path}: no {prefix}/{common.BLOCK.format(0)}... blocks.")
    block = f"{prefix}/{common.BLOCK.format(0)}"
    return (layers, int(flat[block + _ATTN + "query/kernel"].shape[1]),
            int(flat[block + "MlpBlock_3/Dense_0/kernel"].shape[-1]))

  if "img/cls" not in flat:
    raise common.UnsupportedCheckpointError(f"{path}: a CLIP image tower without a class token "
                                            "(img/cls) is not supported.")
  kernel = flat["img/embedding/kernel"]
  patch = (int(kernel.shape[0]), int(kernel.shape[1]))
  tokens = flat[f"img/{_POSEMB}"].shape[1] - 1
  if not grid or grid[0] * grid[1] != tokens:
    grid = posemb.grid_from_tokens(tokens)
  (vl, vh, vm), (tl, th, tm) = tower("img"), tower("txt")
  vocab, tw = flat["txt/token_embedding/embedding"].shape
  embed_dim = int(flat["img/head/kernel"].shape[-1])
  h, w = grid[0] * patch[0], grid[1] * patch[1]
  c = models.clip_model_config(
      name="custom", embed_dim=embed_dim, image_size=h if h == w else (h, w), patch=patch[0],
      vision=(int(kernel.shape[-1]), vl, vh), text=(int(tw), tl, th), vocab_size=int(vocab),
      context_length=int(flat[f"txt/{_POSEMB}"].shape[1]))
  c.image.patches.size = patch
  c.image.transformer.mlp_dim = vm
  c.text.mlp_dim = tm
  c.image.pre_norm = "img/Transformer/pre_norm/scale" in flat
  c.image.patch_embedding_bias = "img/embedding/bias" in flat
  c.image.head_bias = "img/head/bias" in flat
  for section, prefix in ((c.image, "img"), (c.text, "txt")):
    section.mlp_activation, section.approximate_gelu, section.layernorm_epsilon = (
        activations[prefix])
  if "logit_bias" in flat:
    c.logit_bias_init = float(flat["logit_bias"])
  if "txt/head/bias" in flat:
    raise common.UnsupportedCheckpointError(f"{path}: a text projection with a bias is not "
                                            "supported (CLIP's has none).")
  c.name = _preset_name(c) or "custom"
  return c


def _preset_name(c) -> Optional[str]:
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  for name in models.CLIP_MODEL_NAMES:
    p = models.get_clip_config(name)
    if all(architecture(p)[k] == v for k, v in architecture(c).items()):
      return name
  return None


def architecture(c) -> Dict[str, object]:
  """What fixes a CLIP model config's param shapes (besides image size and context length)."""
  return {"patch": tuple(c.image.patches.size), "image_width": c.image.hidden_size,
          "image_layers": c.image.transformer.num_layers,
          "image_heads": c.image.transformer.num_heads,
          "image_mlp": c.image.transformer.mlp_dim, "text_width": c.text.width,
          "text_layers": c.text.num_layers, "text_heads": c.text.num_heads,
          "text_mlp": c.text.mlp_dim, "vocab_size": c.text.vocab_size, "embed_dim": c.embed_dim}


def describe(c) -> str:
  """One line: a CLIP model config's architecture."""
  i, t = c.image, c.text
  act = lambda s: s.mlp_activation if s.mlp_activation != "gelu" else (
      "gelu tanh" if s.approximate_gelu else "gelu erf")
  return (f"{c.name}: image patch={tuple(i.patches.size)} size={c.image_size} "
          f"width={i.hidden_size} layers={i.transformer.num_layers} "
          f"heads={i.transformer.num_heads} mlp_dim={i.transformer.mlp_dim} ({act(i)}, "
          f"eps {i.layernorm_epsilon:g}); text width={t.width} layers={t.num_layers} "
          f"heads={t.num_heads} mlp_dim={t.mlp_dim} vocab={t.vocab_size} "
          f"context={t.context_length} ({act(t)}, eps {t.layernorm_epsilon:g}); "
          f"embed_dim={c.embed_dim}")


# ----------------------------------------------------------------------------------------------
# Reading files, fitting to a model.


class ClipCheckpoint(NamedTuple):
  format: str  # HF_FORMAT | NPZ_FORMAT | OPENAI_FORMAT | OPEN_CLIP_FORMAT
  path: str
  model_config: object  # ConfigDict, configs/models.py CLIP layout
  params: Dict[str, np.ndarray]  # flat, '/'-joined
  notes: List[str]


def read(path: str, *, vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
         hidden_act: Optional[str] = None) -> ClipCheckpoint:
  """Reads an HF CLIPModel directory/file, our CLIP `.npz`, an OpenAI CLIP `.pt` (TorchScript,
  read without running it) or an open_clip state dict (see core.read_state).

  Args:
    path: the file or directory.
    vision_heads, text_heads: attention heads, for files that do not record them (OpenAI /
      open_clip files, an HF file without config.json); default: 64-wide heads, OpenAI's rule.
    hidden_act: OpenAI / open_clip files only, which do not record it: the MLP activation
      (HIDDEN_ACTS). Default "quick_gelu", right for OpenAI's models and open_clip's
      `*-quickgelu`; open_clip's LAION models (names without -quickgelu) need "gelu".
  """
  return from_state(core.read_state(path), vision_heads=vision_heads, text_heads=text_heads,
                    hidden_act=hidden_act)


def from_state(state: core.State, *, vision_heads: Optional[int] = None,
               text_heads: Optional[int] = None,
               hidden_act: Optional[str] = None) -> ClipCheckpoint:
  """`read` for a file already read with core.read_state."""
  keys = list(state.arrays)
  if openai_clip.is_openai_clip(keys):
    return _from_openai_state(state, vision_heads=vision_heads, text_heads=text_heads,
                              hidden_act=hidden_act)
  if hidden_act is not None:
    raise TypeError(f"{state.path} is a {describe_format(keys)} checkpoint, which records its "
                    "activation: hidden_act is for OpenAI / open_clip files (to compute with "
                    "another, override model.image/text.mlp_activation instead).")
  if is_clip_npz(keys):
    flat, meta = npz.split_metadata(state.arrays, state.path)
    act = {}
    for tower in ("img", "txt"):
      m = meta.get(f"{tower}/", {})
      fields = npz.activation_fields(m.get("activation", "quick_gelu"))
      act[tower] = (fields["mlp_activation"], fields["approximate_gelu"],
                    float(m.get("layernorm_epsilon", 1e-5)))
    c = config_from_params(flat, act, path=state.path)
    return ClipCheckpoint(NPZ_FORMAT, state.path, c, dict(flat), [])
  if is_hf_clip(keys):
    c, params = translate_hf_clip(state.arrays, state.hf_config, vision_heads=vision_heads,
                                  text_heads=text_heads, path=state.path)
    notes = [] if state.hf_config is not None else [
        "no config.json: assumed OpenAI's quick_gelu, LayerNorm eps 1e-5 and 64-wide heads"]
    note = _pooling_note(_tower_configs(state.hf_config)["txt"], c.text.vocab_size)
    if note:
      notes.append(note)
    return ClipCheckpoint(HF_FORMAT, state.path, c, common.flatten(params), notes)
  raise common.CheckpointError(f"{state.path}: not a CLIP checkpoint (HF CLIPModel, our CLIP "
                               f".npz, OpenAI or open_clip). First keys: {sorted(keys)[:8]}")


def _from_openai_state(state: core.State, *, vision_heads: Optional[int],
                       text_heads: Optional[int], hidden_act: Optional[str]) -> ClipCheckpoint:
  """An OpenAI `.pt` / open_clip file: to HF CLIPModel names and CLIPConfig kwargs
  (openai_clip.py), then through `translate_hf_clip` as any HF CLIP."""
  fmt = describe_format(state.arrays, state.path)
  notes = []
  if hidden_act is None:
    # Nothing in the file says which: OpenAI's nn.GELU subclass QuickGELU and open_clip's nn.GELU
    # hold no weights. A wrong guess gives plausible but wrong embeddings, so say so every time.
    hidden_act = "quick_gelu"
    notes.append("MLP activation: assumed quick_gelu, which the weights cannot tell (right for "
                 "OpenAI's models and open_clip's *-quickgelu ones); open_clip's LAION models "
                 "(names without -quickgelu) need hidden_act='gelu' (CLI: --hidden-act gelu)")
    # A warning, not only the notes fit() logs at INFO level, which absl hides by default.
    logging.warning("checkpoints_convert: %s: %s", state.path, notes[-1])
  elif hidden_act not in HIDDEN_ACTS:
    raise ValueError(f"hidden_act={hidden_act!r}: expected one of {HIDDEN_ACTS}.")
  sd = openai_clip.unwrap(state.arrays)
  hf_sd, facts = openai_clip.openai_to_hf_clip(
      sd, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act,
      path=state.path)
  assumed = [f"{name} {facts[f'{name}_config']['num_attention_heads']}"
             for name, given in (("vision", vision_heads), ("text", text_heads)) if not given]
  if assumed:
    # True of every OpenAI release and open_clip's default head_width, not of all open_clip
    # models (ViT-bigG-14's image tower has 104-wide heads): wrong heads load but compute wrong.
    notes.append(f"attention heads: assumed 64-wide, OpenAI's rule ({', '.join(assumed)}); "
                 "pass vision_heads/text_heads where the model's head width differs")
  c, params = translate_hf_clip(hf_sd, facts, path=state.path)
  return ClipCheckpoint(fmt, state.path, c, common.flatten(params), notes)


def _resample_text_posemb(pe: np.ndarray, length: int, method: str, notes: List[str],
                          path: str) -> np.ndarray:
  """[1, old, width] text position embeddings -> [1, length, width]."""
  old = pe.shape[1]
  if old == length:
    return pe
  if method not in TEXT_RESIZE_METHODS:
    raise ValueError(f"Unknown text_resize_method {method!r}: expected one of "
                     f"{TEXT_RESIZE_METHODS}.")
  if method == "truncate":
    if length > old:
      raise common.CheckpointError(
          f"{path}: context_length {length} is longer than the checkpoint's {old} position "
          "embeddings; truncation cannot add rows (pass text_resize_method='bilinear').")
    notes.append(f"text position embeddings truncated from {old} to {length}")
    return pe[:, :length]
  # A [old, 1] grid resampled along its first axis: the image resampling, in one dimension.
  out = posemb.resample_grid(pe[0][:, None, :], (length, 1), method)
  notes.append(f"text position embeddings resampled from {old} to {length} ({method})")
  return out.reshape(1, length, -1).astype(pe.dtype)


def fit(ckpt: ClipCheckpoint, model_config=None, *, image_size=None,
        context_length: Optional[int] = None, resize_method: str = "bilinear",
        text_resize_method: str = "truncate", module_kwargs: Optional[Mapping] = None):
  """Fits a CLIP checkpoint to `CLIP(**clip_kwargs(model_config))` run at `image_size` with
  `context_length` tokens: resamples the image position embeddings (class-token row kept) and
  truncates or resamples the text ones. Returns (model, params, model_config, notes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  from vit_jax.models import clip as clip_model  # pylint: disable=g-import-not-at-top
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  c = model_config if model_config is not None else ckpt.model_config
  if image_size is not None:
    h, w = vit._pair(image_size)  # pylint: disable=protected-access
    # Through a dict: a ConfigDict field keeps its first type, and the size may go int <-> pair.
    c = ml_collections.ConfigDict({**c.to_dict(), "image_size": h if h == w else (h, w)})
  c = core.override_config(c, {})  # a copy
  if context_length is not None:
    c.text.context_length = int(context_length)
  h, w = vit._pair(c.image_size)  # pylint: disable=protected-access
  model = clip_model.CLIP(**models.clip_kwargs(c), **dict(module_kwargs or {}))
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3)),
      jnp.zeros((1, c.text.context_length), jnp.int32)))
  target = common.flatten(shapes["params"])

  src, notes = dict(ckpt.params), list(ckpt.notes) + _activation_warnings(ckpt.model_config, c)
  key = f"img/{_POSEMB}"
  if key in src and key in target and src[key].shape != tuple(target[key].shape):
    prefix = int("img/cls" in src)
    tokens = src[key].shape[1] - prefix
    old = vit.posemb_grid(ckpt.model_config.image, ckpt.model_config.image_size)
    if old[0] * old[1] != tokens:
      old = posemb.grid_from_tokens(tokens)
    new = vit.posemb_grid(c.image, (h, w))
    src[key] = posemb.resample_posemb(src[key], num_prefix=prefix, old_grid=old, new_grid=new,
                                      method=resize_method)
    notes.append(f"resized image position embeddings from grid {old[0]}x{old[1]} to "
                 f"{new[0]}x{new[1]} ({resize_method})")
  key = f"txt/{_POSEMB}"
  if key in src and key in target:
    src[key] = _resample_text_posemb(src[key], target[key].shape[1], text_resize_method, notes,
                                     ckpt.path)
  params = core.match_target(src, target, fmt=ckpt.format, path=ckpt.path)
  for note in notes:
    logging.info("checkpoints_convert: %s: %s", ckpt.format, note)
  return model, common.unflatten(params), c, notes


def _activation_warnings(file_config, model_config) -> List[str]:
  """Warnings (not errors) where the model computes differently from the checkpoint's source."""
  out = []
  for name, ours, theirs in (("image", model_config.image, file_config.image),
                             ("text", model_config.text, file_config.text)):
    got, want = ((npz.activation_name(s), float(s.layernorm_epsilon)) for s in (ours, theirs))
    if got != want:
      out.append(f"WARNING: the checkpoint's {name} tower computes with {want[0]} and LayerNorm "
                 f"eps {want[1]:g}, this model with {got[0]} and {got[1]:g}: outputs differ "
                 f"(set model.{name}.mlp_activation/approximate_gelu/layernorm_epsilon)")
  return out


def load_state(state: core.State, *, model_config=None, image_size=None,
               context_length: Optional[int] = None, resize_method: str = "bilinear",
               text_resize_method: str = "truncate", module_kwargs: Optional[Mapping] = None,
               overrides: Optional[Mapping] = None, vision_heads: Optional[int] = None,
               text_heads: Optional[int] = None, hidden_act: Optional[str] = None):
  """core.load_model for a CLIP file: (model, params)."""
  ckpt = from_state(state, vision_heads=vision_heads, text_heads=text_heads,
                    hidden_act=hidden_act)
  if overrides:
    model_config = core.override_config(
        model_config if model_config is not None else ckpt.model_config, overrides)
  model, params, _, _ = fit(ckpt, model_config, image_size=image_size,
                            context_length=context_length, resize_method=resize_method,
                            text_resize_method=text_resize_method, module_kwargs=module_kwargs)
  return model, params


# ----------------------------------------------------------------------------------------------
# Our params -> HF CLIPModel, and our .npz.


def _hf_act(section) -> str:
  if section.mlp_activation == "quick_gelu":
    return "quick_gelu"
  return "gelu_pytorch_tanh" if section.approximate_gelu else "gelu"


def _check_exportable(flat: Mapping[str, np.ndarray], c) -> None:
  """HF's CLIPModel has a fixed architecture; refuse what it cannot hold (it would load the
  file and silently compute something else)."""
  problems = []
  if "img/embedding/bias" in flat:
    problems.append("a patch-embedding bias (HF's has none)")
  if "img/head/bias" in flat or "txt/head/bias" in flat:
    problems.append("a projection bias (HF's have none)")
  if "img/Transformer/pre_norm/scale" not in flat:
    problems.append("no pre_norm (HF's vision model always applies pre_layrnorm)")
  if "logit_bias" in flat:
    problems.append("a logit_bias (SigLIP; HF's CLIPModel has none)")
  if c.image.get("classifier", "token") != "token" or c.image.get("representation_size"):
    problems.append("pooling other than the class token after the final LayerNorm")
  ph, pw = tuple(c.image.patches.size)
  if ph != pw:
    problems.append(f"non-square patches {(ph, pw)}")
  tokens = flat[f"img/{_POSEMB}"].shape[1] - 1
  try:
    posemb.grid_from_tokens(tokens)
  except ValueError:
    problems.append(f"a non-square grid of {tokens} image position embeddings (HF's is square)")
  if problems:
    raise common.UnsupportedCheckpointError(
        "HF CLIPModel cannot hold this model: " + "; ".join(problems) + ". Export .npz instead.")


def hf_clip_state_dict(params: Mapping, model_config) -> Dict[str, np.ndarray]:
  """Our CLIP params -> HF `CLIPModel` state dict (its names, torch layouts, float32)."""
  flat = {k: np.asarray(v, np.float32) for k, v in common.flatten(params).items()}
  _check_exportable(flat, model_config)
  sd = {"logit_scale": flat["logit_scale"].reshape(())}
  layers = {"img": model_config.image.transformer.num_layers,
            "txt": model_config.text.num_layers}
  for tower, hf in (("img", "vision_model"), ("txt", "text_model")):
    for i in range(layers[tower]):
      for theirs, ours in _HF_BLOCK.items():
        name = f"{tower}/{common.BLOCK.format(i)}{ours}"
        dst = f"{hf}.encoder.layers.{i}.{theirs}"
        leaf = ours.rsplit("/", 1)[-1]
        if leaf.startswith("LayerNorm"):
          sd[dst + ".weight"] = flat[name + "/scale"]
          sd[dst + ".bias"] = flat[name + "/bias"]
        elif leaf in ("query", "key", "value"):  # [width, heads, head_dim] -> [heads*hd, width]
          k = flat[name + "/kernel"]
          sd[dst + ".weight"] = k.reshape(k.shape[0], -1).T
          sd[dst + ".bias"] = flat[name + "/bias"].reshape(-1)
        elif leaf == "out":  # [heads, head_dim, width] -> [width, heads*hd]
          k = flat[name + "/kernel"]
          sd[dst + ".weight"] = k.reshape(-1, k.shape[-1]).T
          sd[dst + ".bias"] = flat[name + "/bias"]
        else:  # Dense [in, out] -> Linear [out, in]
          sd[dst + ".weight"] = flat[name + "/kernel"].T
          sd[dst + ".bias"] = flat[name + "/bias"]
  for module, (tower, ours) in _HF_TOP.items():
    if module == "vision_model.pre_layernorm":
      continue  # OWL-ViT's spelling; CLIPModel's key is pre_layrnorm
    if ours == "embedding":  # HWIO -> OIHW
      sd[module + ".weight"] = flat[f"{tower}/embedding/kernel"].transpose(3, 2, 0, 1)
    elif ours == "head":
      sd[module + ".weight"] = flat[f"{tower}/head/kernel"].T
    else:
      sd[module + ".weight"] = flat[f"{tower}/{ours}/scale"]
      sd[module + ".bias"] = flat[f"{tower}/{ours}/bias"]
  sd["vision_model.embeddings.class_embedding"] = flat["img/cls"].reshape(-1)
  sd["vision_model.embeddings.position_embedding.weight"] = flat[f"img/{_POSEMB}"][0]
  sd["text_model.embeddings.position_embedding.weight"] = flat[f"txt/{_POSEMB}"][0]
  sd["text_model.embeddings.token_embedding.weight"] = flat["txt/token_embedding/embedding"]
  # np.array, not np.ascontiguousarray: that would make the 0-d logit_scale 1-d.
  return {k: np.array(v, order="C") for k, v in sd.items()}


def hf_clip_config(params: Mapping, model_config) -> dict:
  """The config.json of an HF `CLIPModel` holding `params`."""
  c = model_config
  flat = common.flatten(params)
  tokens = flat[f"img/{_POSEMB}"].shape[1] - 1
  ph = int(c.image.patches.size[0])
  rows, _ = posemb.grid_from_tokens(tokens)  # square: _check_exportable
  vocab = int(c.text.vocab_size)
  embed_dim = int(c.embed_dim)
  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": embed_dim,
      "logit_scale_init_value": float(c.get("logit_scale_init", 2.6592)),
      "initializer_factor": 1.0,
      "dtype": "float32",
      "text_config": {
          "model_type": "clip_text_model",
          "hidden_size": int(c.text.width),
          "intermediate_size": int(c.text.mlp_dim),
          "num_hidden_layers": int(c.text.num_layers),
          "num_attention_heads": int(c.text.num_heads),
          "max_position_embeddings": int(flat[f"txt/{_POSEMB}"].shape[1]),
          "vocab_size": vocab,
          "hidden_act": _hf_act(c.text),
          "layer_norm_eps": float(c.text.layernorm_epsilon),
          "attention_dropout": 0.0,
          "projection_dim": embed_dim,
          # HF pools at the first eos_token_id; this model at the largest id. With the EOT
          # token the vocabulary's last id (as CLIP's 49407), the two agree.
          "eos_token_id": vocab - 1,
          "bos_token_id": vocab - 2,
          "pad_token_id": 1,
      },
      "vision_config": {
          "model_type": "clip_vision_model",
          "hidden_size": int(c.image.hidden_size),
          "intermediate_size": int(c.image.transformer.mlp_dim),
          "num_hidden_layers": int(c.image.transformer.num_layers),
          "num_attention_heads": int(c.image.transformer.num_heads),
          "image_size": rows * ph,
          "patch_size": ph,
          "num_channels": int(flat["img/embedding/kernel"].shape[2]),
          "hidden_act": _hf_act(c.image),
          "layer_norm_eps": float(c.image.layernorm_epsilon),
          "attention_dropout": 0.0,
          "projection_dim": embed_dim,
      },
  }


def export_hf_clip(params: Mapping, model_config, out_dir: str) -> str:
  """Writes an HF `CLIPModel` directory (`config.json` + `model.safetensors`) that
  `transformers.CLIPModel.from_pretrained(out_dir)` loads; no torch needed to write it."""
  torch_formats.write_hf_dir(hf_clip_state_dict(params, model_config),
                            hf_clip_config(params, model_config), out_dir)
  return out_dir


def to_npz_dict(params: Mapping, model_config) -> Dict[str, np.ndarray]:
  """Our CLIP params -> {'/'-joined name: array} + each tower's activation and epsilon."""
  arrays = {k: np.asarray(v) for k, v in common.flatten(params).items()}
  for section, prefix in ((model_config.image, "img/"), (model_config.text, "txt/")):
    arrays.update(npz.metadata_arrays(npz.activation_name(section),
                                      float(section.layernorm_epsilon), prefix))
  return arrays


def export_npz(params: Mapping, model_config, path: str) -> Dict[str, Tuple[int, ...]]:
  """Writes our CLIP `.npz` (read back by `read` / `load_model`). Returns {name: shape}."""
  arrays = to_npz_dict(params, model_config)
  npz.write_npz(arrays, path)
  return {k: tuple(v.shape) for k, v in arrays.items()}
