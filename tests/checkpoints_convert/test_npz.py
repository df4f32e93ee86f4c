"""Upstream / AugReg / big_vision `.npz`: parity with HF on the same weights, layouts, export."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoints_convert
from vit_jax.checkpoints_convert import npz
from vit_jax.configs import models as model_configs
from vit_jax.models import vit

HERE = os.path.dirname(__file__)


def _hf():
  pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
  pytest.importorskip("transformers", reason="transformers not installed")
  from tests.checkpoints_convert import helpers  # pylint: disable=g-import-not-at-top
  # Upstream/big_vision models compute tanh gelu with LayerNorm eps 1e-6: HF can too.
  return helpers, helpers.hf_model(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def _save(path, arrays):
  np.savez(path, **arrays)
  return str(path)


@pytest.mark.parametrize("layout", ["upstream", "upstream_opt_target", "bv_combined",
                                    "bv_no_cls_row", "bv_scan", "bv_params_prefix", "bv_subtree"])
def test_npz_matches_hf(tmp_path, layout):
  helpers, hf = _hf()
  if layout == "bv_no_cls_row":
    # Current big_vision adds posemb to the patches only; the equivalent HF model has a zero
    # position row for the class token.
    import torch  # pylint: disable=g-import-not-at-top
    with torch.no_grad():
      hf.vit.embeddings.position_embeddings[:, 0] = 0
  w = helpers.upstream_npz_arrays(hf, big_vision=layout.startswith("bv"))
  subtree = None
  if layout == "upstream_opt_target":
    w = {"opt/target/" + k: v for k, v in w.items()}
    w["opt/state/step"] = np.array(10)
  elif layout == "bv_no_cls_row":
    w["pos_embedding"] = w["pos_embedding"][:, 1:]
  elif layout == "bv_scan":
    blocks = [k for k in w if k.startswith("Transformer/encoderblock_0/")]
    for k in blocks:
      rest = k[len("Transformer/encoderblock_0/"):]
      w["Transformer/encoderblock/" + rest] = np.stack(
          [w.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(2)])
  elif layout == "bv_params_prefix":
    w = {"params/" + k: v for k, v in w.items()}
    w["opt/some_moment"] = np.zeros(3)
  elif layout == "bv_subtree":  # a two-tower (SigLIP-like) file: 'file.npz:img'
    w = {**{"params/img/" + k: v for k, v in w.items()}, "params/txt/Embed_0/embedding": np.ones(4)}
    subtree = "img"
  path = _save(tmp_path / "ckpt.npz", w)
  if subtree:
    path = f"{path}:{subtree}"
  ckpt = checkpoints_convert.read(path)
  assert ckpt.format == ("big_vision .npz" if layout.startswith("bv") else "upstream .npz")
  config = ckpt.model_config()
  assert config.approximate_gelu and config.transformer.num_heads == 4
  params = checkpoints_convert.load(path)
  x = helpers.images(16, 16)
  diff = helpers.max_diff(helpers.apply(params, config, x), helpers.hf_logits(hf, x))
  print(f"parity npz {layout}: {diff:.2e}")
  assert diff <= 1e-5


def _tiny_config(**overrides):
  c = model_configs.get_model_config("nano4")
  for k, v in overrides.items():
    c[k] = v
  return c


def _init(config, num_classes=5, size=16, dtype=jnp.float32):
  model = vit.VisionTransformer(num_classes=num_classes, param_dtype=dtype,
                                **model_configs.model_kwargs(config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  # Random values everywhere (init has zero heads/biases), so misplaced arrays show.
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes["params"])


def test_export_npz_names_match_upstream_vit_b16_file():
  """Our exported names/shapes for ViT-B/16 at 384px = the upstream ViT-B_16.npz key list."""
  with open(os.path.join(HERE, "vit_b16_i21k_i1k_384_npz_keys.json")) as f:
    expected = {k: tuple(v) for k, v in json.load(f)["arrays"].items()}
  model = vit.VisionTransformer(num_classes=1000,
                                **model_configs.model_kwargs(model_configs.get_model_config("b16")))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 384, 384, 3))))
  # Zero-stride arrays: the names and shapes without allocating 86M floats.
  params = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes["params"])
  assert {k: v.shape for k, v in npz.to_npz_dict(params).items()} == expected


def test_export_npz_round_trip(tmp_path):
  config = _tiny_config(representation_size=16)
  params = _init(config)
  shapes = npz.export_npz(params, str(tmp_path / "out.npz"))
  with np.load(tmp_path / "out.npz", allow_pickle=False) as f:
    assert sorted(f.files) == sorted(shapes)
    assert "pre_logits/kernel" in f.files and "Transformer/posembed_input/pos_embedding" in f.files
  again = checkpoints_convert.load(str(tmp_path / "out.npz"), config)
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))


def test_finetune_resizes_keeps_or_resets_head_and_drops_pre_logits(tmp_path):
  """Upstream's load_pretrained: bilinear (scipy zoom order 1) posemb resize keeping the class
  row, a new zero head when the class count changes, pre_logits dropped when the fine-tuning
  model has representation_size None."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  pre = _init(_tiny_config(representation_size=16), num_classes=7, size=16)  # 4x4 grid
  npz.export_npz(pre, str(tmp_path / "pre.npz"))
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      model=_tiny_config(), pretrained_path=str(tmp_path / "pre.npz"), pretrained_dir=None,
      model_name=None, posemb_resize_method="bilinear"))
  init = _init(config.model, num_classes=3, size=24)  # 6x6 grid, 3 classes
  out = checkpoints_convert.load_for_finetune(config, init)
  assert jax.tree.structure(out) == jax.tree.structure(init)
  same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), out, init)
  assert all(jax.tree.leaves(same))
  np.testing.assert_array_equal(out["head"]["kernel"], init["head"]["kernel"])
  assert "pre_logits" not in out
  old = np.asarray(pre["Transformer"]["posembed_input"]["pos_embedding"])
  # Upstream's interpolate_posembed, written out: class row kept, grid zoomed with order=1.
  grid = scipy.ndimage.zoom(old[0, 1:].reshape(4, 4, -1), (6 / 4, 6 / 4, 1), order=1)
  expected = np.concatenate([old[:, :1], grid.reshape(1, 36, -1)], axis=1)
  np.testing.assert_allclose(out["Transformer"]["posembed_input"]["pos_embedding"], expected,
                             atol=1e-6)
  np.testing.assert_array_equal(out["Transformer"]["encoder_norm"]["scale"],
                                pre["Transformer"]["encoder_norm"]["scale"])

  # Same class count: the head is kept. Upstream naming: {pretrained_dir}/{model_name}.npz.
  config.pretrained_path, config.pretrained_dir, config.model_name = None, str(tmp_path), "pre"
  config.model.representation_size = 16
  init = _init(config.model, num_classes=7, size=16, dtype=jnp.bfloat16)
  out = checkpoints_convert.load_for_finetune(config, init)
  assert out["head"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["head"]["kernel"],
                                np.asarray(pre["head"]["kernel"]).astype(jnp.bfloat16))
  np.testing.assert_array_equal(out["pre_logits"]["kernel"],
                                np.asarray(pre["pre_logits"]["kernel"]).astype(jnp.bfloat16))


def test_mismatch_error_lists_format_keys_and_shapes(tmp_path):
  params = jax.tree.map(np.asarray, _init(_tiny_config()))
  flat = npz.to_npz_dict(params)
  del flat["Transformer/encoderblock_1/LayerNorm_2/scale"]
  flat["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3)
  flat["Transformer/encoder_norm/bias"] = np.zeros(7, np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(checkpoints_convert.CheckpointMismatchError) as e:
    checkpoints_convert.load(str(tmp_path / "bad.npz"), _tiny_config())
  msg = str(e.value)
  assert "detected format: upstream .npz" in msg
  assert "missing (in the model, not in the checkpoint): " \
         "Transformer/encoderblock_1/LayerNorm_2/scale" in msg
  assert "unexpected (in the checkpoint, not in the model): " \
         "Transformer/encoderblock_0/extra/kernel" in msg
  assert "Transformer/encoder_norm/bias: model expects (32,), checkpoint has (7,)" in msg


def test_big_vision_sincos_and_map_head(tmp_path):
  """A big_vision gap/MAP model with posemb='sincos2d' stores no position embedding: it is
  recreated with big_vision's formula (copied here from big_vision/models/vit.py, in jnp)."""
  def bv_posemb_sincos_2d(h, w, width, temperature=10_000.):
    y, x = jnp.mgrid[:h, :w]
    omega = jnp.arange(width // 4) / (width // 4 - 1)
    omega = 1. / (temperature**omega)
    y = jnp.einsum("m,d->md", y.flatten(), omega)
    x = jnp.einsum("m,d->md", x.flatten(), omega)
    pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    return jnp.asarray(pe, jnp.float32)[None, :, :]

  config = _tiny_config(classifier="map")
  params = jax.tree.map(np.asarray, _init(config))
  assert "MultiHeadDotProductAttention_0" in params["MAPHead_0"]  # big_vision's names
  flat = npz.to_npz_dict(params)
  del flat["Transformer/posembed_input/pos_embedding"]
  bv = {}
  for k, v in flat.items():  # upstream block names -> big_vision's
    for a, b in (("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
                 ("LayerNorm_2", "LayerNorm_1"), ("MlpBlock_3", "MlpBlock_0")):
      if k.startswith("Transformer/encoderblock_"):
        k = k.replace(a, b)
    bv["params/" + k] = v
  np.savez(tmp_path / "bv.npz", **bv)
  out = checkpoints_convert.load(str(tmp_path / "bv.npz"), config, image_size=(16, 24))
  np.testing.assert_allclose(out["Transformer"]["posembed_input"]["pos_embedding"],
                             bv_posemb_sincos_2d(4, 6, 32), atol=1e-6)
  expected = dict(params)
  expected.pop("Transformer")
  got = {k: v for k, v in out.items() if k != "Transformer"}
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_refuses_hybrid_and_pickled_npz(tmp_path):
  np.savez(tmp_path / "r50.npz", **{"conv_root/kernel": np.zeros((7, 7, 3, 64)),
                                    "embedding/kernel": np.zeros((1, 1, 1024, 768))})
  with pytest.raises(checkpoints_convert.UnsupportedCheckpointError, match="hybrid"):
    checkpoints_convert.read(str(tmp_path / "r50.npz"))
  np.savez(tmp_path / "obj.npz", **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(checkpoints_convert.UnsafeCheckpointError, match="pickled"):
    checkpoints_convert.read(str(tmp_path / "obj.npz"))
