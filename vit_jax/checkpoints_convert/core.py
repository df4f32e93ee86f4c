"""Read any supported checkpoint, and fit it to a model's params tree (or raise).

`read` detects the format and translates names/layouts to upstream's; `fit` makes the result
match a target tree exactly: class-token row, position-embedding grid, head and pre_logits, dtype.
`load_model` does both for ViT and CLIP files alike and also builds the flax module.
"""
import os
import zipfile
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from vit_jax.checkpoints_convert import common
from vit_jax.checkpoints_convert import npz
from vit_jax.checkpoints_convert import openai_clip
from vit_jax.checkpoints_convert import orbax as orbax_ckpt
from vit_jax.checkpoints_convert import posemb
from vit_jax.checkpoints_convert import torch as torch_formats

ImageSize = Union[int, Sequence[int]]
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _split_subtree(path: str) -> Tuple[str, Optional[str]]:
  """big_vision's 'file.npz:img' -> ('file.npz', 'img'), when the part before ':' exists."""
  if not os.path.exists(path) and ":" in path:
    file, sub = path.rsplit(":", 1)
    if os.path.exists(file):
      return file, sub
  return path, None


def _kind(path: str) -> str:
  """npz | safetensors | pickle, from the extension, else from the first bytes."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    return "npz"
  if ext == ".safetensors":
    return "safetensors"
  if ext in (".bin", ".pth", ".pt", ".ckpt", ".pkl"):
    return "pickle"
  with open(path, "rb") as f:
    head = f.read(9)
  if head[:4] == b"PK\x03\x04":  # a zip: npz holds .npy members, torch.save holds data.pkl
    with zipfile.ZipFile(path) as z:
      return "npz" if all(n.endswith(".npy") for n in z.namelist()) else "pickle"
  if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
    return "safetensors"
  return "pickle"


def _read_torch_file(path: str) -> Dict[str, np.ndarray]:
  """{name: array} from a `.safetensors`, a TorchScript archive or a `torch.save` pickle."""
  if _kind(path) == "safetensors":
    return torch_formats.read_safetensors(path)
  if openai_clip.is_torchscript(path):
    # OpenAI's CLIP `.pt`: torch.load(weights_only=True) refuses TorchScript archives and
    # torch.jit.load would run the archive's code; this reader runs nothing from the file.
    return openai_clip.read_openai_torchscript(path)
  return torch_formats.read_pickle(path)


class State(NamedTuple):
  """A checkpoint file's raw contents, before any translation."""
  path: str  # the file or directory (without big_vision's ':subtree')
  subtree: Optional[str]  # big_vision's 'file.npz:img' part
  arrays: Dict[str, np.ndarray]  # the file's own names
  hf_config: Optional[dict]  # config.json beside (or in) it, if any


def read_state(path: str) -> State:
  """Reads a checkpoint's arrays (and config.json) under the file's own names: an `.npz`, a
  vit_jax workdir or orbax checkpoint (its params, whatever mesh wrote them), an HF directory (model.safetensors or pytorch_model.bin, sharded or not), one torch/safetensors file
  or a TorchScript archive (OpenAI's CLIP `.pt`). Pickles are read refusing code execution (see
  torch.read_pickle and openai_clip.read_openai_torchscript)."""
  path, subtree = _split_subtree(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint not found: {path}")
  if orbax_ckpt.is_orbax(path):  # a vit_jax workdir / checkpoint: our own tree, as an .npz
    hf_config, arrays = None, orbax_ckpt.read_params(path)
  elif os.path.isdir(path):
    hf_config = torch_formats.read_hf_config(path)
    arrays = _read_hf_dir(path)
  else:
    hf_config = torch_formats.read_hf_config(os.path.dirname(os.path.abspath(path)))
    arrays = npz.read_arrays(path) if _kind(path) == "npz" else _read_torch_file(path)
  return State(path, subtree, arrays, hf_config)


def read(path: str, *, num_heads: Optional[int] = None) -> common.Checkpoint:
  """Reads and translates a ViT checkpoint; the format is detected from the file and its keys.

  Args:
    path: an upstream/AugReg/big_vision `.npz` (big_vision's `file.npz:img` picks a sub-model),
      an HF directory (config.json + model.safetensors or pytorch_model.bin, sharded or not),
      or a single `.safetensors`/`.bin`/`.pth` file (HF or timm state dict).
    num_heads: attention heads, for files that do not record them (timm, a bare HF file).
  """
  return translate(read_state(path), num_heads=num_heads)


def translate(state: State, *, num_heads: Optional[int] = None) -> common.Checkpoint:
  """`read` for a file already read with `read_state`."""
  from vit_jax.checkpoints_convert import clip  # pylint: disable=g-import-not-at-top
  path, subtree, arrays, hf_config = state
  keys = list(arrays)
  # Before the ViT formats: open_clip's timm image tower (visual.trunk.*) has timm's key names.
  if clip.is_clip(keys):
    raise common.CheckpointError(
        f"{path}: a CLIP checkpoint ({clip.describe_format(keys, path)}), not a ViT: load it "
        "with checkpoints_convert.load_model(path) (or checkpoints_convert.clip.read).")
  from vit_jax.checkpoints_convert import owl_vit  # pylint: disable=g-import-not-at-top
  if owl_vit.is_owl_vit(keys):
    raise common.CheckpointError(
        f"{path}: an OWL-ViT detector ({owl_vit.HF_FORMAT}), not a ViT: load it with "
        "checkpoints_convert.load_model(path).")
  if npz.is_npz_tree(keys):
    ckpt = npz.translate(arrays, subtree=subtree, path=path)
  elif torch_formats.is_hf(keys):
    ckpt = torch_formats.translate_hf(arrays, hf_config, num_heads=num_heads, path=path)
  elif torch_formats.is_timm(keys):
    ckpt = torch_formats.translate_timm(arrays, num_heads=num_heads, path=path)
  else:
    raise common.CheckpointError(
        f"{path}: not a recognised ViT checkpoint (upstream/big_vision .npz, HF transformers ViT "
        f"or timm vit_*). First keys: {sorted(keys)[:8]}")
  _log(f"{ckpt.format}: {note}" for note in ckpt.notes)
  return ckpt


def _read_hf_dir(directory: str) -> Dict[str, np.ndarray]:
  for name in _HF_FILES:
    index = os.path.join(directory, name + ".index.json")
    if os.path.exists(index):  # sharded: {"weight_map": {param: shard file}}
      import json  # pylint: disable=g-import-not-at-top
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      arrays = {}
      for shard in shards:
        arrays.update(_read_torch_file(os.path.join(directory, shard)))
      return arrays
    if os.path.exists(os.path.join(directory, name)):
      return _read_torch_file(os.path.join(directory, name))
  raise common.CheckpointError(
      f"{directory}: a directory, but none of {_HF_FILES} (or their .index.json) is in it.")


def fit(ckpt: common.Checkpoint, target: Mapping[str, object], *, grid: Tuple[int, int],
        resize_method: str, init: Optional[Mapping[str, np.ndarray]] = None,
        head_bias_init: float = 0.0) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """Makes the checkpoint's flat params match `target` ({name: array or ShapeDtypeStruct}).

  Args:
    ckpt: from `read`.
    target: the model's flat params (or their shapes), defining names, shapes and dtypes.
    grid: (rows, cols) of the model's patch grid, for resampling position embeddings.
    resize_method: see posemb.METHODS.
    init: the model's initial values, used for a head (or pre_logits) the checkpoint cannot fill;
      without it a new head is zeros (+ head_bias_init), as the model initialises it.
  Returns:
    ({name: np.ndarray in the target's dtype}, notes on what was done). Raises
    CheckpointMismatchError listing every missing/unexpected key and shape mismatch.
  """
  src = dict(ckpt.params)
  notes: List[str] = []
  shape = lambda k: tuple(target[k].shape)

  if "cls" in src and "cls" not in target:
    src.pop("cls")
    if common.POSEMB in src:
      src[common.POSEMB] = src[common.POSEMB][:, 1:]
    notes.append("dropped the class token and its position-embedding row (the model's "
                 "classifier has no class token)")

  if common.POSEMB in target:
    prefix = int("cls" in target)
    width = shape(common.POSEMB)[-1]
    if common.POSEMB not in src and ckpt.posemb_kind == "sincos2d":
      pe = posemb.sincos_2d(*grid, width)
      src[common.POSEMB] = np.concatenate([np.zeros((1, prefix, width), pe.dtype), pe], axis=1)
      notes.append(f"position embeddings: big_vision's fixed sincos2d computed for grid {grid}, "
                   "now a learned parameter initialised to it")
    elif common.POSEMB in src and prefix == int("cls" in src):
      old = ckpt.grid
      tokens = src[common.POSEMB].shape[1] - prefix
      if not old or old[0] * old[1] != tokens:
        old = posemb.grid_from_tokens(tokens)
      if tuple(old) != tuple(grid):
        src[common.POSEMB] = posemb.resample_posemb(
            src[common.POSEMB], num_prefix=prefix, old_grid=old, new_grid=grid,
            method=resize_method)
        notes.append(f"resized position embeddings from grid {old[0]}x{old[1]} to "
                     f"{grid[0]}x{grid[1]} ({resize_method})")

  def fresh(name: str, what: str, why: str):
    for leaf in ("kernel", "bias"):
      k = f"{name}/{leaf}"
      if init is not None:
        src[k] = np.asarray(init[k])
      else:
        src[k] = np.full(shape(k), head_bias_init if leaf == "bias" else 0.0, np.float32)
    notes.append(f"{what} re-initialised{' to zeros' if name == 'head' else ''} ({why})")

  def same(name: str) -> bool:
    return all(f"{name}/{l}" in src and tuple(src[f"{name}/{l}"].shape) == shape(f"{name}/{l}")
               for l in ("kernel", "bias"))

  for name, what in (("pre_logits", "pre_logits layer"), ("head", "head")):
    if f"{name}/kernel" in target:
      if same(name):
        notes.append(f"kept the checkpoint's {what} {src[f'{name}/kernel'].shape}")
      elif name == "pre_logits" and init is None:
        pass  # no init to fall back to: reported below as missing or mismatched
      else:
        found = src.get(f"{name}/kernel")
        why = ("checkpoint has none" if found is None else
               f"checkpoint {tuple(found.shape)} vs model {shape(f'{name}/kernel')}")
        fresh(name, what, why)
    elif f"{name}/kernel" in src:
      src.pop(f"{name}/kernel")
      src.pop(f"{name}/bias", None)
      notes.append(f"dropped the checkpoint's {what} (the model has none"
                   + (": representation_size is None)" if name == "pre_logits" else ")"))

  return match_target(src, target, fmt=ckpt.format, path=ckpt.path, hints=ckpt.hints), notes


def match_target(src: Mapping[str, np.ndarray], target: Mapping[str, object], *, fmt: str,
                 path: str, hints: Mapping[str, str] = ()) -> Dict[str, np.ndarray]:
  """{name: array} with exactly `target`'s names and shapes, in its dtypes, or raise
  CheckpointMismatchError listing every missing/unexpected name and shape mismatch."""
  shape = lambda k: tuple(target[k].shape)
  missing = sorted(k for k in target if k not in src)
  unexpected = sorted(k for k in src if k not in target)
  mismatched = sorted((k, shape(k), tuple(np.shape(src[k]))) for k in target
                      if k in src and tuple(np.shape(src[k])) != shape(k))
  if missing or unexpected or mismatched:
    raise common.CheckpointMismatchError(
        fmt=fmt, path=path, missing=missing, unexpected=unexpected, mismatched=mismatched,
        hints=hints)
  return {k: np.asarray(src[k]).astype(np.dtype(target[k].dtype)) for k in target}


def _activation_warnings(ckpt: common.Checkpoint, model_config) -> List[str]:
  """Warnings (not errors) where the model computes differently from the checkpoint's source."""
  notes = []
  if bool(model_config.get("approximate_gelu", True)) != ckpt.approximate_gelu:
    notes.append(
        f"WARNING: the checkpoint's model used {'tanh' if ckpt.approximate_gelu else 'erf'} gelu, "
        f"this model approximate_gelu={model_config.get('approximate_gelu', True)}: outputs "
        f"differ slightly (set model.approximate_gelu={ckpt.approximate_gelu} for parity)")
  eps = float(model_config.get("layernorm_epsilon", 1e-6))
  if not np.isclose(eps, ckpt.layernorm_epsilon, rtol=0, atol=1e-15):
    notes.append(f"WARNING: the checkpoint's LayerNorm epsilon is {ckpt.layernorm_epsilon:g}, "
                 f"this model's {eps:g} (set model.layernorm_epsilon for parity)")
  return notes


def _log(notes):
  for note in notes:
    logging.info("checkpoints_convert: %s", note)


def fit_to_model(ckpt: common.Checkpoint, model_config=None, *,
                 image_size: Optional[ImageSize] = None, num_classes: Optional[int] = -1,
                 resize_method: str = "bilinear", module_kwargs: Optional[Mapping] = None):
  """`load` for a checkpoint already `read`: returns (params, model_config, notes).

  module_kwargs: extra VisionTransformer arguments (dtype, param_dtype, remat).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top

  if model_config is None:
    model_config = ckpt.model_config()
    warnings = []
  else:
    warnings = _activation_warnings(ckpt, model_config)
  if num_classes == -1:
    num_classes = ckpt.num_classes
  h, w = vit._pair(image_size or ckpt.image_size())  # pylint: disable=protected-access
  model = vit.VisionTransformer(num_classes=num_classes, **models.model_kwargs(model_config),
                                **dict(module_kwargs or {}))
  stem = ckpt.params.get("embedding/kernel")  # [ph, pw, channels, width]: gray models have 1
  channels = int(stem.shape[2]) if stem is not None and stem.ndim == 4 else 3
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, h, w, channels))))
  target = common.flatten(shapes["params"])
  params, fit_notes = fit(ckpt, target, grid=vit.posemb_grid(model_config, (h, w)),
                          resize_method=resize_method,
                          head_bias_init=float(model_config.get("head_bias_init", 0.0)))
  _log(warnings + fit_notes)  # read() logged the checkpoint's own notes
  return common.unflatten(params), model_config, ckpt.notes + warnings + fit_notes


def load(path: str, model_config=None, *, image_size: Optional[ImageSize] = None,
         num_classes: Optional[int] = -1, resize_method: str = "bilinear"):
  """Loads any supported checkpoint as params of `VisionTransformer(num_classes, **model_config)`.

  Args:
    path: see `read`.
    model_config: the model config (configs/models.py); None infers it from the checkpoint.
    image_size: int or (height, width) the model will run at; default: the checkpoint's own.
      Position embeddings are resampled to the model's grid when it differs.
    num_classes: head size; -1 (default) keeps the checkpoint's head (None: no head). A
      different size gets a zero-initialised head.
    resize_method: posemb.METHODS.
  Returns:
    A nested dict of numpy arrays matching the model's params tree exactly. Raises
    CheckpointMismatchError (a ValueError) naming the format and every mismatch.
  """
  heads = model_config.transformer.num_heads if model_config is not None else None
  return fit_to_model(read(path, num_heads=heads), model_config, image_size=image_size,
                      num_classes=num_classes, resize_method=resize_method)[0]


def override_config(model_config, overrides: Mapping[str, object]):
  """A copy of `model_config` with `overrides` applied: top-level keys, or a mapping merged
  into a section (`text={"dropout_rate": 0.1}`). Unknown keys raise (a typo must not pass)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(model_config.to_dict())
  for key, value in overrides.items():
    if key not in c:
      raise TypeError(f"Unknown model config key {key!r}: expected one of {sorted(c.keys())}.")
    if isinstance(c[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
      for sub, v in value.items():
        if sub not in c[key]:
          raise TypeError(f"Unknown model config key {key}.{sub}: expected one of "
                          f"{sorted(c[key].keys())}.")
        c[key][sub] = v
    else:
      c[key] = value
  return c


def load_model(path: str, *, model_config=None, image_size: Optional[ImageSize] = None,
               context_length: Optional[int] = None, num_classes: Optional[int] = -1,
               resize_method: str = "bilinear", text_resize_method: str = "truncate",
               num_heads: Optional[int] = None, vision_heads: Optional[int] = None,
               text_heads: Optional[int] = None, hidden_act: Optional[str] = None,
               dtype="float32", param_dtype="float32", remat: bool = False, **overrides):
  """Builds the flax module a checkpoint holds, ViT, CLIP or OWL-ViT (told from its keys), and
  its params.

    model, params = load_model("openai-clip-vit-base-patch32/")   # HF CLIPModel directory
    model, params = load_model("ViT-B-32.pt")                     # OpenAI's TorchScript file
    model, params = load_model("open_clip_pytorch_model.bin", hidden_act="gelu")  # LAION
    model, params = load_model("owlvit-base-patch32/")     # HF OWL-ViT / OWLv2 detector
    model, params = load_model("checkpoint_140000")        # scenic OWL-ViT (flax msgpack)
    out = model.apply({"params": params}, images, tokens)

  Args:
    path: any file `read` takes, an HF `CLIPModel` directory or file, a CLIP `.npz` written by
      this package, an OpenAI CLIP `.pt` (TorchScript; read without running any of it) or an
      open_clip state dict (`.pt`/`.bin` training checkpoint or `.safetensors`); an HF
      `OwlViTForObjectDetection` / `Owlv2ForObjectDetection` directory or file, or a scenic
      OWL-ViT msgpack checkpoint (-> models.owl_vit.OwlViT).
    model_config: the model config to build; None: inferred from the checkpoint.
    image_size: int or (height, width) to run at; position embeddings are resampled to it with
      `resize_method` (posemb.METHODS). Default: the checkpoint's own.
    context_length: CLIP and OWL-ViT: text tokens per sequence; a shorter one keeps the first
      position embeddings (`text_resize_method="truncate"`, as OWL-ViT does with 16) or
      resamples them (a posemb.METHODS name, e.g. "bilinear").
    num_classes: ViT only: as `load` (-1 keeps the checkpoint's head).
    num_heads: ViT only: attention heads, for files that do not record them.
    vision_heads, text_heads: CLIP only: attention heads, for files that do not record them
      (OpenAI / open_clip, an HF file without config.json); default: 64-wide heads.
    hidden_act: OpenAI / open_clip only (the weights do not tell): the MLP activation, one of
      clip.HIDDEN_ACTS. Default "quick_gelu" (OpenAI's models, open_clip's `*-quickgelu`);
      open_clip's LAION models, named without -quickgelu, need "gelu". A note is logged.
    dtype, param_dtype, remat: module arguments.
    **overrides: model-config keys to change (`layernorm_epsilon=1e-6`, or for a section
      `text={"dropout_rate": 0.1}`).
  Returns:
    (flax module, nested dict of numpy arrays matching its params tree exactly). Raises
    CheckpointMismatchError (a ValueError) naming the format and every mismatch.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints_convert import clip  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints_convert import owl_vit  # pylint: disable=g-import-not-at-top
  module_kwargs = dict(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), remat=remat)
  owl_kwargs = dict(model_config=model_config, image_size=image_size,
                    context_length=context_length, resize_method=resize_method,
                    text_resize_method=text_resize_method, module_kwargs=module_kwargs,
                    overrides=overrides)
  vit_only = [n for n, v in (("num_classes", num_classes != -1), ("num_heads", num_heads),
                             ("vision_heads", vision_heads), ("text_heads", text_heads),
                             ("hidden_act", hidden_act)) if v]
  if owl_vit.is_scenic_msgpack(_split_subtree(os.fspath(path))[0]):
    if vit_only:
      raise TypeError(f"{path} is an OWL-ViT checkpoint: {', '.join(vit_only)} do not apply.")
    return owl_vit.load(os.fspath(path), **owl_kwargs)
  state = read_state(path)
  if owl_vit.is_owl_vit(list(state.arrays)):
    if vit_only:
      raise TypeError(f"{state.path} is an OWL-ViT checkpoint: {', '.join(vit_only)} do not "
                      "apply (heads and activation come from config.json).")
    return owl_vit.load(state.path, state=state, **owl_kwargs)
  if clip.is_clip(list(state.arrays)):
    if num_classes != -1 or num_heads is not None:
      raise TypeError(f"{state.path} is a CLIP checkpoint: num_classes and num_heads are ViT "
                      "options (the heads come from config.json or the kernels' shapes).")
    return clip.load_state(
        state, model_config=model_config, image_size=image_size, context_length=context_length,
        resize_method=resize_method, text_resize_method=text_resize_method,
        module_kwargs=module_kwargs, overrides=overrides, vision_heads=vision_heads,
        text_heads=text_heads, hidden_act=hidden_act)
  given = [name for name, value in (("context_length", context_length),
                                    ("vision_heads", vision_heads), ("text_heads", text_heads),
                                    ("hidden_act", hidden_act)) if value is not None]
  if given:
    raise TypeError(f"{state.path} is a ViT checkpoint: {', '.join(given)} "
                    f"{'is a CLIP option' if len(given) == 1 else 'are CLIP options'}.")
  if num_heads is None and model_config is not None:
    num_heads = model_config.transformer.num_heads
  ckpt = translate(state, num_heads=num_heads)
  if overrides:
    model_config = override_config(
        model_config if model_config is not None else ckpt.model_config(), overrides)
  params, model_config, _ = fit_to_model(
      ckpt, model_config, image_size=image_size, num_classes=num_classes,
      resize_method=resize_method, module_kwargs=module_kwargs)
  num_classes = params["head"]["kernel"].shape[-1] if "head" in params else None
  model = vit.VisionTransformer(num_classes=num_classes, **models.model_kwargs(model_config),
                                **module_kwargs)
  return model, params


def pretrained_path(config) -> str:
  """`config.pretrained_path`, else upstream's `{pretrained_dir}/{model_name}.npz`."""
  if config.get("pretrained_path"):
    return config.pretrained_path
  name = config.get("model_name") or config.model.get("name")
  if not config.get("pretrained_dir") or not name:
    raise ValueError("Set config.pretrained_path, or config.pretrained_dir and "
                     "config.model_name (upstream's {pretrained_dir}/{model_name}.npz).")
  path = os.path.join(config.pretrained_dir, f"{name}.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} (config.pretrained_dir/config.model_name.npz) does not exist. Upstream and "
        "AugReg files are at https://storage.googleapis.com/vit_models/{imagenet21k,"
        f"imagenet21k+imagenet2012,augreg}}/{name}.npz (download them; nothing is fetched here).")
  return path


def load_for_finetune(config, params: Mapping, *, image_size: Optional[ImageSize] = None):
  """Fine-tuning init: the pretrained checkpoint fitted to the freshly initialised `params`.

  Reads `config.pretrained_path` (or `{config.pretrained_dir}/{config.model_name}.npz`, as
  upstream), translates it, resamples position embeddings to the model's grid with
  `config.posemb_resize_method`, keeps the head when its shape matches and otherwise takes the
  (zero) head from `params`, drops pre_logits when `config.model.representation_size` is None
  (upstream's "drop-head variant"), and logs each of those steps.

  Args:
    config: the training config (`model`, `pretrained_*`, `posemb_resize_method`).
    params: the model's initial params (`model.init(...)['params']`).
    image_size: (height, width) the model runs at; needed only for a non-square patch grid
      (otherwise it is read off the position embedding's shape).
  Returns:
    A tree with exactly `params`' structure, shapes and dtypes, holding numpy arrays.
  """
  path = pretrained_path(config)
  model_config = config.model
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  ckpt = read(path, num_heads=model_config.transformer.num_heads)
  target = common.flatten(params)
  if image_size is not None:
    grid = vit.posemb_grid(model_config, image_size)
  else:  # square: the only grid the position embedding's length alone tells
    grid = posemb.grid_from_tokens(target[common.POSEMB].shape[1] - int("cls" in target))
  out, fit_notes = fit(ckpt, target, grid=grid,
                       resize_method=config.get("posemb_resize_method", "bilinear"),
                       init=target)
  logging.info("checkpoints_convert: loaded %s (%s), %d params", path, ckpt.format,
               common.num_params(out))
  _log(_activation_warnings(ckpt, model_config) + fit_notes)
  return common.unflatten(out)
