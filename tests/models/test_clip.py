"""CLIP model family: preset shapes (eval_shape), the causal text tower, the CLIP output contract,
and the ViT's CLIP options against numpy. HF parity is in tests/checkpoints_convert/."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.checkpoints_convert import common
from vit_jax.configs import models as model_configs
from vit_jax.models import clip
from vit_jax.models import text as text_model
from vit_jax.models import vit

# Parameter counts of HF's CLIPModel for openai/clip-vit-{base-patch32, base-patch16,
# large-patch14} (sum of numel over model.parameters(); the same as OpenAI's and open_clip's).
HF_PARAMS = {"b32": 151_277_313, "b16": 149_620_737, "l14": 427_616_513}


def _nano(**overrides):
  c = model_configs.get_clip_config("nano")
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def nano():
  """(config, model, params) of the nano preset, every param perturbed (LayerNorms init to 1/0
  and would hide misplaced arrays). Built once: XLA compiles dominate these tests' time."""
  config = _nano()
  model = clip.CLIP(**model_configs.clip_kwargs(config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                             jnp.ones((1, 77), jnp.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype),
                        shapes["params"])
  for tower in ("img", "txt"):  # keep LayerNorm scales near 1, as trained models have them
    for path, leaf in common.flatten(params[tower]).items():
      if path.endswith("scale"):
        leaf += 1.0
  params["logit_scale"] = np.float32(math.log(1 / 0.07))
  return config, model, params


def _tokens(rows, length, vocab, seed=0):
  """[len(rows), length] ids: random text, the EOT (largest id) at rows[i], padding after it."""
  rng = np.random.default_rng(seed)
  tok = np.zeros((len(rows), length), np.int32)
  for i, eot in enumerate(rows):
    tok[i, :eot] = rng.integers(1, vocab - 1, eot)
    tok[i, eot] = vocab - 1
  return tok


@pytest.mark.parametrize("name", sorted(HF_PARAMS))
def test_presets_shapes_and_param_counts(name):
  config = model_configs.get_clip_config(name)
  model = clip.CLIP(**model_configs.clip_kwargs(config))
  s = config.image_size
  images = jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((3, 77), jnp.int32)
  def init_and_apply(i, t):
    v = model.init(jax.random.PRNGKey(0), i, t)
    return v, model.apply(v, i, t)

  variables, out = jax.eval_shape(init_and_apply, images, tokens)  # shapes only: no memory
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables)) == HF_PARAMS[name]
  e = config.embed_dim
  assert {k: v.shape for k, v in out.items()} == {
      "image_embeds": (2, e), "text_embeds": (3, e), "logits_per_image": (2, 3),
      "logits_per_text": (3, 2), "logit_scale": ()}
  p = variables["params"]
  grid = s // config.image.patches.size[0]
  assert p["img"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (
      1, grid * grid + 1, config.image.hidden_size)
  assert p["img"]["Transformer"]["pre_norm"]["scale"].shape == (config.image.hidden_size,)
  assert "bias" not in p["img"]["embedding"] and "bias" not in p["img"]["head"]
  assert p["txt"]["token_embedding"]["embedding"].shape == (49408, config.text.width)
  assert p["txt"]["head"]["kernel"].shape == (config.text.width, e)
  assert p["logit_scale"].shape == ()


def test_demo_presets_parse():
  assert model_configs.get_clip_config("mu").image.patches.size == (7, 7)
  assert model_configs.get_clip_config("mu").image_size == 28
  assert model_configs.get_clip_config("mu32").image_size == 128
  assert model_configs.get_clip_config("ViT-B/32").name == "CLIP-B_32"
  assert model_configs.get_clip_config("nano").text.width <= 64
  with pytest.raises(ValueError, match="Unknown CLIP model 'b14'"):
    model_configs.get_clip_config("b14")


def test_causal_text_pooling_ignores_later_tokens(nano):
  """Features pooled at an EOT before position i do not depend on the tokens after i (causal
  mask), and do depend on tokens before it (the mask is not all-blocking)."""
  config, model, params = nano
  vocab, length = config.text.vocab_size, config.text.context_length
  tok = _tokens([3, 5, 9], length, vocab)
  encode = jax.jit(lambda t: model.apply({"params": params}, t, method=clip.CLIP.encode_text))
  enc = lambda t: np.asarray(encode(t))
  base = enc(tok)
  later = tok.copy()
  for i, eot in enumerate([3, 5, 9]):  # anything after the EOT, even ids larger than it
    later[i, eot + 1:] = np.random.default_rng(i).integers(1, vocab - 1, length - eot - 1)
  later[:, -1] = 0
  np.testing.assert_array_equal(enc(later), base)
  earlier = tok.copy()
  earlier[:, 1] = (earlier[:, 1] % (vocab - 2)) + 1
  assert np.abs(enc(earlier) - base).max() > 1e-3
  # Shorter sequences than the context are fine: the first position embeddings are used.
  np.testing.assert_allclose(enc(tok[:, :10]), base, atol=1e-5)


def test_text_tower_tokens_and_errors():
  tower = text_model.TextTransformer(embed_dim=None, width=32, num_layers=1, num_heads=2,
                                     mlp_dim=64, vocab_size=50, context_length=8)
  tok = _tokens([2, 7], 8, 50)

  def init_and_apply(t):
    v = tower.init(jax.random.PRNGKey(0), t)
    return v, tower.apply(v, t, return_tokens=True)

  v, (pooled, tokens) = jax.jit(init_and_apply)(tok)
  assert pooled.shape == (2, 32) and tokens.shape == (2, 8, 32)
  np.testing.assert_array_equal(pooled, tokens[np.arange(2), [2, 7]])
  with pytest.raises(ValueError, match="9 per sequence, more than the model's context_length 8"):
    tower.apply(v, np.ones((2, 9), np.int32))
  with pytest.raises(ValueError, match=r"expected integer ids \[batch, tokens\]"):
    tower.apply(v, np.ones((2, 8), np.float32))


def test_outputs_contract(nano):
  config, model, params = nano
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  tok = _tokens([2, 4, 6], 77, config.text.vocab_size)

  @jax.jit
  def apply(p):  # one compile for the call and both encoders
    v = {"params": p}
    return (model.apply(v, x, tok), model.apply(v, x, method=clip.CLIP.encode_image),
            model.apply(v, tok, method=clip.CLIP.encode_text))

  out, zi, zt = apply(params)
  zi, zt = np.asarray(zi), np.asarray(zt)
  assert zi.shape == (2, 32) and zt.shape == (3, 32) and zi.dtype == np.float32
  ni, nt = zi / np.linalg.norm(zi, axis=-1, keepdims=True), zt / np.linalg.norm(zt, axis=-1,
                                                                              keepdims=True)
  np.testing.assert_allclose(out["image_embeds"], ni, atol=1e-6)
  np.testing.assert_allclose(out["text_embeds"], nt, atol=1e-6)
  scale = np.exp(params["logit_scale"])
  np.testing.assert_allclose(out["logits_per_image"], scale * ni @ nt.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["logits_per_text"], out["logits_per_image"].T)
  assert float(out["logit_scale"]) == float(params["logit_scale"])  # the LOG scale, unclamped

  # Clamped at 100, as CLIP; the output keeps the stored (log) value for the loss to clamp.
  big = dict(params, logit_scale=np.float32(6.0))
  out = apply(big)[0]
  np.testing.assert_allclose(out["logits_per_image"], 100 * ni @ nt.T, rtol=1e-5, atol=1e-5)
  assert float(out["logit_scale"]) == 6.0

  # Either tower alone (shapes only: the computation is the one above).
  only_img = jax.eval_shape(model.apply, {"params": params}, x, None)
  assert set(only_img) == {"image_embeds", "logit_scale"}
  only_txt = jax.eval_shape(model.apply, {"params": params}, None, tok)
  assert set(only_txt) == {"text_embeds", "logit_scale"}


def test_init_values_and_siglip_bias():
  config = _nano(logit_bias_init=-10.0, logit_scale_init=math.log(10.0))
  model = clip.CLIP(**model_configs.clip_kwargs(config))
  x, tok = jnp.zeros((2, 16, 16, 3)), jnp.asarray(_tokens([3, 5], 77, config.text.vocab_size))
  x = x + jnp.arange(16.)[:, None, None] / 16  # images that differ, for non-degenerate logits

  @jax.jit
  def init_and_apply(x, tok):
    params = model.init(jax.random.PRNGKey(0), x, tok)["params"]
    return params, model.apply({"params": params}, x, tok)

  params, out = init_and_apply(x, tok)
  assert float(params["logit_bias"]) == -10.0
  np.testing.assert_allclose(float(params["logit_scale"]), math.log(10.0), rtol=1e-6)
  # The projections are not zero (a zero projection makes every embedding zero).
  for tower in ("img", "txt"):
    kernel = np.asarray(params[tower]["head"]["kernel"])
    np.testing.assert_allclose(kernel.std(), kernel.shape[0] ** -0.5, rtol=0.3)
  np.testing.assert_allclose(
      out["logits_per_image"], 10.0 * out["image_embeds"] @ out["text_embeds"].T - 10.0,
      rtol=1e-5, atol=1e-5)
  assert float(out["logit_bias"]) == -10.0
  default = _nano()
  assert default.logit_bias_init is None
  np.testing.assert_allclose(default.logit_scale_init, math.log(1 / 0.07))
  p = jax.eval_shape(clip.CLIP(**model_configs.clip_kwargs(default)).init,
                     jax.random.PRNGKey(0), x, tok)["params"]
  assert "logit_bias" not in p


def _np_layernorm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_vit_pre_norm_order_and_quick_gelu():
  """pre_norm is applied after the position embedding is added (CLIP's ln_pre): with no blocks,
  the tokens are encoder_norm(pre_norm(posemb + [cls; patches])); quick_gelu = x sigmoid(1.702x).
  """
  c = _nano().image
  c.transformer.num_layers = 0
  c.classifier = "token_unpooled"  # every token, the class token first
  model = vit.VisionTransformer(num_classes=None, **c.to_dict())
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: 1 + 0.3 * rng.normal(size=s.shape).astype(np.float32),
                        jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"])
  patches = x.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
  emb = patches @ params["embedding"]["kernel"].reshape(48, -1)  # no bias: CLIP's has none
  emb = np.concatenate([np.broadcast_to(params["cls"], (2, 1, 32)), emb], axis=1)
  t = params["Transformer"]
  ref = _np_layernorm(emb + t["posembed_input"]["pos_embedding"], t["pre_norm"], 1e-5)
  ref = _np_layernorm(ref, t["encoder_norm"], 1e-5)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x), ref, atol=1e-5)

  mlp = vit.MlpBlock(mlp_dim=16, activation="quick_gelu")
  y = rng.normal(size=(3, 8)).astype(np.float32)
  p = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                   jax.eval_shape(mlp.init, jax.random.PRNGKey(0), y, deterministic=True))
  h = y @ p["params"]["Dense_0"]["kernel"] + p["params"]["Dense_0"]["bias"]
  h = h / (1 + np.exp(-1.702 * h))
  np.testing.assert_allclose(
      jax.jit(lambda p, y: mlp.apply(p, y, deterministic=True))(p, y),
      h @ p["params"]["Dense_1"]["kernel"] + p["params"]["Dense_1"]["bias"], atol=1e-5)
  with pytest.raises(ValueError, match="Unknown MLP activation 'relu'"):
    vit.MlpBlock(mlp_dim=16, activation="relu").init(jax.random.PRNGKey(0), y,
                                                      deterministic=True)


def test_bf16_compute_and_remat(nano):
  config, model, params = nano
  tok = _tokens([2, 4, 6], 77, config.text.vocab_size)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  ref = jax.jit(model.apply)({"params": params}, x, tok)  # same shapes: compiled once
  bf = clip.CLIP(**model_configs.clip_kwargs(config), dtype=jnp.bfloat16, remat=True)
  out = jax.jit(bf.apply)({"params": params}, x, tok)
  assert out["image_embeds"].dtype == jnp.float32 and out["logits_per_image"].dtype == jnp.float32
  for k in ("image_embeds", "text_embeds"):
    assert np.abs(np.asarray(out[k]) - np.asarray(ref[k])).max() < 0.05, k
