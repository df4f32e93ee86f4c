"""OpenAI CLIP `.pt` (TorchScript) files and open_clip checkpoints -> HF `CLIPModel`.

Always run (main venv, CI): a random small HF CLIPModel's weights are written in OpenAI's layout
(HF's own convert_clip_original_pytorch_to_hf.py read backwards, written out here, not the code
under test) as torch.save / safetensors files and as a real TorchScript archive; converting them
back must give the HF model's outputs, both as an HF CLIPModel and, through
`checkpoints_convert.load_model` (and the CLI), as our JAX CLIP. A TorchScript archive with a
code-running global is refused.

The open_clip tests need `import open_clip`, which needs torchvision, which does not import beside
the main venv's CPU torch 2.13; they skip there, saying so. Run them in the torch 2.14.1 +
torchvision venv (open-clip-torch 3.3.0, transformers 5.23.0, safetensors, pytest, absl-py,
ml-collections, and jax 0.10.2 + flax 0.12.8 for our CLIP, added to it):

  .venv-timm/bin/python -m pytest -p no:cacheprovider -s \
      tests/checkpoints_convert/test_openai_clip.py
"""
import collections
import io
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import types
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

# pylint: disable=g-import-not-at-top,g-bad-import-order
from torch import nn
from vit_jax import checkpoints_convert
from vit_jax.checkpoints_convert import __main__ as cli
from vit_jax.checkpoints_convert import clip as clip_formats
from vit_jax.checkpoints_convert import common
from vit_jax.checkpoints_convert import openai_clip
from vit_jax.checkpoints_convert import torch as torch_formats
# pylint: enable=g-import-not-at-top,g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, CONTEXT, IMAGE, PATCH, EMBED = 100, 12, 32, 8, 16
# OpenAI's rule holds: heads = width // 64 (vision 2 heads, so the q/k/v split is per head).
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              image_size=IMAGE, patch_size=PATCH)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            vocab_size=VOCAB, max_position_embeddings=CONTEXT, bos_token_id=VOCAB - 2,
            eos_token_id=VOCAB - 1)


def _hf_clip(seed=0, fp16_values=False):
  """A random HF CLIPModel (quick_gelu, eps 1e-5). Every parameter is perturbed: HF initialises
  biases to 0 and LayerNorm scales to 1, which would hide swapped or transposed weights."""
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(TEXT, hidden_act="quick_gelu", layer_norm_eps=1e-5),
      vision_config=dict(VISION, hidden_act="quick_gelu", layer_norm_eps=1e-5),
      projection_dim=EMBED)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
      if fp16_values:  # what OpenAI released: values a float16 file holds exactly
        p.copy_(p.half().float())
  return model


def _openai_state_dict(hf):
  """The HF model's weights under OpenAI's names and layouts: HF's converter read backwards
  (`copy_attn_layer`: q/k/v = `in_proj_weight.chunk(3)`; projections = `proj.T`; `pre_layrnorm`
  = `ln_pre`; class/position embeddings as they are)."""
  s = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  out = {}

  def tower(hf_prefix, oa_prefix, layers):
    for i in range(layers):
      h, o = f"{hf_prefix}.encoder.layers.{i}.", f"{oa_prefix}transformer.resblocks.{i}."
      for p in ("weight", "bias"):
        out[o + f"attn.in_proj_{p}"] = torch.cat(
            [s[h + f"self_attn.{x}_proj.{p}"] for x in ("q", "k", "v")])
        for hf_name, oa_name in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                                 ("layer_norm2", "ln_2")):
          out[o + f"{oa_name}.{p}"] = s[h + f"{hf_name}.{p}"]

  v, t = "vision_model.", "text_model."
  out["visual.conv1.weight"] = s[v + "embeddings.patch_embedding.weight"]
  out["visual.class_embedding"] = s[v + "embeddings.class_embedding"]
  out["visual.positional_embedding"] = s[v + "embeddings.position_embedding.weight"]
  for p in ("weight", "bias"):
    out[f"visual.ln_pre.{p}"] = s[v + f"pre_layrnorm.{p}"]
    out[f"visual.ln_post.{p}"] = s[v + f"post_layernorm.{p}"]
    out[f"ln_final.{p}"] = s[t + f"final_layer_norm.{p}"]
  tower("vision_model", "visual.", VISION["num_hidden_layers"])
  out["visual.proj"] = s["visual_projection.weight"].T.contiguous()
  out["token_embedding.weight"] = s[t + "embeddings.token_embedding.weight"]
  out["positional_embedding"] = s[t + "embeddings.position_embedding.weight"]
  tower("text_model", "", TEXT["num_hidden_layers"])
  out["text_projection"] = s["text_projection.weight"].T.contiguous()
  out["logit_scale"] = s["logit_scale"]
  return out


def _inputs(batch_images=2, batch_texts=3, seed=0):
  """Images, and token ids as CLIP's tokenizer lays them out: SOT, words, EOT (the largest id,
  where both OpenAI's argmax and HF's first-eos pooling look), then zeros."""
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(batch_images, 3, IMAGE, IMAGE)).astype(np.float32)
  ids = np.zeros((batch_texts, CONTEXT), np.int64)
  for row, length in zip(ids, rng.integers(3, CONTEXT + 1, size=batch_texts)):
    row[0], row[length - 1] = VOCAB - 2, VOCAB - 1
    row[1:length - 1] = rng.integers(1, VOCAB - 2, size=length - 2)
  return torch.from_numpy(pixels), torch.from_numpy(ids)


def _hf_outputs(model, pixels, ids):
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels)
  return {k: getattr(out, k).numpy() for k in ("logits_per_image", "image_embeds", "text_embeds")}


def _converted_outputs(hf_sd, facts, pixels, ids):
  """Outputs of `CLIPModel(CLIPConfig(**facts))` holding the converted weights (strict load)."""
  model = transformers.CLIPModel(transformers.CLIPConfig(**facts)).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in hf_sd.items()}, strict=True)
  return _hf_outputs(model, pixels, ids)


def _our_outputs(path, pixels, ids, **kwargs):
  """`checkpoints_convert.load_model(path, **kwargs)` -> our JAX CLIP's outputs for the torch
  inputs (NCHW -> NHWC images, int32 tokens)."""
  jax = pytest.importorskip("jax", reason="jax not installed (our CLIP is a flax module)")
  model, params = checkpoints_convert.load_model(path, **kwargs)
  x = np.ascontiguousarray(pixels.numpy().transpose(0, 2, 3, 1))
  out = jax.jit(lambda p: model.apply({"params": p}, x, ids.numpy().astype(np.int32)))(params)
  return {k: np.asarray(out[k]) for k in ("logits_per_image", "image_embeds", "text_embeds")}


def _diffs(a, b):
  """{output: max |a - b|}, shapes checked."""
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
  return {k: float(np.abs(a[k] - b[k]).max()) for k in a}


def _max_diff(a, b):
  return max(_diffs(a, b).values())


def _report(name, diffs):
  print(f"parity {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= 1e-5, (name, diffs)


# ----------------------------------------------------------------------------------------------
# OpenAI-layout state dicts and TorchScript archives, against the HF model they came from.


@pytest.mark.parametrize("file", ["pt", "pt_wrapped", "safetensors", "custom_text_safetensors"])
def test_state_dict_files_match_hf(tmp_path, file):
  hf = _hf_clip()
  sd = _openai_state_dict(hf)
  if file == "pt":
    path = tmp_path / "clip.pt"
    torch.save(sd, path)
  elif file == "pt_wrapped":  # an open_clip training checkpoint: DDP's 'module.', optimizer state
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}}, path)
  else:
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    if file == "custom_text_safetensors":  # open_clip CustomTextCLIP: the text tower under text.
      sd = {(k if k.startswith(("visual.", "logit_scale")) else "text." + k): v
            for k, v in sd.items()}
    path = tmp_path / "clip.safetensors"
    save_file(sd, str(path))
  raw = openai_clip.read_openai_clip(str(path))
  assert openai_clip.is_openai_clip(raw)
  hf_sd, facts = openai_clip.openai_to_hf_clip(raw, path=str(path))
  assert facts["vision_config"]["num_attention_heads"] == 2
  assert facts["vision_config"]["image_size"] == IMAGE and facts["projection_dim"] == EMBED
  assert facts["text_config"]["max_position_embeddings"] == CONTEXT
  pixels, ids = _inputs()
  diff = _max_diff(_converted_outputs(hf_sd, facts, pixels, ids), _hf_outputs(hf, pixels, ids))
  print(f"parity OpenAI-layout {file} -> HF CLIPModel: max |d| {diff:.2e}")
  assert diff <= 1e-5


class _Block(nn.Module):
  """OpenAI's ResidualAttentionBlock names (clip/model.py); `attn_mask` a plain attribute."""

  def __init__(self, width, mlp, heads, attn_mask=None):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(collections.OrderedDict(
        [("c_fc", nn.Linear(width, mlp)), ("c_proj", nn.Linear(mlp, width))]))
    self.ln_2 = nn.LayerNorm(width)
    self.attn_mask = attn_mask

  def forward(self, x):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):

  def __init__(self, width, mlp, heads, layers, attn_mask=None):
    super().__init__()
    self.resblocks = nn.Sequential(*[_Block(width, mlp, heads, attn_mask) for _ in range(layers)])

  def forward(self, x):
    return self.resblocks(x)


class _Visual(nn.Module):

  def __init__(self, width, mlp, heads, layers):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, PATCH, PATCH, bias=False)
    # Stored at an offset into a larger storage, and `proj` transposed (strides (1, width)):
    # the reader must follow storage offsets and strides, not assume contiguous storages.
    self.class_embedding = nn.Parameter(torch.zeros(width + 3)[3:])
    self.positional_embedding = nn.Parameter(torch.zeros((IMAGE // PATCH) ** 2 + 1, width))
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = _Transformer(width, mlp, heads, layers)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.zeros(EMBED, width).T)

  def forward(self, x):
    x = self.conv1(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    x = self.ln_pre(x + self.positional_embedding).transpose(0, 1)
    return self.ln_post(self.transformer(x)[0]) @ self.proj


class _OpenAIClip(nn.Module):
  """A scriptable module with OpenAI's CLIP parameter and buffer names, to make a real archive."""

  def __init__(self):
    super().__init__()
    v, t = VISION, TEXT
    self.visual = _Visual(v["hidden_size"], v["intermediate_size"], v["num_attention_heads"],
                          v["num_hidden_layers"])
    mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    self.transformer = _Transformer(t["hidden_size"], t["intermediate_size"],
                                    t["num_attention_heads"], t["num_hidden_layers"], mask)
    self.token_embedding = nn.Embedding(VOCAB, t["hidden_size"])
    self.positional_embedding = nn.Parameter(torch.zeros(CONTEXT, t["hidden_size"]))
    self.ln_final = nn.LayerNorm(t["hidden_size"])
    self.text_projection = nn.Parameter(torch.zeros(t["hidden_size"], EMBED))
    self.logit_scale = nn.Parameter(torch.zeros(()))
    # OpenAI's JIT files carry these as buffers (clip.build_model deletes them).
    self.register_buffer("input_resolution", torch.tensor(IMAGE))
    self.register_buffer("context_length", torch.tensor(CONTEXT))
    self.register_buffer("vocab_size", torch.tensor(VOCAB))

  def forward(self, image, text):
    x = self.token_embedding(text) + self.positional_embedding
    x = self.ln_final(self.transformer(x.transpose(0, 1)).transpose(0, 1))
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
    return self.logit_scale.exp() * self.visual(image) @ x.T


def _torchscript_archive(path, sd, dtype=torch.float16):
  """`sd` saved as OpenAI saved theirs: a scripted module, float16 weights."""
  module = _OpenAIClip().to(dtype)
  for k in ("input_resolution", "context_length", "vocab_size"):
    sd = {**sd, k: getattr(module, k)}
  module.load_state_dict(sd, strict=True)  # copies into the strided/offset params above
  torch.jit.save(torch.jit.script(module), str(path))
  return path


def _forbidden(*args, **kwargs):
  raise AssertionError("the reader called torch.jit.load / torch.load on a TorchScript archive")


def test_torchscript_archive_matches_hf_and_runs_nothing(tmp_path, monkeypatch):
  hf = _hf_clip(fp16_values=True)
  path = _torchscript_archive(tmp_path / "ViT-T-8.pt", _openai_state_dict(hf))
  assert openai_clip.is_torchscript(str(path))

  with monkeypatch.context() as m:
    m.setattr(torch.jit, "load", _forbidden)
    m.setattr(torch, "load", _forbidden)
    raw = openai_clip.read_openai_clip(str(path))

  # The reader gives what torch.jit.load's state_dict() gives (trusted fixture: loading it is ok).
  reference = torch.jit.load(str(path)).state_dict()
  assert sorted(raw) == sorted(reference)
  for k, v in reference.items():
    assert raw[k].dtype == v.numpy().dtype and np.array_equal(raw[k], v.numpy()), k
  assert raw["visual.proj"].dtype == np.float16

  hf_sd, facts = openai_clip.openai_to_hf_clip(raw, path=str(path))
  assert all(v.dtype == np.float32 for v in hf_sd.values())
  pixels, ids = _inputs()
  diff = _max_diff(_converted_outputs(hf_sd, facts, pixels, ids), _hf_outputs(hf, pixels, ids))
  print(f"parity OpenAI TorchScript (float16) -> HF CLIPModel: max |d| {diff:.2e}")
  assert diff <= 1e-5

  # Reading the archive needs no torch at all.
  code = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # any `import torch` now raises ImportError
      from vit_jax.checkpoints_convert import openai_clip
      sd = openai_clip.read_openai_torchscript({str(path)!r})
      print(len(sd), float(sum(abs(v.astype("float64")).sum() for v in sd.values())))
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  n, total = out.stdout.split()
  assert int(n) == len(raw)
  np.testing.assert_allclose(float(total), sum(np.abs(v.astype(np.float64)).sum()
                                               for v in raw.values()), rtol=1e-12)


class _System:
  """Unpickling this runs `touch marker` through os.system: the file appearing means code ran."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_torchscript_with_unsafe_global_is_refused_and_nothing_runs(tmp_path, monkeypatch):
  good = _torchscript_archive(tmp_path / "good.pt", _openai_state_dict(_hf_clip()))
  marker = tmp_path / "pwned"
  # data.pkl as TorchScript writes it (GLOBAL '__torch__ CLIP', NEWOBJ, BUILD {attributes}),
  # with a payload among the module's attributes.
  fake = types.ModuleType("__torch__")
  clip_cls = type("CLIP", (), {"__module__": "__torch__"})
  fake.CLIP = clip_cls
  monkeypatch.setitem(sys.modules, "__torch__", fake)
  obj = clip_cls()
  obj.__dict__.update(training=False, logit_scale=_System(marker))
  payload = pickle.dumps(obj, protocol=2)
  assert b"__torch__\nCLIP" in payload and b"system" in payload

  bad = tmp_path / "bad.pt"
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      dst.writestr(info, payload if info.filename.endswith("/data.pkl") else data)
  assert openai_clip.is_torchscript(str(bad))
  for read in (openai_clip.read_openai_torchscript, openai_clip.read_openai_clip):
    with pytest.raises(common.UnsafeCheckpointError, match=r"refused.*(posix|os)\.system"):
      read(str(bad))
    assert not marker.exists(), "the payload ran"

  # The payload is live: an unrestricted unpickler does run it.
  pickle.loads(payload)
  assert marker.exists()


class _Dtypes(nn.Module):
  """Storages of several dtypes, views with offsets and strides, an empty tensor."""

  def __init__(self):
    super().__init__()
    self.bf16 = nn.Parameter(torch.randn(3, 5).to(torch.bfloat16).T)
    self.f64 = nn.Parameter(torch.randn(2, dtype=torch.float64))
    self.register_buffer("i32", torch.arange(6, dtype=torch.int32).reshape(2, 3)[:, 1:])
    self.register_buffer("flags", torch.tensor([True, False]))
    self.register_buffer("empty", torch.zeros(0, 4))

  def forward(self, x):
    return x


def test_torchscript_dtypes_and_views(tmp_path):
  path = tmp_path / "dtypes.pt"
  torch.jit.save(torch.jit.script(_Dtypes()), str(path))
  raw = openai_clip.read_openai_torchscript(str(path))
  reference = torch.jit.load(str(path)).state_dict()
  assert sorted(raw) == sorted(reference)
  for k, v in reference.items():
    expected = (v.float() if v.dtype == torch.bfloat16 else v).numpy()  # bf16 -> f32, exactly
    assert raw[k].dtype == expected.dtype and raw[k].shape == expected.shape, k
    np.testing.assert_array_equal(raw[k], expected, err_msg=k)


class _StorageRef:
  """Pickled as TorchScript's persistent storage id (see `_craft_archive`)."""


class _TensorView:
  """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, offset, size, stride):
    self.args = (_StorageRef(), offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2, self.args)  # pylint: disable=protected-access


def _craft_archive(path, attributes, monkeypatch, numel=4):
  """A TorchScript-shaped zip whose data.pkl is a `__torch__.M` with `attributes` and one float32
  storage of `numel` elements, written by hand to reach states torch.jit.save never writes."""

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if isinstance(obj, _StorageRef):
        return ("storage", torch.FloatStorage, "0", "cpu", numel)
      return None

  fake = types.ModuleType("__torch__")
  fake.M = type("M", (), {"__module__": "__torch__"})
  monkeypatch.setitem(sys.modules, "__torch__", fake)
  obj = fake.M()
  obj.__dict__.update(attributes)
  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("m/data.pkl", buf.getvalue())
    z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
    z.writestr("m/data/0", np.arange(numel, dtype="<f4").tobytes())
  return path


def test_crafted_views_are_bounds_checked(tmp_path, monkeypatch):
  ok = _craft_archive(tmp_path / "ok.pt", {"w": _TensorView(1, (2, 2), (1, 2))}, monkeypatch,
                      numel=6)
  np.testing.assert_array_equal(openai_clip.read_openai_torchscript(str(ok))["w"],
                                torch.arange(6.).as_strided((2, 2), (1, 2), 1).numpy())
  for name, view in (("past the end", _TensorView(0, (10,), (1,))),
                     ("negative stride", _TensorView(3, (2,), (-1,))),
                     ("negative offset", _TensorView(-1, (2,), (1,)))):
    bad = _craft_archive(tmp_path / "bad.pt", {"w": view}, monkeypatch)
    with pytest.raises(common.CheckpointError, match="outside its storage"):
      openai_clip.read_openai_torchscript(str(bad))
    print(f"refused a view {name}")


# ----------------------------------------------------------------------------------------------
# Detection, refusals, options (no files).


def _numpy_sd():
  return {k: v.numpy() for k, v in _openai_state_dict(_hf_clip()).items()}


def test_detection():
  sd = _numpy_sd()
  assert openai_clip.is_openai_clip(sd)
  assert openai_clip.is_openai_clip(["state_dict.module." + k for k in sd])
  assert openai_clip.is_openai_clip(["text." + k if not k.startswith("visual.") else k
                                     for k in sd])
  assert not openai_clip.is_openai_clip(_hf_clip().state_dict())  # HF CLIP itself
  assert not openai_clip.is_openai_clip(["patch_embed.proj.weight", "cls_token", "pos_embed"])
  assert not openai_clip.is_openai_clip(["visual.conv1.weight"])  # no text side or logit scale


@pytest.mark.parametrize("extra,match", [
    ({"visual.layer1.0.conv1.weight": np.zeros((4, 4, 1, 1)),
      "visual.attnpool.q_proj.weight": np.zeros((4, 4))}, "ResNet CLIP"),
    ({"logit_bias": np.zeros(())}, "logit bias"),
    ({"visual.transformer.resblocks.0.ls_1.gamma": np.zeros(128)}, "layer scale"),
    ({"visual.trunk.patch_embed.proj.weight": np.zeros((4, 3, 8, 8))}, "timm image tower"),
    ({"visual.transformer.resblocks.0.attn.extra": np.zeros(3)}, "no HF CLIPModel counterpart"),
])
def test_unsupported_variants_are_refused(extra, match):
  with pytest.raises(common.UnsupportedCheckpointError, match=match):
    openai_clip.openai_to_hf_clip({**_numpy_sd(), **extra}, path="x.pt")


def test_missing_keys_and_heads():
  sd = _numpy_sd()
  no_ln_pre = {k: v for k, v in sd.items() if "ln_pre" not in k}  # open_clip no_ln_pre=True
  with pytest.raises(common.CheckpointError, match="no_ln_pre"):
    openai_clip.openai_to_hf_clip(no_ln_pre)
  _, facts = openai_clip.openai_to_hf_clip(sd, vision_heads=4, text_heads=2, hidden_act="gelu",
                                           dtype=None)
  assert facts["vision_config"]["num_attention_heads"] == 4
  assert facts["text_config"]["num_attention_heads"] == 2
  assert facts["text_config"]["hidden_act"] == facts["vision_config"]["hidden_act"] == "gelu"
  assert facts["text_config"]["eos_token_id"] == VOCAB - 1
  assert transformers.CLIPConfig(**facts).vision_config.num_attention_heads == 4
  narrow = dict(sd, **{"visual.conv1.weight": sd["visual.conv1.weight"][:96]})  # 96: not 64k
  with pytest.raises(common.CheckpointError, match="pass vision_heads"):
    openai_clip.openai_to_hf_clip(narrow)


# ----------------------------------------------------------------------------------------------
# The same files through checkpoints_convert.load_model (our JAX CLIP) and the CLI.


@pytest.mark.parametrize("file", ["torchscript", "pt"])
def test_load_model_matches_hf(tmp_path, monkeypatch, caplog, file):
  """OpenAI's TorchScript `.pt` (float16, as released) and a torch.save state dict (float32) ->
  `load_model` -> our CLIP's outputs = the HF model's; the assumed activation is warned of."""
  hf = _hf_clip(fp16_values=file == "torchscript")
  sd = _openai_state_dict(hf)
  if file == "torchscript":
    path = _torchscript_archive(tmp_path / "ViT-T-8.pt", sd)
  else:
    path = tmp_path / "state_dict.pt"
    torch.save(sd, path)
  ckpt = clip_formats.read(str(path))
  assert ckpt.format == {"torchscript": clip_formats.OPENAI_FORMAT,
                         "pt": clip_formats.OPEN_CLIP_FORMAT}[file]
  assert any("assumed quick_gelu" in n and "hidden_act='gelu'" in n for n in ckpt.notes)
  assert any("assumed 64-wide" in n and "vision 2, text 1" in n for n in ckpt.notes)
  c = ckpt.model_config
  assert (c.image.transformer.num_heads, c.text.num_heads, c.image.mlp_activation,
          c.text.mlp_activation, c.image.layernorm_epsilon, c.image_size, c.text.context_length,
          c.embed_dim) == (2, 1, "quick_gelu", "quick_gelu", 1e-5, IMAGE, CONTEXT, EMBED)
  pixels, ids = _inputs()
  with monkeypatch.context() as m:
    if file == "torchscript":  # nothing from the archive may run: neither loader is called
      m.setattr(torch.jit, "load", _forbidden)
      m.setattr(torch, "load", _forbidden)
    with caplog.at_level(logging.WARNING):
      ours = _our_outputs(path, pixels, ids)
  assert any(r.levelno == logging.WARNING and "assumed quick_gelu" in r.getMessage()
             for r in caplog.records), caplog.text
  _report(f"{ckpt.format} -> load_model -> our CLIP vs HF CLIPModel", _diffs(
      ours, _hf_outputs(hf, pixels, ids)))


def test_load_model_options(tmp_path):
  """hidden_act and the heads reach the model; misuse names the option and the file."""
  hf = _hf_clip()
  path = tmp_path / "clip.pt"
  torch.save(_openai_state_dict(hf), path)
  ckpt = clip_formats.read(str(path), vision_heads=4, text_heads=2, hidden_act="gelu")
  c = ckpt.model_config
  assert (c.image.transformer.num_heads, c.text.num_heads) == (4, 2)
  assert c.image.mlp_activation == c.text.mlp_activation == "gelu"
  assert not c.image.approximate_gelu and not c.text.approximate_gelu
  assert not any("assumed" in n for n in ckpt.notes)  # nothing was assumed

  model, params = checkpoints_convert.load_model(path, vision_heads=4, hidden_act="gelu")
  assert model.image["mlp_activation"] == model.text["mlp_activation"] == "gelu"
  assert model.image["transformer"]["num_heads"] == 4 and model.text["num_heads"] == 1
  attn = params["img"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
  assert attn["query"]["kernel"].shape == (VISION["hidden_size"], 4, VISION["hidden_size"] // 4)
  pixels, ids = _inputs()
  # A wrong activation loads, and computes something else: why the default is logged.
  gelu = _our_outputs(path, pixels, ids, hidden_act="gelu")
  assert _max_diff(gelu, _hf_outputs(hf, pixels, ids)) > 1e-3

  with pytest.raises(ValueError, match=r"hidden_act='relu': expected one of .*quick_gelu"):
    checkpoints_convert.load_model(path, hidden_act="relu")
  with pytest.raises(TypeError, match="num_classes and num_heads are ViT options"):
    checkpoints_convert.load_model(path, num_heads=2)
  hf.save_pretrained(tmp_path / "hf")  # records its activation in config.json
  with pytest.raises(TypeError, match=r"HF transformers CLIP checkpoint.*hidden_act is for "
                                      "OpenAI / open_clip"):
    checkpoints_convert.load_model(tmp_path / "hf", hidden_act="gelu")


def test_clip_files_are_not_taken_for_vits(tmp_path):
  """`read` (the ViT reader) points to load_model; open_clip's timm image tower, whose
  `visual.trunk.patch_embed.proj.weight` timm's detection would take, is refused as a CLIP."""
  hf = _hf_clip(fp16_values=True)
  sd = _openai_state_dict(hf)
  path = _torchscript_archive(tmp_path / "ViT-T-8.pt", sd)
  assert clip_formats.is_clip(openai_clip.read_openai_torchscript(str(path)))
  with pytest.raises(common.CheckpointError, match=r"a CLIP checkpoint \(OpenAI CLIP "
                                                   r"\(TorchScript\)\), not a ViT.*load_model"):
    checkpoints_convert.read(path)

  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  trunk = {k: v.numpy() for k, v in sd.items() if not k.startswith("visual.")}
  trunk.update({"visual.trunk.patch_embed.proj.weight": np.zeros((128, 3, PATCH, PATCH), "f4"),
                "visual.trunk.cls_token": np.zeros((1, 1, 128), "f4"),
                "visual.trunk.pos_embed": np.zeros((1, 17, 128), "f4"),
                "visual.head.proj.weight": np.zeros((EMBED, 128), "f4")})
  save_file(trunk, str(tmp_path / "timm_tower.safetensors"))
  assert torch_formats.is_timm(trunk)  # what the order of detection guards against
  with pytest.raises(common.CheckpointError, match=r"a CLIP checkpoint \(open_clip state dict"):
    checkpoints_convert.read(tmp_path / "timm_tower.safetensors")
  with pytest.raises(common.UnsupportedCheckpointError, match="timm image tower"):
    checkpoints_convert.load_model(tmp_path / "timm_tower.safetensors")


def test_cli_torchscript_to_hf_directory(tmp_path, capsys, monkeypatch):
  """`python -m vit_jax.checkpoints_convert ViT-T-8.pt out/` -> an HF directory that
  CLIPModel.from_pretrained loads, with the original's outputs."""
  hf = _hf_clip(fp16_values=True)
  path = _torchscript_archive(tmp_path / "ViT-T-8.pt", _openai_state_dict(hf))
  with monkeypatch.context() as m:
    m.setattr(torch.jit, "load", _forbidden)
    m.setattr(torch, "load", _forbidden)
    assert cli.main([str(path), str(tmp_path / "hf")]) == 0
  out = capsys.readouterr().out
  assert f"detected: {clip_formats.OPENAI_FORMAT} ({path})" in out
  assert "assumed quick_gelu" in out and "--hidden-act gelu" in out
  n = sum(p.numel() for p in hf.parameters())
  assert f"parameters: {n:,}" in out
  again = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
  pixels, ids = _inputs()
  with capsys.disabled():
    _report("CLI OpenAI TorchScript -> HF dir -> CLIPModel.from_pretrained vs the original",
            _diffs(_hf_outputs(again, pixels, ids), _hf_outputs(hf, pixels, ids)))

  argv = [str(path), str(tmp_path / "gelu"), "--hidden-act", "gelu", "--vision-heads", "4",
          "--text-heads", "2"]
  assert cli.main(argv) == 0
  assert "assumed" not in capsys.readouterr().out
  config = transformers.CLIPConfig.from_pretrained(tmp_path / "gelu")
  assert config.vision_config.hidden_act == config.text_config.hidden_act == "gelu"
  assert (config.vision_config.num_attention_heads, config.text_config.num_attention_heads) == (
      4, 2)
  # A file that records its activation refuses the flag.
  assert cli.main([str(tmp_path / "hf"), str(tmp_path / "x.npz"), "--hidden-act", "gelu"]) == 1
  assert "--hidden-act is for OpenAI / open_clip files" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# open_clip's own models (where open_clip imports: see the module docstring).


def _open_clip():
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  # torchvision op registration errors too
    pytest.skip(f"open_clip does not import here ({type(e).__name__}: {e}). It needs torchvision, "
                "which does not import beside the main venv's CPU torch 2.13; run this in the "
                "torch 2.14.1 + torchvision venv (see this file's docstring)")
  return open_clip


@pytest.mark.parametrize("kind", ["clip_quickgelu", "custom_text_quickgelu", "clip_gelu"])
@pytest.mark.parametrize("file", ["pt_wrapped", "safetensors", "torchscript"])
def test_open_clip_matches(tmp_path, kind, file):
  open_clip = _open_clip()
  from open_clip import model as oc_model  # pylint: disable=g-import-not-at-top
  vision_cfg = dict(layers=VISION["num_hidden_layers"], width=VISION["hidden_size"],
                    head_width=64, mlp_ratio=2.0, patch_size=PATCH, image_size=IMAGE)
  text_cfg = dict(context_length=CONTEXT, vocab_size=VOCAB, width=TEXT["hidden_size"],
                  heads=TEXT["num_attention_heads"], layers=TEXT["num_hidden_layers"],
                  mlp_ratio=2.0)
  torch.manual_seed(1)
  quick_gelu = kind.endswith("quickgelu")
  if kind.startswith("custom_text"):  # the text tower under `text.`, logit scale of shape [1]
    model = oc_model.CustomTextCLIP(EMBED, vision_cfg, text_cfg, quick_gelu=quick_gelu,
                                    nonscalar_logit_scale=True)
  else:
    model = oc_model.CLIP(EMBED, vision_cfg, text_cfg, quick_gelu=quick_gelu)
  model.eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  sd = model.state_dict()
  if file == "pt_wrapped":  # open_clip's training checkpoint layout (DDP)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
  elif file == "safetensors":
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  else:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))

  raw = openai_clip.read_openai_clip(str(path))
  assert openai_clip.is_openai_clip(raw)
  hf_sd, facts = openai_clip.openai_to_hf_clip(
      raw, hidden_act="quick_gelu" if quick_gelu else "gelu", path=str(path))
  pixels, ids = _inputs()
  with torch.no_grad():
    ref = {"logits_per_image": model.get_logits(pixels, ids)[0].numpy(),
           "image_embeds": model.encode_image(pixels, normalize=True).numpy(),
           "text_embeds": model.encode_text(ids, normalize=True).numpy()}
  diff = _max_diff(_converted_outputs(hf_sd, facts, pixels, ids), ref)
  print(f"parity open_clip {open_clip.__version__} {kind} {file} -> HF CLIPModel: "
        f"max |d| {diff:.2e}")
  assert diff <= 1e-5
  # The same file through checkpoints_convert.load_model, to our JAX CLIP.
  hidden_act = None if quick_gelu else "gelu"  # None: the default, quick_gelu
  _report(f"open_clip {kind} {file} -> load_model -> our CLIP vs open_clip",
          _diffs(_our_outputs(path, pixels, ids, hidden_act=hidden_act), ref))
