"""ViT: forward pass vs an independent numpy implementation; param counts vs upstream's figures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.configs import models as model_configs
from vit_jax.models import vit


def _np_layernorm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x, approximate):
  if approximate:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  from scipy.special import erf
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _np_block(x, p, approximate):
  """One pre-LN encoder block, written from the paper's equations with numpy only."""
  y = _np_layernorm(x, p["LayerNorm_0"])
  att = p["MultiHeadDotProductAttention_1"]
  q = np.einsum("btd,dnh->btnh", y, att["query"]["kernel"]) + att["query"]["bias"]
  k = np.einsum("btd,dnh->btnh", y, att["key"]["kernel"]) + att["key"]["bias"]
  v = np.einsum("btd,dnh->btnh", y, att["value"]["kernel"]) + att["value"]["bias"]
  logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bnqk,bknh->bqnh", w, v)
  x = x + np.einsum("bqnh,nhd->bqd", o, att["out"]["kernel"]) + att["out"]["bias"]
  y = _np_layernorm(x, p["LayerNorm_2"])
  mlp = p["MlpBlock_3"]
  y = _np_gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"], approximate)
  return x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


def _np_vit(images, p, patch, classifier, approximate, representation):
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  # Non-overlapping patches flattened in (row, col, channel) order match a HWIO conv kernel.
  patches = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, gh * gw, patch * patch * c)
  kernel = p["embedding"]["kernel"].reshape(patch * patch * c, -1)
  x = patches @ kernel + p["embedding"]["bias"]
  if classifier == "token":
    x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], axis=1)
  t = p["Transformer"]
  x = x + t["posembed_input"]["pos_embedding"]
  i = 0
  while f"encoderblock_{i}" in t:
    x = _np_block(x, t[f"encoderblock_{i}"], approximate)
    i += 1
  x = _np_layernorm(x, t["encoder_norm"])
  x = x[:, 0] if classifier == "token" else x.mean(1)
  if representation:
    x = np.tanh(x @ p["pre_logits"]["kernel"] + p["pre_logits"]["bias"])
  return x @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("classifier,approximate,representation,size", [
    ("token", True, None, (16, 16)),
    ("gap", False, 24, (16, 24)),  # non-square image, exact gelu, pre-logits
])
def test_forward_matches_numpy(classifier, approximate, representation, size):
  cfg = model_configs.get_model_config("nano4")
  cfg.classifier, cfg.approximate_gelu, cfg.representation_size = (
      classifier, approximate, representation)
  model = vit.VisionTransformer(num_classes=7, **model_configs.model_kwargs(cfg))
  images = np.random.RandomState(0).randn(3, *size, 3).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  # The head is zero-initialised (upstream): give it random values so the check means something.
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32),
                        params)
  ours = np.asarray(model.apply({"params": params}, images))
  ref = _np_vit(images.astype(np.float64), jax.tree.map(lambda x: np.asarray(x, np.float64), params),
                4, classifier, approximate, representation)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,expected", [
    ("ti16", 5_717_416), ("s16", 22_050_664), ("b16", 86_567_656), ("b32", 88_224_232),
    ("l16", 304_326_632),
])
def test_param_count_matches_upstream(name, expected):
  model = vit.VisionTransformer(num_classes=1000,
                                **model_configs.model_kwargs(model_configs.get_model_config(name)))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


def test_param_names_are_upstream():
  model = vit.VisionTransformer(
      num_classes=10, **model_configs.model_kwargs(model_configs.get_model_config("nano4")))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  flat = {"/".join(str(k.key) for k in path): leaf.shape for path, leaf in
          jax.tree_util.tree_flatten_with_path(shapes["params"])[0]}
  assert flat["embedding/kernel"] == (4, 4, 3, 32)
  assert flat["cls"] == (1, 1, 32)
  assert flat["Transformer/posembed_input/pos_embedding"] == (1, 17, 32)
  assert flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"] == (32, 2, 16)
  assert flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"] == (2, 16, 32)
  assert flat["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"] == (64, 32)
  assert flat["Transformer/encoder_norm/scale"] == (32,)
  assert flat["head/kernel"] == (32, 10)


def test_feature_extractor_and_bf16():
  cfg = model_configs.model_kwargs(model_configs.get_model_config("nano4"))
  images = jnp.ones((2, 8, 8, 3))
  feats = vit.VisionTransformer(num_classes=None, **cfg)
  v = feats.init(jax.random.PRNGKey(0), images)
  assert "head" not in v["params"]
  assert feats.apply(v, images).shape == (2, 32)
  bf = vit.VisionTransformer(num_classes=5, dtype=jnp.bfloat16, remat=True, **cfg)
  v = bf.init(jax.random.PRNGKey(0), images)
  assert jax.tree.leaves(v)[0].dtype == jnp.float32  # params stay fp32
  assert bf.apply(v, images).dtype == jnp.float32  # logits are returned in fp32


def test_bad_patch_size_is_clear():
  model = vit.VisionTransformer(
      num_classes=3, **model_configs.model_kwargs(model_configs.get_model_config("nano4")))
  with pytest.raises(ValueError, match=r"not divisible by patch size \(4, 4\)"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 12, 3)))
