"""HF transformers OwlViT / Owlv2 detectors <-> our OwlViT: parity (fp32, max |diff| <= 1e-5) of
logits, boxes, class embeddings, objectness and image-guided detection with weights carried by our
converter; export round trip into HF; scenic msgpack layout (synthetic); CLIP backbone init.

Speed: one HF OwlViT and one Owlv2 detector per module (`detector` fixture: built, saved and
converted once), one compiled forward per detector shared by the parity and export tests,
params drawn from `jax.eval_shape` shapes instead of compiling `model.init`, every jit at LLVM
-O0 (FAST_COMPILE), and each test's JAX work in one compiled function."""
import functools
import json
import types

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

from vit_jax import checkpoints_convert  # pylint: disable=g-import-not-at-top
from vit_jax.checkpoints_convert import common
from vit_jax.checkpoints_convert import owl_vit as owl_formats
from vit_jax.configs import models
from vit_jax.models import owl_vit

TOL = 1e-5
VOCAB, CONTEXT = 99, 16
# Different tower widths (48 vs 32), so that a tower mix-up cannot pass; projection_dim must equal
# the text width (HF's class head projects to text hidden_size).
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CONTEXT, eos_token_id=VOCAB - 1,
            bos_token_id=VOCAB - 2, pad_token_id=0)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


# Tiny models: compiling dominates, not running. XLA's HLO passes (fusion, layouts) are
# unchanged; kernels come from the classic elemental emitters instead of the MLIR fusion emitters
# (bit-identical outputs here) without LLVM's optimisation passes (fp32 rounding-level changes,
# ~1e-7 relative): ~2.5x faster compiles (nano forward 1.4 s -> 0.6 s).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def jit_apply(model, **kwargs):
  """model.apply(variables, *args, **kwargs), jitted at -O0, outputs as numpy. Keep the result:
  each call of jit_apply compiles anew."""
  fn = jax.jit(functools.partial(model.apply, **kwargs), compiler_options=FAST_COMPILE)
  return lambda *args: jax.tree.map(np.asarray, fn(*args))


def run(model, variables, *args, **kwargs):
  return jit_apply(model, **kwargs)(variables, *args)


def perturb(model, seed):
  """Every parameter perturbed: HF initialises LayerNorms to 1/0 and biases to 0, which would
  hide transposed or swapped weights. The heads' Linear weights (HF: std 1) are drawn at std
  1/sqrt(fan_in), as in a trained net: at std 1 the logits reach ~100-300 and fp32 rounding
  alone (HF fp32 vs HF fp64) is ~1e-4."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.split(".")[0].endswith("_head") and p.ndim == 2:
        p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
      else:
        p.add_(torch.randn_like(p) * 0.2)
  return model


def hf_detector(v2: bool, seed=0):
  cls = "Owlv2" if v2 else "OwlViT"
  config = getattr(transformers, f"{cls}Config")(text_config=TEXT, vision_config=VISION,
                                                 projection_dim=32)
  torch.manual_seed(seed)
  return perturb(getattr(transformers, f"{cls}ForObjectDetection")(config).eval(), seed + 1)


def tokens(batch, queries, seed=0):
  """[batch, queries, 16] ids: start, words, EOT (the largest id), zero padding; the last query
  of image 0 is padding (a row of zeros)."""
  rng = np.random.default_rng(seed)
  tok = np.zeros((batch, queries, CONTEXT), np.int32)
  for b in range(batch):
    for q in range(queries):
      n = int(rng.integers(2, 10))
      tok[b, q, 0] = VOCAB - 2
      tok[b, q, 1:n] = rng.integers(1, VOCAB - 2, n - 1)
      tok[b, q, n] = VOCAB - 1
  tok[0, -1] = 0
  return tok


def images(batch=2, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def hf_detect(model, x, tok):
  b, q, l = tok.shape
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tok.reshape(b * q, l)).long(), pixel_values=nchw(x))
  res = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes,
         "class_embeds": out.class_embeds, "query_embeds": out.text_embeds,
         "image_feats": out.image_embeds.reshape(b, -1, out.image_embeds.shape[-1])}
  if getattr(out, "objectness_logits", None) is not None:
    res["objectness_logits"] = out.objectness_logits
  return {k: v.numpy() for k, v in res.items()}


def compare(ours, ref, valid, name):
  """Max |diff| per output (logits on valid queries only); our padding logits must be -1e6."""
  diffs = {}
  for k, r in ref.items():
    o = ours[k]
    assert o.shape == r.shape, (k, o.shape, r.shape)
    if k == "pred_logits":
      assert np.all(o[~valid[:, None, :].repeat(o.shape[1], 1)] == -1e6)
      o, r = o.transpose(0, 2, 1)[valid], r.transpose(0, 2, 1)[valid]
    diffs[k] = float(np.max(np.abs(o - r)))
  print(f"{name}: max |diff| {diffs}")
  assert max(diffs.values()) <= TOL, diffs
  return diffs


def _build_detector(v2, path):
  """An HF detector saved to `path` and read back by our converter, with our jitted forward
  (images [2, 32, 32, 3], tokens [2, 3, 16] keep it at one compile)."""
  hf = hf_detector(v2)
  hf.save_pretrained(path)
  model, params = checkpoints_convert.load_model(str(path))
  _, config, _, _ = owl_formats.read(str(path))
  forward = jit_apply(model)
  return types.SimpleNamespace(hf=hf, path=path, model=model, params=params, config=config,
                               forward=lambda p, x, tok: forward({"params": p}, x, tok))


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
  """detector(v2) -> the module's one OwlViT (v2=False) or Owlv2 detector, built on first use."""
  torch.set_num_threads(1)  # tiny models; under pytest-xdist the cores are the workers'
  built = {}

  def get(v2):
    if v2 not in built:
      built[v2] = _build_detector(v2, tmp_path_factory.mktemp("owlv2" if v2 else "owlvit"))
    return built[v2]
  return get


@pytest.mark.parametrize("v2", [False, True])
def test_hf_parity(detector, v2):
  d = detector(v2)
  model, params = d.model, d.params
  assert isinstance(model, owl_vit.OwlViT) and model.objectness == v2
  assert "head" not in params["img"] and "logit_scale" not in params
  x, tok = images(), tokens(2, 3)
  ours = d.forward(params, x, tok)
  compare(ours, hf_detect(d.hf, x, tok), tok[..., 0] > 0, f"{'Owlv2' if v2 else 'OwlViT'} parity")
  # The ViT reader names the format instead of failing on unknown keys; ViT options refused.
  with pytest.raises(common.CheckpointError, match="OWL-ViT detector"):
    checkpoints_convert.read(str(d.path))
  with pytest.raises(TypeError, match="num_classes"):
    checkpoints_convert.load_model(str(d.path), num_classes=3)


def _image_guided(m, x, query_x, query_boxes):
  """Our one-shot detection, as HF's image_guided_detection: query embeddings from `query_x`,
  then each target image against its own query image's embedding ([b, n, 1])."""
  q, idx = m.embed_image_query(query_x, query_boxes)
  feats = m.image_features(x)
  return q, idx, m.class_predictor(feats, q[:, None]), m.box_predictor(feats)


def test_hf_image_guided_parity(detector):
  d = detector(False)
  hf = d.hf
  x, qx = images(seed=1), images(seed=2)
  b = x.shape[0]
  with torch.no_grad():
    ref = hf.image_guided_detection(pixel_values=nchw(x), query_pixel_values=nchw(qx))
    qmap = hf.image_embedder(pixel_values=nchw(qx))[0]
    ref_q, ref_idx, _ = hf.embed_image_query(qmap.reshape(b, -1, qmap.shape[-1]), qmap)
  whole = np.tile(np.array([[0.5, 0.5, 1.0, 1.0]], np.float32), (b, 1))
  q, idx, out, boxes = run(d.model, {"params": d.params}, x, qx, whole, method=_image_guided)
  np.testing.assert_array_equal(idx, ref_idx.numpy().reshape(-1))
  assert tuple(ref.logits.shape) == (b, 16, 1)
  assert out["pred_logits"].shape == (b, 16, 1)
  diffs = {"query_embeds": float(np.max(np.abs(q - ref_q.numpy().reshape(b, -1)))),
           "pred_logits": float(np.max(np.abs(out["pred_logits"] - ref.logits.numpy()))),
           "class_embeds": float(np.max(np.abs(out["class_embeds"] - ref.class_embeds.numpy()))),
           "pred_boxes": float(np.max(np.abs(boxes - ref.target_pred_boxes.numpy())))}
  print(f"image-guided parity: max |diff| {diffs}")
  assert max(diffs.values()) <= TOL, diffs


def _random_params(model_config, seed):
  """Random params for OwlViT(model_config), every leaf drawn (zero-init heads would hide layout
  errors): shapes from jax.eval_shape (compiling model.init costs seconds), LayerNorm scales
  1 + N(0, 0.1^2), 2-d kernels N(0, 1 / fan_in), the rest N(0, 0.1^2); float32 numpy."""
  model = owl_vit.OwlViT(**models.owl_vit_kwargs(model_config))
  s = model_config.image_size
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, s, s, 3), np.float32),
                          jax.ShapeDtypeStruct((1, 1, CONTEXT), np.int32))["params"]
  rng = np.random.default_rng(seed)
  draw = lambda k, a: (np.float32(k.endswith("/scale")) + rng.normal(size=a.shape)
                       * (a.shape[0] ** -0.5 if len(a.shape) == 2 else 0.1)).astype(np.float32)
  return model, common.unflatten({k: draw(k, a) for k, a in common.flatten(shapes).items()})


def _nano(v2):
  c = models.get_owl_vit_config("nano")
  c.objectness = v2
  c.text.vocab_size = VOCAB
  c.image_size = 32
  c.image.patches.size = (8, 8)
  return c


@pytest.mark.parametrize("v2", [False, True])
def test_export_round_trip(detector, tmp_path, v2):
  """The module's detector (towers 48 / 32 wide, 4 heads), every param moved off the HF file's
  values, exported: HF runs it as we do, and our reader gives back the same tree."""
  d = detector(v2)
  c = d.config
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda a: (a + 0.05 * rng.normal(size=a.shape)).astype(np.float32),
                        d.params)
  checkpoints_convert.export_hf_owl_vit(params, c, str(tmp_path))
  cls = getattr(transformers, "Owlv2ForObjectDetection" if v2 else "OwlViTForObjectDetection")
  hf, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
  hf.eval()
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == ("owlv2" if v2 else "owlvit")
  x, tok = images(seed=7), tokens(2, 3, seed=7)
  ours = d.forward(params, x, tok)  # the detector's compiled forward: same model, same shapes
  compare(ours, hf_detect(hf, x, tok), tok[..., 0] > 0, f"export {'v2' if v2 else 'v1'}")
  # And back through our reader: the same tree, exactly.
  _, back = checkpoints_convert.load_model(str(tmp_path))
  flat, flat_back = common.flatten(params), common.flatten(back)
  assert set(flat) == set(flat_back)
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat_back[k], err_msg=k)


def _scenic_tree(params):
  """Our params renamed into scenic's OWL-ViT layout (notes 3e/4g), written independently of
  the converter: `backbone/clip/{visual,text}/...`, `resblocks_i/{ln_0,attn,ln_1,mlp}`,
  `obj_box_head/Dense_i`, `class_head/Dense_0`, plus the visual projection and logit_scale
  scenic keeps (which the detector drops)."""
  p = common.flatten(params)
  out = {}
  for tower, theirs in (("img", "visual"), ("txt", "text")):
    i = 0
    while f"{tower}/Transformer/encoderblock_{i}/LayerNorm_0/scale" in p:
      src = f"{tower}/Transformer/encoderblock_{i}/"
      dst = f"backbone/clip/{theirs}/transformer/resblocks_{i}/"
      for a, b in (("LayerNorm_0", "ln_0"), ("LayerNorm_2", "ln_1"),
                   ("MultiHeadDotProductAttention_1/query", "attn/query"),
                   ("MultiHeadDotProductAttention_1/key", "attn/key"),
                   ("MultiHeadDotProductAttention_1/value", "attn/value"),
                   ("MultiHeadDotProductAttention_1/out", "attn/out"),
                   ("MlpBlock_3/Dense_0", "mlp/c_fc"), ("MlpBlock_3/Dense_1", "mlp/c_proj")):
        for leaf in ("kernel", "bias", "scale"):
          if f"{src}{a}/{leaf}" in p:
            out[f"{dst}{b}/{leaf}"] = p[f"{src}{a}/{leaf}"]
      i += 1
  v, t = "backbone/clip/visual/", "backbone/clip/text/"
  pe = "Transformer/posembed_input/pos_embedding"
  out.update({
      v + "conv1/kernel": p["img/embedding/kernel"], v + "class_embedding": p["img/cls"][0, 0],
      v + "positional_embedding": p[f"img/{pe}"][0],
      v + "ln_pre/scale": p["img/Transformer/pre_norm/scale"],
      v + "ln_pre/bias": p["img/Transformer/pre_norm/bias"],
      v + "ln_post/scale": p["img/Transformer/encoder_norm/scale"],
      v + "ln_post/bias": p["img/Transformer/encoder_norm/bias"],
      v + "proj/kernel": np.ones((48, 32), np.float32),
      t + "token_embedding/embedding": p["txt/token_embedding/embedding"],
      t + "positional_embedding": p[f"txt/{pe}"][0],
      t + "ln_final/scale": p["txt/Transformer/encoder_norm/scale"],
      t + "ln_final/bias": p["txt/Transformer/encoder_norm/bias"],
      t + "text_projection/kernel": p["txt/head/kernel"],
      "backbone/clip/logit_scale": np.float32(4.6),
      "backbone/merged_class_token/scale": p["merged_class_token/scale"],
      "backbone/merged_class_token/bias": p["merged_class_token/bias"]})
  for ours, theirs in (("dense0", "Dense_0"), ("logit_shift", "logit_shift"),
                       ("logit_scale", "logit_scale")):
    for leaf in ("kernel", "bias"):
      out[f"class_head/{theirs}/{leaf}"] = p[f"class_head/{ours}/{leaf}"]
  for ours, theirs in (("box_head", "obj_box_head"), ("objectness_head", "objectness_head")):
    for i in range(3):
      for leaf in ("kernel", "bias"):
        if f"{ours}/dense{i}/{leaf}" in p:
          out[f"{theirs}/Dense_{i}/{leaf}"] = p[f"{ours}/dense{i}/{leaf}"]
  return common.unflatten(out)


def test_scenic_msgpack_layout(tmp_path):
  """A SYNTHETIC layout test: no scenic checkpoint can be downloaded here, so the file is our
  random params renamed into scenic's names and written with flax's msgpack serializer, under
  `params/` (optax-era) and `optimizer/target/` (older checkpoints)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  c = _nano(v2=True)
  c.head_approximate_gelu = True  # scenic's heads: flax's tanh gelu
  _, params = _random_params(c, seed=9)
  flat = common.flatten(params)
  for root in ("params", "optimizer/target"):
    tree = _scenic_tree(params)
    for part in reversed(root.split("/")):
      tree = {part: tree}
    tree["global_step"] = np.int64(140000)
    path = tmp_path / root.replace("/", "_") / "checkpoint_140000"
    path.parent.mkdir()
    path.write_bytes(serialization.msgpack_serialize(tree))
    loaded_model, back = checkpoints_convert.load_model(str(path))
    assert loaded_model.objectness and loaded_model.head_approximate_gelu
    flat_back = common.flatten(back)
    assert set(flat) == set(flat_back), root
    for k in flat:
      np.testing.assert_array_equal(flat[k], flat_back[k], err_msg=f"{root}: {k}")
  # At another resolution: the image position embeddings resampled, outputs finite.
  m2, p2 = checkpoints_convert.load_model(str(path), image_size=48)
  assert p2["img"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
  # The boxes only (what the resampling feeds): the text tower is not compiled for this.
  boxes = run(m2, {"params": p2}, images(1, 48),
              method=lambda m, x: m.box_predictor(m.image_features(x)))
  assert boxes.shape == (1, 36, 4) and np.all(np.isfinite(boxes))
  # A msgpack file that is not an OWL-ViT tree is refused, naming what it found.
  bad = tmp_path / "other.msgpack"
  bad.write_bytes(serialization.msgpack_serialize({"params": {"encoder": {"w": np.zeros(2)}}}))
  with pytest.raises(common.CheckpointError, match="without an OWL-ViT tree"):
    checkpoints_convert.load_model(str(bad))


def test_clip_backbone_init(tmp_path):
  """scenic's init_from.codebase='clip': HF CLIPModel towers into a fresh detector; the towers
  compute what HF's CLIP computes (text truncated to 16 positions), the heads are kept."""
  torch.manual_seed(11)
  text = {**TEXT, "max_position_embeddings": 24}
  config = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=32)
  hf = perturb(transformers.CLIPModel(config).eval(), 12)
  hf.save_pretrained(tmp_path)
  c = _nano(v2=False)
  c.image.hidden_size, c.image.transformer.mlp_dim = 48, 96
  c.image.transformer.num_heads = 4
  c.text.num_heads, c.text.mlp_dim = 4, 64
  model, fresh = _random_params(c, seed=13)
  params = checkpoints_convert.load_backbone(str(tmp_path), c, 32, fresh)
  for head in ("class_head", "box_head", "merged_class_token"):
    for k, a in common.flatten(fresh[head]).items():
      np.testing.assert_array_equal(common.flatten(params[head])[k], a)
  x, tok = images(), tokens(2, 3)
  v = {"params": params}
  # The text tower's projected embedding and the image tower's every token (after ln_post).
  towers = lambda m, tok, x: (m.embed_text(tok), m.img(x))
  ours_txt, tokens_img = run(model, v, tok, x, method=towers)
  with torch.no_grad():
    ref_txt = hf.get_text_features(input_ids=torch.from_numpy(tok.reshape(6, -1)).long())
    vis = hf.vision_model(pixel_values=nchw(x)).last_hidden_state
    ref_img = hf.vision_model.post_layernorm(vis).numpy()
  d_txt = float(np.max(np.abs(ours_txt.reshape(6, -1) - ref_txt.pooler_output.numpy())))
  d_img = float(np.max(np.abs(tokens_img - ref_img)))
  print(f"CLIP backbone: max |diff| text {d_txt:.2e}, image tokens {d_img:.2e}")
  assert max(d_txt, d_img) <= TOL
  # A backbone of the wrong width is refused, naming the shapes.
  wrong = ml_collections.ConfigDict(c.to_dict())
  wrong.image.hidden_size, wrong.image.transformer.mlp_dim = 64, 128
  wrong_params = jax.eval_shape(
      owl_vit.OwlViT(**models.owl_vit_kwargs(wrong)).init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
      jax.ShapeDtypeStruct((1, 1, CONTEXT), np.int32))["params"]
  with pytest.raises(common.CheckpointError, match="shape mismatch"):
    checkpoints_convert.load_backbone(str(tmp_path), wrong, 32, wrong_params)
