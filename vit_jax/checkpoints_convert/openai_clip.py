"""OpenAI CLIP `.pt` (TorchScript) files and open_clip state dicts -> HF `CLIPModel` keys.

Reading: OpenAI's released `ViT-B-32.pt` etc. are TorchScript archives; `torch.jit.load` would
run the archive's code, so `read_openai_torchscript` never calls it (nor torch at all): it
unpickles `data.pkl` with an allow-list of tensor-rebuild globals, turns every `__torch__.*`
module class into an inert record of its attributes, and builds numpy arrays from the raw
storages in the zip. open_clip's `.pt`/`.bin` state dicts go through `torch.read_pickle`
(weights-only) and `.safetensors` through `torch.read_safetensors`; core.read_state reads all
three the same way, so `checkpoints_convert.load_model` takes these files as they are.

Translating: `openai_to_hf_clip` maps the OpenAI layout (which open_clip's ViT `CLIP` keeps, and
its `CustomTextCLIP` keeps under `text.`) to HF `CLIPModel` state-dict names plus the
`CLIPConfig(**facts)` kwargs that build the matching HF model.
"""
import collections
import io
import math
import os
import pickle
import re
import zipfile
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from vit_jax.checkpoints_convert import common

# ----------------------------------------------------------------------------------------------
# TorchScript archives, read without running anything from them.

# torch's legacy typed-storage names (what TorchScript's pickler writes) -> little-endian dtype.
# bfloat16 has no numpy dtype: it is read as uint16 and widened to float32 (exact).
_STORAGES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}


class _StorageType:
  """Stands for `torch.FloatStorage` etc. in a persistent id; only names a dtype."""

  def __init__(self, name: str):
    self.name = name


class _Storage:
  """A storage the pickle points at: `<archive>/data/<key>`, `numel` elements of `kind`."""

  def __init__(self, kind: _StorageType, key: str, numel: int):
    self.kind, self.key, self.numel = kind, key, numel


class _TensorRef:
  """A tensor as the pickle describes it: a strided view of a storage, materialised later."""
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __setstate__(self, state):
    raise common.UnsafeCheckpointError("refused: the pickle sets state on a tensor (BUILD), "
                                       "which no TorchScript archive does")


class _ScriptObject:
  """Inert stand-in for a `__torch__.*` class (a scripted module): keeps the pickled state."""
  qualname = "__torch__"
  args, state = (), None  # NEWOBJ skips __init__

  def __init__(self, *args):
    self.args, self.state = args, None

  def __setstate__(self, state):
    self.state = state


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _ints(value, what: str) -> Tuple[int, ...]:
  if not isinstance(value, tuple) or not all(_is_int(v) for v in value):
    raise common.CheckpointError(f"{what}: expected a tuple of ints, found {value!r}")
  return value


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2)'s arguments -> a `_TensorRef` (v2 adds requires_grad,
  backward hooks and metadata, which carry no weights)."""
  if not isinstance(storage, _Storage) or not _is_int(storage_offset):
    raise common.CheckpointError(
        f"tensor rebuild: expected (storage, int offset, ...), found ({type(storage).__name__}, "
        f"{storage_offset!r}, ...)")
  size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
  if len(size) != len(stride):
    raise common.CheckpointError(f"tensor size {size} and stride {stride} differ in length")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  if not isinstance(data, _TensorRef):
    raise common.CheckpointError(f"parameter rebuild: expected a tensor, found {type(data)}")
  return data


# The only globals a TorchScript `data.pkl` of weights needs; each maps to our own inert code.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Typed containers in module attributes (List[int], Dict[str, Tensor], ...).
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}
_STORAGE_TYPES = {("torch", n): _StorageType(n) for n in _STORAGES}


class _RestrictedUnpickler(pickle.Unpickler):
  """Every global goes through `find_class` (GLOBAL, STACK_GLOBAL, INST and the copyreg
  extension codes alike), so refusing there refuses before anything from the file is called."""

  def __init__(self, data: bytes, path: str):
    super().__init__(io.BytesIO(data))
    self.path = path
    self.classes: Dict[str, type] = {}

  def find_class(self, module, name):
    key = (module, name)
    if key in _ALLOWED:
      return _ALLOWED[key]
    if key in _STORAGE_TYPES:
      return _STORAGE_TYPES[key]
    if ((module == "__torch__" or module.startswith("__torch__.")) and
        name.isidentifier() and all(p.isidentifier() for p in module.split("."))):
      qualname = f"{module}.{name}"
      if qualname not in self.classes:  # a fresh class each name: nothing torch's, nothing shared
        self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
      return self.classes[qualname]
    raise common.UnsafeCheckpointError(
        f"{self.path}: refused. Its TorchScript data.pkl references the global "
        f"{module}.{name}, which is not one of the tensor-rebuild functions, storage types or "
        "__torch__ module classes a weights archive holds; nothing from the file was run.")

  def persistent_load(self, pid):
    # TorchScript writes ('storage', torch.<T>Storage, key, location, numel).
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage" or
        not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str) or
        not _is_int(pid[4]) or pid[4] < 0):
      raise common.CheckpointError(
          f"{self.path}: unexpected persistent id in data.pkl: {pid!r}; expected ('storage', "
          "torch.<T>Storage, key, location, numel).")
    return _Storage(pid[1], pid[2], pid[4])


def _archive_prefix(names: Iterable[str]) -> Optional[str]:
  """'name/' when the zip is a TorchScript archive (`name/data.pkl` + `name/constants.pkl`)."""
  names = set(names)
  for n in names:
    m = re.fullmatch(r"([^/]+/)constants\.pkl", n)
    if m and m.group(1) + "data.pkl" in names:
      return m.group(1)
  return None


def is_torchscript(path: str) -> bool:
  """Whether `path` is a TorchScript archive (what `torch.jit.save` writes and OpenAI released).

  torch.save's zips have `data.pkl` too but no `constants.pkl` (torch itself tells them apart so).
  """
  if not os.path.isfile(path) or not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return _archive_prefix(z.namelist()) is not None


def _declared_state(z: zipfile.ZipFile, prefix: str) -> Dict[str, set]:
  """{'__torch__.a.B': parameter and buffer names} from the archive's `code/` (read as text).

  A module's pickled attributes also hold plain tensors that are not in its `state_dict()`
  (OpenAI's `attn_mask`); each class's `__parameters__`/`__buffers__` lines say which are.
  """
  declared: Dict[str, set] = {}
  for name in z.namelist():
    if not (name.startswith(prefix + "code/__torch__") and name.endswith(".py")):
      continue
    module = name[len(prefix + "code/"):-len(".py")].replace("/", ".")
    cls = None
    for line in z.read(name).decode("utf-8", "replace").splitlines():
      m = re.match(r"class (\w+)\(Module\):", line)
      if m:
        cls = f"{module}.{m.group(1)}"
        declared[cls] = set()
        continue
      m = re.match(r"\s+__(?:parameters|buffers)__ = \[(.*)\]", line)
      if m and cls:
        declared[cls].update(re.findall(r'"([^"]*)"', m.group(1)))
  return declared


def _materialise(ref: _TensorRef, z: zipfile.ZipFile, prefix: str, big_endian: bool,
                 cache: Dict[str, np.ndarray], path: str, name: str) -> np.ndarray:
  """The strided view a `_TensorRef` describes, copied out of its storage (bounds checked)."""
  s = ref.storage
  dtype = np.dtype(("<", ">")[big_endian] + _STORAGES[s.kind.name])
  if s.key not in cache:
    member = f"{prefix}data/{s.key}"
    try:
      raw = z.read(member)
    except KeyError as e:
      raise common.CheckpointError(f"{path}: {name}: storage {member} is not in the archive") from e
    if len(raw) < s.numel * dtype.itemsize:
      raise common.CheckpointError(
          f"{path}: {name}: storage {member} has {len(raw)} bytes, expected "
          f"{s.numel} x {dtype.itemsize}")
    cache[s.key] = np.frombuffer(raw, dtype, count=s.numel)
  flat = cache[s.key]
  if any(n == 0 for n in ref.size):
    values = np.zeros(ref.size, dtype)
  else:
    last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride))
    if ref.offset < 0 or any(n < 0 or st < 0 for n, st in zip(ref.size, ref.stride)) or (
        last >= s.numel):
      raise common.CheckpointError(
          f"{path}: {name}: size {ref.size}, stride {ref.stride}, offset {ref.offset} reach "
          f"outside its storage of {s.numel} elements")
    values = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], shape=ref.size, strides=[st * dtype.itemsize for st in ref.stride],
        writeable=False)
  if s.kind.name == "BFloat16Storage":  # the top half of a float32
    return (values.astype(np.uint32) << 16).view(np.float32)
  return np.array(values, dtype.newbyteorder("="))


def read_openai_torchscript(path: str) -> Dict[str, np.ndarray]:
  """{state_dict name: array} from a TorchScript archive, running nothing from it (no torch).

  Names are the module's `state_dict()` names (`visual.conv1.weight`,
  `transformer.resblocks.0.attn.in_proj_weight`, ...), and for OpenAI's files include the
  `input_resolution`/`context_length`/`vocab_size` buffers. Arrays keep the stored dtype
  (OpenAI's releases are float16: cast, or let `openai_to_hf_clip` cast, to float32), except
  bfloat16, which is widened to float32. A global outside the allow-list raises
  UnsafeCheckpointError naming it.
  """
  with zipfile.ZipFile(path) as z:
    prefix = _archive_prefix(z.namelist())
    if prefix is None:
      raise common.CheckpointError(
          f"{path}: not a TorchScript archive (no <name>/data.pkl + <name>/constants.pkl).")
    big_endian = (prefix + "byteorder" in z.namelist() and
                  z.read(prefix + "byteorder").strip() == b"big")
    unpickler = _RestrictedUnpickler(z.read(prefix + "data.pkl"), path)
    try:
      root = unpickler.load()
    except common.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # malformed pickles raise anything
      raise common.CheckpointError(
          f"{path}: could not read {prefix}data.pkl ({type(e).__name__}: {e})") from e
    if not isinstance(root, _ScriptObject):
      raise common.CheckpointError(
          f"{path}: {prefix}data.pkl holds a {type(root).__name__}, expected a scripted module")
    declared = _declared_state(z, prefix)
    refs: Dict[str, _TensorRef] = {}

    def walk(obj: _ScriptObject, name: str, ancestors: tuple):
      if not isinstance(obj.state, Mapping):
        return  # a module with a custom __getstate__: nothing we can name
      keep = declared.get(obj.qualname)  # None: no code for the class, keep every tensor
      for attr, value in obj.state.items():
        full = f"{name}{attr}"
        if isinstance(value, _ScriptObject):
          if any(value is a for a in ancestors):
            raise common.CheckpointError(f"{path}: module {full} contains itself")
          walk(value, full + ".", ancestors + (value,))
        elif isinstance(value, _TensorRef) and (keep is None or attr in keep):
          refs[full] = value

    walk(root, "", (root,))
    cache: Dict[str, np.ndarray] = {}
    return {k: _materialise(r, z, prefix, big_endian, cache, path, k) for k, r in refs.items()}


def read_openai_clip(path: str) -> Dict[str, np.ndarray]:
  """{name: array} from an OpenAI CLIP `.pt` (TorchScript) or an open_clip checkpoint.

  The file reader every format shares (core.read_state's): TorchScript archives ->
  `read_openai_torchscript`; `.safetensors` -> `torch.read_safetensors`; other pickles
  (`torch.save` of a state dict, maybe wrapped) -> `torch.read_pickle` (weights-only). Names come
  back as stored; `unwrap` strips `state_dict.`/`module.`.
  """
  from vit_jax.checkpoints_convert import core  # pylint: disable=g-import-not-at-top  # imports us
  return core._read_torch_file(os.fspath(path))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# OpenAI / open_clip layout -> HF CLIPModel.

# Wrappers around a model's state dict: training checkpoints ('state_dict.'), DDP ('module.'),
# torch.compile ('_orig_mod.'), and generic 'model.'.
_WRAPPER = re.compile(r"^(?:(?:state_dict|module|model|_orig_mod)\.)*")
_TEXT_MARKERS = ("logit_scale", "token_embedding.weight", "text.token_embedding.weight")
# Buffers that carry no weights: OpenAI's JIT metadata and the causal mask.
_DROPPED = ("input_resolution", "context_length", "vocab_size")

_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: HF's real key
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
           ("transformer.resblocks.", "text_model.encoder.layers."))

# Key fragments of CLIP variants HF's CLIPModel cannot express, and why.
_UNSUPPORTED = {
    "visual.attnpool.": "ResNet CLIP (RN50, RN101, RN50x4, ...): its modified-ResNet image tower "
                        "with attention pooling is not implemented; only ViT CLIP converts",
    "visual.layer1.": "ResNet CLIP (RN50, RN101, RN50x4, ...): only ViT CLIP converts",
    "visual.trunk.": "open_clip's timm image tower (visual.trunk): convert it as a timm model",
    "text.transformer.embeddings.": "open_clip's HF text tower (CustomTextCLIP with "
                                    "hf_model_name): only the CLIP text transformer converts",
    "text.transformer.encoder.": "open_clip's HF text tower (CustomTextCLIP with hf_model_name)",
    "logit_bias": "a learned logit bias (SigLIP-style sigmoid loss): HF CLIPModel has none",
    "text_projection.bias": "a text projection with bias (open_clip proj_bias / proj_type "
                            "'linear'): HF CLIPModel's projection has no bias",
    "text_projection.weight": "an nn.Linear text projection (open_clip proj_bias=True)",
    "attn_pool": "attentional pooling (open_clip attentional_pool / CoCa)",
    "ls_1.": "layer scale (open_clip ls_init_value)",
    "ls_2.": "layer scale (open_clip ls_init_value)",
    "ln_1_kv": "cross-attention blocks (CoCa)",
    "text_decoder": "CoCa's multimodal text decoder",
    "cls_emb": "a text class token (open_clip embed_cls, CoCa)",
    "ln_attn": "open_clip scale_attn (NormFormer) LayerNorms",
    "ln_inner": "open_clip scale_attn_inner LayerNorms",
    "head_scale": "open_clip scale_heads",
    "attn.logit_scale": "scaled cosine attention",
    "ln_q": "QK-norm",
    "ln_k": "QK-norm",
    "mlp.ln": "open_clip scale_fc LayerNorms",
}


def _wrapper_prefix(keys: Iterable[str]) -> Optional[str]:
  """The wrapper prefix ('', 'state_dict.module.', ...) in front of a CLIP's `visual.` keys."""
  for k in keys:
    prefix = _WRAPPER.match(k).group(0)
    if k[len(prefix):].startswith("visual."):
      return prefix
  return None


def is_openai_clip(keys) -> bool:
  """Whether the keys are an OpenAI-layout CLIP (OpenAI, open_clip `CLIP`/`CustomTextCLIP`),
  ResNet variants included (so that converting them can say why they are refused)."""
  keys = list(keys)
  prefix = _wrapper_prefix(keys)
  if prefix is None:
    return False
  keys = set(keys)
  return any(prefix + m in keys for m in _TEXT_MARKERS)


def unwrap(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The CLIP's own keys: wrappers stripped, other entries (optimizer state, epoch) left out,
  and open_clip CustomTextCLIP's `text.` tower moved to the OpenAI names."""
  prefix = _wrapper_prefix(sd) or ""
  out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  if "text.token_embedding.weight" in out:  # CustomTextCLIP with a CLIP TextTransformer
    out = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in out.items()}
  return out


def _heads(width: int, given: Optional[int], tower: str, path: str) -> int:
  """Attention heads: `given`, else OpenAI's rule (head width 64 in both towers, as in every
  OpenAI release and open_clip's default)."""
  if given:
    if width % given:
      raise common.CheckpointError(f"{path}: {tower} width {width} is not divisible by "
                                   f"{tower}_heads={given}")
    return given
  if width < 64 or width % 64:
    raise common.CheckpointError(
        f"{path}: {tower} width {width} is not a multiple of 64, so OpenAI's rule (heads = width "
        f"// 64) does not give the number of heads: pass {tower}_heads.")
  return width // 64


def _layers(sd: Mapping[str, np.ndarray], block: str) -> int:
  found = {int(m.group(1)) for k in sd for m in [re.match(re.escape(block) + r"(\d+)\.", k)] if m}
  return len(found) if found == set(range(len(found))) else -1


def openai_to_hf_clip(sd: Mapping[str, np.ndarray], *, vision_heads: Optional[int] = None,
                      text_heads: Optional[int] = None, hidden_act: str = "quick_gelu",
                      dtype=np.float32, path: str = "") -> Tuple[Dict[str, np.ndarray], dict]:
  """OpenAI-layout CLIP state dict -> (HF `CLIPModel` state dict, `CLIPConfig` kwargs).

  Args:
    sd: from `read_openai_clip` (or any reader): OpenAI / open_clip ViT CLIP keys, possibly under
      `state_dict.`/`module.` and with open_clip CustomTextCLIP's `text.` tower.
    vision_heads, text_heads: attention heads; default OpenAI's width // 64 (true of every
      OpenAI release and open_clip's default head width; not of e.g. ViT-bigG-14's image tower).
    hidden_act: what the MLPs computed. The file cannot tell: OpenAI's models (and open_clip's
      `*-quickgelu`) use "quick_gelu"; open_clip's plain configs (most LAION models) nn.GELU,
      i.e. "gelu".
    dtype: floating arrays are cast to it (OpenAI's releases are float16); None keeps them.
    path: for error messages.
  Returns:
    ({HF name: array}, facts): `CLIPModel(CLIPConfig(**facts)).load_state_dict(hf_sd,
    strict=True)` holds. Linear weights are [out, in]; `visual_projection.weight` /
    `text_projection.weight` are [embed_dim, width] (OpenAI's `proj` [width, embed_dim]
    transposed); `logit_scale` is a scalar. Raises UnsupportedCheckpointError for ResNet CLIP and
    open_clip features HF CLIP has no counterpart for, CheckpointError for missing keys.
  """
  src = unwrap(sd)
  path = path or "state dict"
  for fragment, why in _UNSUPPORTED.items():
    hits = sorted(k for k in src if fragment in k)
    if hits:
      more = f" and {len(hits) - 1} more" if hits[1:] else ""
      raise common.UnsupportedCheckpointError(f"{path}: {why} (found {hits[0]}{more}).")
  required = list(_TOP) + ["visual.proj", "text_projection", "logit_scale"]
  missing = [k for k in required if k not in src]
  if missing:
    extra = ("; open_clip no_ln_pre models cannot convert (HF always applies pre_layrnorm)"
             if "visual.ln_pre.weight" in missing and len(missing) <= 2 else "")
    raise common.CheckpointError(f"{path}: not a complete OpenAI-layout ViT CLIP: missing "
                                 f"{missing}{extra}. Found keys like {sorted(src)[:6]}.")

  def cast(v):
    v = np.asarray(v)
    return v.astype(dtype) if dtype is not None and np.issubdtype(v.dtype, np.floating) else v

  out: Dict[str, np.ndarray] = {}
  unknown: List[str] = []
  for key, value in src.items():
    if key in _DROPPED or key == "attn_mask" or key.endswith(".attn_mask"):
      continue
    if key in _TOP:
      out[_TOP[key]] = cast(value)
    elif key == "visual.proj":  # x @ proj, [width, embed] -> Linear [embed, width]
      out["visual_projection.weight"] = cast(value).T
    elif key == "text_projection":
      out["text_projection.weight"] = cast(value).T
    elif key == "logit_scale":  # open_clip's nonscalar_logit_scale stores shape [1]
      out["logit_scale"] = cast(value).reshape(())
    else:
      for theirs, ours in _TOWERS:
        m = re.fullmatch(re.escape(theirs) + r"(\d+)\.(.+)\.(weight|bias)", key)
        m_qkv = re.fullmatch(re.escape(theirs) + r"(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m_qkv:  # [3 * width(, width)] in q, k, v order (nn.MultiheadAttention; HF's converter)
          value = cast(value)
          if value.shape[0] % 3:
            raise common.CheckpointError(
                f"{path}: {key}: shape {value.shape}, expected 3 * width rows")
          for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            out[f"{ours}{m_qkv.group(1)}.self_attn.{name}.{m_qkv.group(2)}"] = part
          break
        if m and m.group(2) in _BLOCK:
          out[f"{ours}{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = cast(value)
          break
      else:
        unknown.append(key)
  if unknown:
    raise common.UnsupportedCheckpointError(
        f"{path}: keys with no HF CLIPModel counterpart: {sorted(unknown)[:10]}"
        f"{f' (and {len(unknown) - 10} more)' if len(unknown) > 10 else ''}.")

  conv = np.asarray(src["visual.conv1.weight"])  # [width, channels, patch, patch]
  vwidth, channels, ph, pw = (int(n) for n in conv.shape)
  if ph != pw:
    raise common.UnsupportedCheckpointError(
        f"{path}: visual.conv1.weight {conv.shape}: non-square patches; HF CLIP needs square")
  tokens = int(np.asarray(src["visual.positional_embedding"]).shape[0]) - 1
  grid = int(round(math.sqrt(tokens)))
  if grid * grid != tokens:
    raise common.UnsupportedCheckpointError(
        f"{path}: visual.positional_embedding has {tokens} + 1 rows, not a square grid + class "
        "token; HF CLIP's image size is square")
  tok = np.asarray(src["token_embedding.weight"])  # [vocab, width]
  vocab, twidth = (int(n) for n in tok.shape)
  embed_dim = int(np.asarray(src["visual.proj"]).shape[1])
  if np.asarray(src["text_projection"]).shape != (twidth, embed_dim):
    raise common.CheckpointError(
        f"{path}: text_projection {np.asarray(src['text_projection']).shape}, expected "
        f"(text width, embed dim) = {(twidth, embed_dim)} to match visual.proj")
  layers = {}
  for tower, block in (("vision", "visual.transformer.resblocks."),
                       ("text", "transformer.resblocks.")):
    layers[tower] = _layers(src, block)
    if layers[tower] < 1:
      raise common.CheckpointError(f"{path}: {block}<i> are not numbered 0..n-1 (or absent)")
  mlp = lambda block: int(np.asarray(src[block + "0.mlp.c_fc.weight"]).shape[0])
  common_cfg = dict(hidden_act=hidden_act, layer_norm_eps=1e-5, projection_dim=embed_dim)
  facts = {
      "projection_dim": embed_dim,
      "logit_scale_init_value": float(np.asarray(src["logit_scale"]).reshape(())),
      "vision_config": dict(
          hidden_size=vwidth, intermediate_size=mlp("visual.transformer.resblocks."),
          num_hidden_layers=layers["vision"],
          num_attention_heads=_heads(vwidth, vision_heads, "vision", path),
          num_channels=channels, image_size=grid * ph, patch_size=ph, **common_cfg),
      "text_config": dict(
          hidden_size=twidth, intermediate_size=mlp("transformer.resblocks."),
          num_hidden_layers=layers["text"],
          num_attention_heads=_heads(twidth, text_heads, "text", path),
          vocab_size=vocab, max_position_embeddings=int(np.asarray(
              src["positional_embedding"]).shape[0]),
          # OpenAI pools at argmax(token id), i.e. at the end-of-text token, the largest id; HF
          # pools at the first eos_token_id, so EOT must be the last id (49407 for CLIP's BPE).
          bos_token_id=vocab - 2, eos_token_id=vocab - 1, **common_cfg),
  }
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, facts
