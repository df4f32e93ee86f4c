"""HF transformers CLIPModel <-> our CLIP: parity (fp32, max |diff| <= 1e-5) of embeddings, logits
and features, export round trip, position-embedding resampling, file variants, the CLI; and the
ViT `.npz` activation/epsilon record (HF -> npz -> HF exact)."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

from tests.checkpoints_convert import helpers  # pylint: disable=g-import-not-at-top
from vit_jax import checkpoints_convert
from vit_jax.checkpoints_convert import __main__ as cli
from vit_jax.checkpoints_convert import clip as clip_formats
from vit_jax.checkpoints_convert import npz
from vit_jax.models import clip

TOL = 1e-5
VOCAB, CONTEXT = 99, 12
# Different widths and head sizes per tower, so that a tower mix-up cannot pass.
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CONTEXT, eos_token_id=VOCAB - 1,
            bos_token_id=VOCAB - 2, pad_token_id=1)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4)
OUTPUTS = ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text",
           "image_features", "text_features")


def hf_clip(seed=0, text=None, vision=None):
  """A random HF CLIPModel in eval mode, every parameter perturbed (HF initialises LayerNorms to
  1/0 and biases to 0, which would hide transposed or swapped weights)."""
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(text_config={**TEXT, **(text or {})},
                                   vision_config={**VISION, **(vision or {})}, projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  return model


def tokens(eots, length=CONTEXT, seed=0):
  """Token ids with the EOT (the largest id) at eots[i] in row i, text before it, padding after:
  zeros in even rows, the EOT repeated in odd rows (HF's tokenizer pads with it)."""
  rng = np.random.default_rng(seed)
  tok = np.zeros((len(eots), length), np.int32)
  for i, eot in enumerate(eots):
    tok[i, 0] = VOCAB - 2  # start of text
    tok[i, 1:eot] = rng.integers(2, VOCAB - 2, eot - 1)
    tok[i, eot:] = VOCAB - 1 if i % 2 else 0
    tok[i, eot] = VOCAB - 1
  return tok


def hf_outputs(model, x, tok, **kwargs):
  with torch.no_grad():
    pix = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(tok).long()
    out = model(input_ids=ids, pixel_values=pix, **kwargs)
    res = {k: getattr(out, k).numpy() for k in OUTPUTS[:4]}
    res["image_features"] = model.get_image_features(pixel_values=pix, **kwargs).pooler_output
    res["text_features"] = model.get_text_features(input_ids=ids).pooler_output
  return {k: np.asarray(v) for k, v in res.items()}


def our_outputs(model, params, x, tok):
  @jax.jit
  def run(p):  # one compile for the call and both encoders
    v = {"params": p}
    out = model.apply(v, x, tok)
    return {**{k: out[k] for k in OUTPUTS[:4]},
            "image_features": model.apply(v, x, method=clip.CLIP.encode_image),
            "text_features": model.apply(v, tok, method=clip.CLIP.encode_text)}
  return jax.tree.map(np.asarray, run(params))


def check(ours, ref, name, keys=OUTPUTS, tol=TOL):
  diffs = {k: helpers.max_diff(ours[k], ref[k]) for k in keys}
  print(f"parity {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= tol, (name, diffs)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """The reference HF model saved as safetensors, its inputs and outputs, and ours."""
  d = tmp_path_factory.mktemp("clip") / "hf"
  hf = hf_clip()
  hf.save_pretrained(d)
  x = helpers.images(16, 16)
  tok = tokens([3, 7, 11])
  model, params = checkpoints_convert.load_model(d)
  return dict(dir=d, hf=hf, x=x, tok=tok, hf_out=hf_outputs(hf, x, tok), model=model,
              params=params, ours=our_outputs(model, params, x, tok))


def test_parity_hf(ref):
  assert isinstance(ref["model"], clip.CLIP)
  c = clip_formats.read(ref["dir"]).model_config
  assert (c.image.hidden_size, c.image.transformer.num_heads, c.text.width, c.text.num_heads,
          c.embed_dim, c.image_size, c.text.context_length) == (48, 4, 32, 4, 24, 16, CONTEXT)
  assert c.image.mlp_activation == c.text.mlp_activation == "quick_gelu"
  check(ref["ours"], ref["hf_out"], "HF CLIPModel (safetensors)")


@pytest.mark.parametrize("file", ["bin", "sharded"])
def test_file_variants_give_the_same_params(ref, tmp_path, file):
  if file == "bin":  # an old-style torch pickle of the state dict, beside its config.json
    ref["hf"].config.save_pretrained(tmp_path)
    torch.save(ref["hf"].state_dict(), tmp_path / "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin"
  else:
    ref["hf"].save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    path = tmp_path
  _, params = checkpoints_convert.load_model(path)
  jax.tree.map(np.testing.assert_array_equal, params, ref["params"])


def test_export_hf_round_trip(ref, tmp_path):
  """Our params -> export_hf_clip -> transformers' from_pretrained -> the same outputs."""
  c = clip_formats.read(ref["dir"]).model_config
  checkpoints_convert.export_hf_clip(ref["params"], c, str(tmp_path))
  again = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  out = hf_outputs(again, ref["x"], ref["tok"])
  check(out, ref["ours"], "export_hf_clip -> CLIPModel.from_pretrained vs ours")
  check(out, ref["hf_out"], "export_hf_clip round trip vs the original", tol=1e-6)
  sd = checkpoints_convert.hf_clip_state_dict(ref["params"], c)
  original = {k: v.numpy() for k, v in ref["hf"].state_dict().items() if "position_ids" not in k}
  assert sorted(sd) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(sd[k], v, err_msg=k)


@pytest.mark.parametrize("image_size", [(16, 16), (24, 32)])
def test_image_size_matches_hf_interpolate_pos_encoding(ref, image_size):
  """Image position embeddings resampled at load (bicubic, class row kept) against HF's
  `interpolate_pos_encoding=True` (torch bicubic, align_corners=False, in the forward pass)."""
  model, params = checkpoints_convert.load_model(ref["dir"], image_size=image_size,
                                                 resize_method="bicubic")
  pe = params["img"]["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 1 + image_size[0] // 4 * image_size[1] // 4, 48)
  if image_size == (16, 16):  # the checkpoint's own size: untouched
    np.testing.assert_array_equal(pe, ref["params"]["img"]["Transformer"]["posembed_input"][
        "pos_embedding"])
    return
  x = helpers.images(*image_size)
  ours = np.asarray(jax.jit(lambda p: model.apply({"params": p}, x,
                                                  method=clip.CLIP.encode_image))(params))
  hf = hf_outputs(ref["hf"], x, ref["tok"], interpolate_pos_encoding=True)
  check({"image_features": ours}, hf, f"image 16 -> {image_size}", keys=("image_features",))


def test_shorter_context_truncates_like_hf(ref):
  """context_length 8 (OWL-ViT uses 16 of 77): the first 8 position embeddings, which is what
  HF uses for 8-token inputs."""
  model, params = checkpoints_convert.load_model(ref["dir"], context_length=8)
  assert params["txt"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 8, 32)
  tok = tokens([2, 5, 7], length=8)
  ours = np.asarray(jax.jit(lambda p: model.apply({"params": p}, tok,
                                                  method=clip.CLIP.encode_text))(params))
  with torch.no_grad():
    hf = ref["hf"].get_text_features(input_ids=torch.from_numpy(tok).long()).pooler_output
  check({"text_features": ours}, {"text_features": hf.numpy()}, "text context 12 -> 8",
        keys=("text_features",))

  # Linear resampling instead (corner-aligned, as the image grid's bilinear), to 8 and to 20.
  old = ref["params"]["txt"]["Transformer"]["posembed_input"]["pos_embedding"][0]
  for length in (8, 20):
    _, p = checkpoints_convert.load_model(ref["dir"], context_length=length,
                                          text_resize_method="bilinear")
    pos = np.linspace(0, CONTEXT - 1, length)
    expected = np.stack([np.interp(pos, np.arange(CONTEXT), old[:, j])
                         for j in range(old.shape[1])], axis=1)
    np.testing.assert_allclose(p["txt"]["Transformer"]["posembed_input"]["pos_embedding"][0],
                               expected, atol=1e-5)
  with pytest.raises(checkpoints_convert.CheckpointError, match="longer than the checkpoint's"):
    checkpoints_convert.load_model(ref["dir"], context_length=20)


def test_translate_bare_state_dict_uses_openai_head_rule():
  """Without config.json: heads = width // 64 (OpenAI), quick_gelu and eps 1e-5."""
  hf = hf_clip(text=dict(hidden_size=64, num_attention_heads=1),
               vision=dict(hidden_size=64, num_attention_heads=1, hidden_act="quick_gelu"))
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  bare_config, bare = checkpoints_convert.translate_hf_clip(sd, None)
  config, params = checkpoints_convert.translate_hf_clip(sd, hf.config.to_dict())
  assert bare_config.to_dict() == config.to_dict()
  assert bare_config.text.num_heads == bare_config.image.transformer.num_heads == 1
  jax.tree.map(np.testing.assert_array_equal, bare, params)
  narrow = {k: v.numpy() for k, v in hf_clip().state_dict().items()}
  with pytest.raises(checkpoints_convert.CheckpointError, match="pass vision_heads"):
    checkpoints_convert.translate_hf_clip(narrow, None)


def test_other_activations_and_epsilons(tmp_path):
  """hidden_act / layer_norm_eps per tower come from config.json and go back to it."""
  hf = hf_clip(seed=1, text=dict(hidden_act="gelu", layer_norm_eps=1e-6),
               vision=dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-12))
  hf.save_pretrained(tmp_path / "src")
  model, params = checkpoints_convert.load_model(tmp_path / "src")
  x, tok = helpers.images(16, 16), tokens([4, 9])
  check(our_outputs(model, params, x, tok), hf_outputs(hf, x, tok), "gelu erf/tanh, eps 1e-6/12")
  c = clip_formats.read(tmp_path / "src").model_config
  clip_formats.export_hf_clip(params, c, str(tmp_path / "out"))
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["text_config"]["hidden_act"] == "gelu"
  assert exported["text_config"]["layer_norm_eps"] == 1e-6
  assert exported["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
  assert exported["vision_config"]["layer_norm_eps"] == 1e-12


def test_cli_hf_to_npz_to_hf(ref, tmp_path, capsys):
  assert cli.main([str(ref["dir"]), str(tmp_path / "clip.npz")]) == 0
  out = capsys.readouterr().out
  assert f"detected: {clip_formats.HF_FORMAT}" in out and "embed_dim=24" in out
  n = sum(p.numel() for p in ref["hf"].parameters())
  assert f"parameters: {n:,}" in out
  with np.load(tmp_path / "clip.npz", allow_pickle=False) as f:
    assert "__vit_jax__/img/activation/quick_gelu" in f.files
    assert float(f["__vit_jax__/txt/layernorm_epsilon"]) == 1e-5
  _, params = checkpoints_convert.load_model(tmp_path / "clip.npz")
  jax.tree.map(np.testing.assert_array_equal, params, ref["params"])

  assert cli.main([str(tmp_path / "clip.npz"), str(tmp_path / "hf"), "--model", "b32"]) == 1
  assert "does not match the checkpoint" in capsys.readouterr().err
  assert cli.main([str(tmp_path / "clip.npz"), str(tmp_path / "hf"), "--context-length", "8"]) == 0
  assert "text position embeddings truncated from 12 to 8" in capsys.readouterr().out
  again = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
  tok = tokens([2, 5, 7], length=8)
  with torch.no_grad():
    a = again.get_text_features(input_ids=torch.from_numpy(tok).long()).pooler_output.numpy()
    b = ref["hf"].get_text_features(input_ids=torch.from_numpy(tok).long()).pooler_output.numpy()
  check({"text_features": a}, {"text_features": b}, "CLI HF -> npz -> HF (context 8)",
        keys=("text_features",), tol=1e-6)


def test_refusals(ref, tmp_path, capsys):
  with pytest.raises(checkpoints_convert.CheckpointError, match="a CLIP checkpoint.*load_model"):
    checkpoints_convert.read(ref["dir"])
  c = clip_formats.read(ref["dir"]).model_config
  c.logit_bias_init = -10.0
  params = dict(ref["params"], logit_bias=np.float32(-10.0))
  with pytest.raises(checkpoints_convert.UnsupportedCheckpointError, match="logit_bias"):
    checkpoints_convert.export_hf_clip(params, c, str(tmp_path))
  with pytest.raises(TypeError, match="Unknown model config key 'txt'"):
    checkpoints_convert.load_model(ref["dir"], txt={})
  # ViT files load through the same entry point, as a VisionTransformer.
  hf = helpers.hf_model()
  hf.save_pretrained(tmp_path / "vit")
  model, params = checkpoints_convert.load_model(tmp_path / "vit", image_size=24)
  assert type(model).__name__ == "VisionTransformer" and model.num_classes == 5
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
  # ... and refuse the CLIP-only options, naming them.
  with pytest.raises(TypeError, match="ViT checkpoint: vision_heads, hidden_act are CLIP options"):
    checkpoints_convert.load_model(tmp_path / "vit", hidden_act="gelu", vision_heads=2)
  assert cli.main([str(tmp_path / "vit"), str(tmp_path / "x.npz"), "--hidden-act", "gelu"]) == 1
  assert "--hidden-act: for CLIP checkpoints; this is a ViT" in capsys.readouterr().err


def test_vit_npz_records_activation_and_epsilon(tmp_path, capsys):
  """An HF ViT with exact gelu and eps 1e-12 -> .npz -> HF: the same logits (the file records
  both under __vit_jax__/; before, the round trip fell back to tanh gelu and 1e-6)."""
  hf = helpers.hf_model(hidden_act="gelu", layer_norm_eps=1e-12)
  hf.save_pretrained(tmp_path / "hf")
  assert cli.main([str(tmp_path / "hf"), str(tmp_path / "vit.npz")]) == 0
  assert "recorded __vit_jax__/activation/gelu_erf" in capsys.readouterr().out
  with np.load(tmp_path / "vit.npz", allow_pickle=False) as f:
    assert float(f["__vit_jax__/layernorm_epsilon"]) == 1e-12
    assert f["__vit_jax__/activation/gelu_erf"].dtype == np.float32
  ckpt = checkpoints_convert.read(tmp_path / "vit.npz")
  assert ckpt.approximate_gelu is False and ckpt.layernorm_epsilon == 1e-12
  assert not any(k.startswith("__vit_jax__") for k in ckpt.params)
  assert cli.main([str(tmp_path / "vit.npz"), str(tmp_path / "out")]) == 0
  again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
  x = helpers.images(16, 16)
  diff = helpers.max_diff(helpers.hf_logits(again, x), helpers.hf_logits(hf, x))
  print(f"parity HF ViT (erf gelu, eps 1e-12) -> npz -> HF: {diff:.2e}")
  assert diff <= 1e-6
  # Upstream's own activation and epsilon are not recorded: such files stay upstream's format.
  config = checkpoints_convert.read(tmp_path / "hf").model_config()
  config.approximate_gelu, config.layernorm_epsilon = True, 1e-6
  shapes = npz.export_npz(checkpoints_convert.load(tmp_path / "hf", config),
                          str(tmp_path / "up.npz"), config)
  assert not any(k.startswith(npz.METADATA) for k in shapes)
