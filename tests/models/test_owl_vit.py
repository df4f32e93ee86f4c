"""OWL-ViT model: param tree and shapes (jax.eval_shape), the box prior in closed form, boxes at
init, query masking, the one-shot query heuristic against a plain per-example loop, presets, and
the text tower's EOT pooling / added-vocabulary table.

Speed: compiling is what costs here (XLA CPU, ~1-3 s per tiny function), so each fixture or test
jits ONE function computing everything it checks, at LLVM -O0 (FAST_COMPILE); params are drawn
from `jax.eval_shape` shapes, except the nano detector's heads, whose init values are under test
(a real init of the heads alone)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.configs import models
from vit_jax.models import owl_vit
from vit_jax.models import text as text_model


# Tiny models: compiling dominates, not running. XLA's HLO passes (fusion, layouts) are
# unchanged; kernels come from the classic elemental emitters instead of the MLIR fusion emitters
# (bit-identical outputs here) without LLVM's optimisation passes (fp32 rounding-level changes,
# ~1e-7 relative): ~2.5x faster compiles (nano forward 1.4 s -> 0.6 s).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def run(model, variables, *args, **kwargs):
  """model.apply, jitted at -O0, outputs as numpy (eager op-by-op dispatch compiles every
  primitive separately and is slower still on a cold process). Compiles once per call: callers
  put everything a test needs into one call (`method=` a function of the module)."""
  fn = jax.jit(functools.partial(model.apply, **kwargs), compiler_options=FAST_COMPILE)
  return jax.tree.map(np.asarray, fn(variables, *args))


def _random_params(model, *args, seed=0):
  """Params for `model` without compiling its init: shapes from jax.eval_shape, LayerNorm scales
  1 + N(0, 0.1^2), every other leaf N(0, 0.1^2) (float32 numpy)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: (np.float32(path[-1].key == "scale")
                       + 0.1 * rng.normal(size=a.shape)).astype(np.float32), shapes)


def _model(name="nano", **overrides):
  c = models.get_owl_vit_config(name)
  for k, v in overrides.items():
    c[k] = v
  return owl_vit.OwlViT(**models.owl_vit_kwargs(c)), c


def _images(c, batch=2, seed=0):
  s = c.image_size
  return np.random.default_rng(seed).normal(size=(batch, s, s, 3)).astype(np.float32)


def _tokens(batch, queries, length=16, seed=0, vocab=49408):
  rng = np.random.default_rng(seed)
  tok = np.zeros((batch, queries, length), np.int32)
  tok[..., 0] = vocab - 2
  tok[..., 1:5] = rng.integers(1, vocab - 2, (batch, queries, 4))
  tok[..., 5] = vocab - 1
  return tok


def _heads(m, feats, queries):
  return m.class_predictor(feats, queries), m.box_predictor(feats)


@pytest.fixture(scope="module")
def nano():
  """The nano detector with its heads as initialised (a real `init`: their values are under
  test) on drawn tower params, image 0's last query padding (its token row starts with 0).

  The heads are initialised on their own (`method=`): flax draws a param from its module path,
  so they are what a full `model.init` gives them, and the compile skips the towers' ~60
  initialisers (seconds)."""
  model, c = _model()
  x, tok = _images(c), _tokens(2, 3)
  tok[0, 2] = 0
  params = _random_params(model, x, tok)
  grid = c.image_size // c.image.patches.size[0]
  feats = np.zeros((2, grid, grid, c.image.hidden_size), np.float32)
  init = jax.jit(functools.partial(model.init, method=_heads), compiler_options=FAST_COMPILE)
  heads = init(jax.random.PRNGKey(0), feats, np.zeros((2, 3, c.embed_dim), np.float32))["params"]
  assert set(heads) == {"class_head", "box_head"}
  return model, c, {**params, **jax.tree.map(np.asarray, heads)}, x, tok


QUERY_MASK = np.array([[True, True, False], [True, True, True]])


def _tokens_then_embeds(m, x, tok, mask):
  """The forward pass with text queries, then again with those queries' embeddings as given
  `query_embeds` masked by `mask` [b, q]."""
  out = m(x, tok)
  return out, m(x, query_embeds=out["query_embeds"], query_mask=mask)


@pytest.fixture(scope="module")
def nano_out(nano):
  model, _, params, x, tok = nano
  return run(model, {"params": params}, x, tok, QUERY_MASK, method=_tokens_then_embeds)


@pytest.mark.parametrize("objectness", [False, True])
def test_shapes_and_param_tree(objectness):
  model, c = _model(objectness=objectness)
  b, q, n, w, e = 2, 3, 16, 32, 32
  x = jax.ShapeDtypeStruct((b, 16, 16, 3), jnp.float32)
  tok = jax.ShapeDtypeStruct((b, q, 16), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, tok)["params"]
  heads = {"class_head", "box_head", "merged_class_token"} | ({"objectness_head"} if objectness
                                                               else set())
  assert set(params) == {"img", "txt"} | heads
  assert "head" not in params["img"]  # no visual projection
  assert set(params["img"]["Transformer"]) == {"posembed_input", "pre_norm", "encoderblock_0",
                                               "encoderblock_1", "encoder_norm"}
  assert params["txt"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, w)
  assert params["txt"]["head"]["kernel"].shape == (w, e)
  assert set(params["class_head"]) == {"dense0", "logit_shift", "logit_scale"}
  assert params["class_head"]["dense0"]["kernel"].shape == (w, e)
  assert {k: params["box_head"][k]["kernel"].shape for k in params["box_head"]} == {
      "dense0": (w, w), "dense1": (w, w), "dense2": (w, 4)}
  assert params["merged_class_token"]["scale"].shape == (w,)
  out = jax.eval_shape(lambda p, x, t: model.apply({"params": p}, x, t), params, x, tok)
  want = {"pred_logits": (b, n, q), "pred_boxes": (b, n, 4), "class_embeds": (b, n, e),
          "image_feats": (b, n, w), "query_embeds": (b, q, e)}
  if objectness:
    want["objectness_logits"] = (b, n)
    assert params["objectness_head"]["dense2"]["kernel"].shape == (w, 1)
  assert {k: v.shape for k, v in out.items()} == want
  # Without queries: class embeddings only.
  out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
  assert "pred_logits" not in out and out["class_embeds"].shape == (b, n, e)


def _logit(p, eps=1e-4):
  return np.log(p + eps) - np.log(1 - p + eps)


def test_box_bias_closed_form():
  # 2x2 grid, row-major tokens: bottom-right corners (0.5, 0.5), (1, 0.5), (0.5, 1), (1, 1),
  # sizes 1/2: logit(0.5) = 0 exactly, logit(1) = log(1.0001 / 1e-4).
  b = owl_vit.box_bias(2, 2)
  one = np.log(1.0001) - np.log(1e-4)
  want = np.array([[0, 0, 0, 0], [one, 0, 0, 0], [0, one, 0, 0], [one, one, 0, 0]])
  np.testing.assert_allclose(b, want, atol=1e-6)
  # Non-square 2 rows x 3 cols: x = (1, 2, 3) / 3, y = (1, 2) / 2, sizes (1/3, 1/2).
  b = owl_vit.box_bias(2, 3)
  xs, ys = np.array([1, 2, 3]) / 3, np.array([1, 2]) / 2
  want = [[_logit(xs[c]), _logit(ys[r]), _logit(1 / 3), _logit(1 / 2)]
          for r in range(2) for c in range(3)]
  np.testing.assert_allclose(b, np.array(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(owl_vit.box_bias(2, 3, "location")[:, 2:], 0)
  np.testing.assert_array_equal(owl_vit.box_bias(2, 3, "size")[:, :2], 0)
  with pytest.raises(ValueError, match="box_bias"):
    owl_vit.box_bias(2, 2, "corners")


def test_boxes_at_init_are_the_prior(nano, nano_out):
  params = nano[2]
  out, _ = nano_out
  prior = 1 / (1 + np.exp(-owl_vit.box_bias(4, 4).astype(np.float64)))
  np.testing.assert_allclose(np.asarray(out["pred_boxes"]), np.broadcast_to(prior, (2, 16, 4)),
                             atol=1e-6)
  # The class prior: logit_shift's bias starts at logit(0.01).
  np.testing.assert_allclose(params["class_head"]["logit_shift"]["bias"],
                             [np.log(0.01 / 0.99)], rtol=1e-6)


def test_query_masking(nano, nano_out):
  model, _, params, x, tok = nano
  assert tok[0, 2, 0] == 0  # a padding query: its row starts with token 0
  out, out2 = nano_out
  logits = out["pred_logits"]
  np.testing.assert_array_equal(logits[0, :, 2], -1e6)
  assert np.all(logits[0, :, :2] > -1e5) and np.all(logits[1] > -1e5)
  # The same queries as embeddings, masked by query_mask instead: identical logits.
  assert not QUERY_MASK[0, 2]
  np.testing.assert_allclose(out2["pred_logits"], logits, rtol=1e-6, atol=1e-6)
  # Reference for a valid logit: (cos(class_embed, query) + shift) * (elu(scale) + 1).
  feats = np.asarray(out["image_feats"], np.float64)
  ch = jax.tree.map(lambda a: np.asarray(a, np.float64), params["class_head"])
  ce = feats @ ch["dense0"]["kernel"] + ch["dense0"]["bias"]
  ce /= np.linalg.norm(ce, axis=-1, keepdims=True) + 1e-6
  qe = np.asarray(out["query_embeds"], np.float64)
  qe /= np.linalg.norm(qe, axis=-1, keepdims=True) + 1e-6
  shift = feats @ ch["logit_shift"]["kernel"] + ch["logit_shift"]["bias"]
  s = feats @ ch["logit_scale"]["kernel"] + ch["logit_scale"]["bias"]
  scale = np.where(s > 0, s, np.expm1(s)) + 1
  ref = (np.einsum("bpd,bqd->bpq", ce, qe) + shift) * scale
  np.testing.assert_allclose(logits[1], ref[1], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="either tokens or query_embeds"):  # raised before compute
    model.apply({"params": params}, x, tok, query_embeds=out["query_embeds"])


def _iou_giou(a, b):
  """One xyxy box a [4] against boxes b [n, 4], as plain numpy (HF's box_iou/generalized)."""
  lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  union = area(a) + area(b) - inter
  iou = inter / union
  enc = np.prod(np.clip(np.maximum(a[2:], b[:, 2:]) - np.minimum(a[:2], b[:, :2]), 0, None), -1)
  return iou, iou - (enc - union) / enc


def _reference_query(class_embeds, boxes, query_box):
  """The per-example loop of HF's embed_image_query, with scenic's 1.2x threshold when the
  fallback GIoU is negative."""
  to_xyxy = lambda c: np.concatenate([c[..., :2] - c[..., 2:] / 2, c[..., :2] + c[..., 2:] / 2], -1)
  iou, giou = _iou_giou(to_xyxy(query_box), to_xyxy(boxes))
  scores = giou if np.all(iou == 0) else iou
  best = scores.max()
  selected = np.nonzero(scores >= (0.8 * best if best > 0 else 1.2 * best))[0]
  sim = class_embeds[selected] @ class_embeds.mean(0)
  return selected[np.argmin(sim)], selected


def _query_then_detect(m, xs, q):
  """embed_image_query, the class embeddings and boxes it chose from, and a detection with the
  chosen embeddings on the same images: one compiled function."""
  embeds, index = m.embed_image_query(xs, q)
  feats = m.image_features(xs)
  ce = m.class_predictor(feats)["class_embeds"]
  detect = m.class_predictor(feats, embeds[:, None])
  return embeds, index, ce, m.box_predictor(feats), detect


def test_embed_image_query_constructed(nano):
  model, _, params, x, _ = nano
  # At init the boxes are the prior: one-patch boxes (1/4) centred on the 4x4 grid's corners,
  # token (r, c) at ((c + 1) / 4, (r + 1) / 4).
  q = np.array([[0.5, 0.5, 0.25, 0.25],     # exactly token 5 (r=1, c=1)
                [0.625, 0.5, 0.5, 0.25],    # tokens 5 and 6 half each: IoU 0.5, 0.5
                [1.2, 1.2, 0.1, 0.1]],      # outside: every IoU 0, GIoU picks token 15 (nearest)
               np.float32)
  xs = np.concatenate([x, x[:1]])
  embeds, index, ce, boxes, out = run(model, {"params": params}, xs, q, method=_query_then_detect)
  want, selected = zip(*(_reference_query(ce[i], boxes[i], q[i]) for i in range(3)))
  assert list(selected[0]) == [5] and list(selected[1]) == [5, 6]
  assert list(selected[2]) == [15]
  np.testing.assert_array_equal(index, want)
  np.testing.assert_allclose(embeds, ce[np.arange(3), want], rtol=1e-6)
  # Then a detection with that query embedding on the target image.
  assert out["pred_logits"].shape == (3, 16, 1)


def test_presets():
  sizes = {"b32": (768, 32, False), "b16": (768, 16, False), "l14": (840, 14, False),
           "v2_b16": (960, 16, True), "v2_l14": (1008, 14, True)}
  for name, (size, patch, obj) in sizes.items():
    c = models.get_owl_vit_config(name)
    assert (c.image_size, c.image.patches.size[0], c.objectness) == (size, patch, obj)
    assert c.text.context_length == 16 and c.embed_dim == c.text.width
    kwargs = models.owl_vit_kwargs(c)
    assert not {"image_size", "logit_scale_init", "logit_bias_init"} & set(kwargs)
    owl_vit.OwlViT(**kwargs)  # every key is a module field
  assert models.get_owl_vit_config("l14").image.hidden_size == 1024
  with pytest.raises(ValueError, match="Unknown OWL-ViT model"):
    models.get_owl_vit_config("b8")


# ----------------------------------------------------------------------------------------------
# Text tower: EOT pooling by id, and the added-vocabulary table.

TXT = dict(embed_dim=8, width=16, num_layers=1, num_heads=2, mlp_dim=32, vocab_size=20,
           context_length=8, extra_tokens=3)  # ids 20..22: the added vocabulary
EOT = 19


@pytest.fixture(scope="module")
def txt_params():
  """Random params of the text tower with 3 extra ids (drawn, not initialised: only the trees
  must agree between the variants compared below)."""
  model = text_model.TextTransformer(**TXT)
  return _random_params(model, np.zeros((1, 8), np.int32), seed=1)


def test_text_eot_token_id_pooling(txt_params):
  tok = np.array([[18, 3, 4, EOT, 0, 0, 0, 0],
                  [18, 21, 22, 5, EOT, EOT, 0, 0]], np.int32)  # 21, 22: added ids above the EOT
  base = text_model.TextTransformer(**TXT)
  by_id = text_model.TextTransformer(**{**TXT, "eot_token_id": EOT})

  def pool(v, tok):
    return by_id.apply(v, tok, return_tokens=True), base.apply(v, tok)

  (pooled, x), argmax = jax.tree.map(
      np.asarray, jax.jit(pool, compiler_options=FAST_COMPILE)({"params": txt_params}, tok))
  head = txt_params["head"]["kernel"]
  first = [3, 4]  # the first position holding the EOT id
  np.testing.assert_allclose(pooled, x[np.arange(2), first] @ head, rtol=1e-5, atol=1e-6)
  # None keeps argmax pooling: row 1's argmax is the added id 22 at position 2.
  np.testing.assert_allclose(argmax, x[np.arange(2), [3, 2]] @ head, rtol=1e-5, atol=1e-6)


def test_text_extra_tokens(txt_params):
  params = txt_params
  extra = text_model.TextTransformer(**TXT)
  plain = text_model.TextTransformer(**{**TXT, "extra_tokens": 0})
  assert params["extra_token_embedding"]["embedding"].shape == (3, 16)
  assert params["token_embedding"]["embedding"].shape == (20, 16)
  shared = {k: v for k, v in params.items() if k != "extra_token_embedding"}
  # One table of vocab + 3 rows: what ids >= vocab_size should see.
  big_id = text_model.TextTransformer(**{**TXT, "vocab_size": 23, "extra_tokens": 0,
                                         "eot_token_id": EOT})
  by_id = text_model.TextTransformer(**{**TXT, "eot_token_id": EOT})
  table = np.concatenate([params["token_embedding"]["embedding"],
                          params["extra_token_embedding"]["embedding"]])
  big_params = {**shared, "token_embedding": {"embedding": table}}
  tok = np.array([[18, 3, 4, EOT, 0, 0, 0, 0]], np.int32)
  tok2 = np.array([[18, 20, 22, 3, 21, EOT, 0, 0]], np.int32)

  def compute(params, shared, big_params):
    grad = jax.grad(lambda p: jnp.sum(extra.apply({"params": p}, tok)))(params)
    return (extra.apply({"params": params}, tok), plain.apply({"params": shared}, tok),
            by_id.apply({"params": params}, tok2), big_id.apply({"params": big_params}, tok2),
            grad)

  with_extra, without, ours2, big2, g = jax.tree.map(
      np.asarray, jax.jit(compute, compiler_options=FAST_COMPILE)(params, shared, big_params))
  # Ids below vocab_size: exactly the model without the table (same shared params).
  np.testing.assert_array_equal(with_extra, without)
  # Ids >= vocab_size: what one table of vocab + 3 rows computes.
  np.testing.assert_allclose(ours2, big2, rtol=1e-6, atol=1e-6)
  # Gradients reach the extra table only through extra ids.
  np.testing.assert_array_equal(g["extra_token_embedding"]["embedding"], 0)
  assert np.any(g["token_embedding"]["embedding"] != 0)
