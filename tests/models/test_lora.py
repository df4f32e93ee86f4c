"""models/lora.py and the adaptation presets (configs/param_groups.py): the merge against einsum
projections and an unmerged adapter forward, gradients against the closed form, training through
optim.make_optimizer (only the adapters move, no optimizer state for the base), LiT / locked text
on a CLIP tree."""
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import optim
from vit_jax.configs import common
from vit_jax.configs import models as model_configs
from vit_jax.configs import param_groups as presets
from vit_jax.models import lora
from vit_jax.models import vit

BLOCK = "Transformer/encoderblock_1"
ATTN = f"{BLOCK}/MultiHeadDotProductAttention_1"
IMAGES = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)


def _perturbed(shapes, seed=0):
  """Random params in `shapes`' tree (zero-init heads and unit LayerNorms would hide errors)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def nano_vit():
  """(model, params) of the nano ViT (width 32, 2 blocks, 2 heads, patch 4) on 16x16 images."""
  config = model_configs.get_model_config("nano4")
  model = vit.VisionTransformer(num_classes=5, **model_configs.model_kwargs(config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IMAGES[:1]))["params"]
  return model, _perturbed(shapes)


@pytest.fixture(scope="module")
def clip_params():
  """A CLIP-shaped params tree: models/clip.py's nano CLIP (or, without it, nano ViTs under
  img/txt)."""
  try:
    from vit_jax.models import clip  # pylint: disable=g-import-not-at-top
  except ImportError:
    clip = None
  if clip is not None:
    config = model_configs.get_clip_config("nano")
    config.text.vocab_size = 64  # the tree's shape is what matters; 49408 rows only cost time
    model = clip.CLIP(**model_configs.clip_kwargs(config))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IMAGES[:1],
                                               jnp.ones((1, 77), jnp.int32)))["params"]
  else:
    tower = vit.VisionTransformer(num_classes=8, **model_configs.model_kwargs(
        model_configs.get_model_config("nano4")))
    t = jax.eval_shape(lambda: tower.init(jax.random.PRNGKey(0), IMAGES[:1]))["params"]
    shapes = {"img": t, "txt": t, "logit_scale": jax.ShapeDtypeStruct((), jnp.float32)}
  return _perturbed(shapes)


def _flat(tree):
  return dict(zip(optim.param_paths(tree), jax.tree.leaves(tree)))


def _randomize_adapters(params, seed=1):
  """The adapters with a nonzero B (at init B = 0 makes every check trivially pass)."""
  rng = np.random.default_rng(seed)
  return {**params, "lora": jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params["lora"])}


def _config(**kw):
  c = common.get_base_config()
  c.update(dict(optimizer="adamw", base_lr=0.01, decay_type="constant", warmup_steps=0,
                total_steps=100, weight_decay=0.1, grad_norm_clip=1.0))
  c.update(kw)
  return c


def test_zero_b_is_identity(nano_vit):
  model, params = nano_vit
  adapted = lora.add_lora(params, rank=4, targets=r".*/kernel", rng=jax.random.PRNGKey(0))
  # Every kernel, conv patch embedding and attention `out` included.
  assert len(adapted["lora"]) == len(lora.kernel_paths(params)) == 1 + 2 * 6 + 1
  merged = lora.merge_lora(adapted, alpha=16.0)
  assert "lora" not in merged
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  apply = jax.jit(lambda p: model.apply({"params": p}, IMAGES))
  np.testing.assert_array_equal(apply(merged), apply(params))
  assert lora.merge_lora(params, alpha=16.0) is params  # no adapters: untouched
  # A FrozenDict comes back frozen.
  frozen = lora.merge_lora(flax.core.freeze(adapted), alpha=16.0)
  assert isinstance(frozen, flax.core.FrozenDict) and "lora" not in frozen


def test_init_shapes_and_scale(nano_vit):
  _, params = nano_vit
  adapted = lora.add_lora(params, rank=4, targets=presets.LORA_TARGETS, rng=jax.random.PRNGKey(0))
  names = sorted(adapted["lora"])
  assert names == sorted(f"Transformer.encoderblock_{i}.MultiHeadDotProductAttention_1.{p}.kernel"
                         for i in range(2) for p in ("query", "value"))
  width = 32
  for ab in adapted["lora"].values():
    assert ab["a"].shape == (width, 4) and ab["b"].shape == (4, width)
    np.testing.assert_array_equal(ab["b"], 0.0)
  # A ~ N(0, 1/fan_in): over 4 adapters x 128 draws the sample variance is within ~25%.
  a = np.concatenate([np.ravel(ab["a"]) for ab in adapted["lora"].values()])
  assert abs(a.var() * width - 1.0) < 0.25
  assert lora.lora_param_count(adapted) == 4 * (width * 4 + 4 * width)
  assert lora.lora_param_count(params) == 0
  # Each adapter's init depends on its own path, not on which other kernels are targeted.
  only_q = lora.init_lora(params, rank=4, targets=rf"{ATTN}/query/kernel",
                          rng=jax.random.PRNGKey(0))
  name = lora.escape(f"{ATTN}/query/kernel")
  np.testing.assert_array_equal(only_q[name]["a"], adapted["lora"][name]["a"])


@pytest.mark.parametrize("target,projection", [
    # Dense [in, out]: x [b, in].
    ("MlpBlock_3/Dense_0/kernel", "bi,io->bo"),
    # query/key/value [width, heads, head_dim]: x [b, width] -> [b, heads, head_dim].
    ("MultiHeadDotProductAttention_1/query/kernel", "bw,whk->bhk"),
    ("MultiHeadDotProductAttention_1/key/kernel", "bw,whk->bhk"),
    ("MultiHeadDotProductAttention_1/value/kernel", "bw,whk->bhk"),
    # out [heads, head_dim, width]: per-head outputs [b, heads, head_dim] -> [b, width].
    ("MultiHeadDotProductAttention_1/out/kernel", "bhk,hkw->bw"),
])
def test_merged_projection_equals_low_rank_update(nano_vit, target, projection):
  """x . W' == x . W + s (x_flat @ A) @ B, with the contraction written as an einsum over the
  kernel's own axes: checks which axes merge_lora treats as the input."""
  _, params = nano_vit
  path = f"{BLOCK}/{target}"
  rank, alpha = 3, 6.0
  adapted = _randomize_adapters(lora.add_lora(params, rank=rank, targets=re.escape(path),
                                              rng=jax.random.PRNGKey(0)))
  w = np.asarray(_flat(params)[path], np.float64)
  a, b = (np.asarray(adapted["lora"][lora.escape(path)][k], np.float64) for k in ("a", "b"))
  w_merged = np.asarray(_flat(lora.merge_lora(adapted, alpha))[path], np.float64)
  in_axes = len(projection.split(",")[0]) - 1  # the kernel's leading axes x contracts with
  x = np.random.default_rng(2).normal(size=(5,) + w.shape[:in_axes])
  got = np.einsum(projection, x, w_merged)
  want = np.einsum(projection, x, w) + (alpha / rank) * (
      (x.reshape(5, -1) @ a) @ b).reshape(got.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merged_patch_embedding_equals_low_rank_update(nano_vit):
  """The conv kernel [ph, pw, c, width]: fan_in is one whole patch, in the model's order."""
  model, params = nano_vit
  path = "embedding/kernel"
  adapted = _randomize_adapters(lora.add_lora(params, rank=2, targets=path,
                                              rng=jax.random.PRNGKey(0)))
  merged = lora.merge_lora(adapted, alpha=4.0)
  w = np.asarray(params["embedding"]["kernel"], np.float64)
  ab = adapted["lora"]["embedding.kernel"]
  a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
  patch = IMAGES[:, :4, :4, :].astype(np.float64)  # the top-left patch of each image
  want = (np.einsum("bijc,ijcd->bd", patch, w) + params["embedding"]["bias"]
          + 2.0 * (patch.reshape(4, -1) @ a) @ b)
  got = vit.PatchEmbedding(32, (4, 4)).apply({"params": merged["embedding"]}, IMAGES)[:, 0, 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _adapter_forward(model, params, alpha, images):
  """The model run on its BASE params with every adapted nn.Dense computing
  x W + b + (alpha / rank) (x A) B on the side (a fused LoRA layer, no merge)."""
  adapters = {lora.unescape(k): v for k, v in params["lora"].items()}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    ab = adapters.get("/".join(module.path) + "/kernel")
    y = next_fun(*args, **kwargs)
    if ab is None:
      return y
    rank = ab["a"].shape[1]
    return y + (alpha / rank) * (args[0] @ ab["a"]) @ ab["b"]

  with nn.intercept_methods(interceptor):
    return model.apply({"params": lora.base_params(params)}, images)


def test_merged_export_equals_adapter_forward(nano_vit):
  model, params = nano_vit
  alpha = 8.0
  adapted = _randomize_adapters(lora.add_lora(
      params, rank=4, targets=r".*/MlpBlock_3/Dense_\d/kernel|head/kernel",
      rng=jax.random.PRNGKey(3)))
  assert len(adapted["lora"]) == 5
  # Export: fold, then leave jax (as a checkpoint writer would) and load into the plain model.
  exported = jax.tree.map(np.asarray, jax.jit(lora.merge_lora, static_argnums=1)(adapted, alpha))
  got = model.apply({"params": exported}, IMAGES)
  want = _adapter_forward(model, adapted, alpha, IMAGES)
  base = model.apply({"params": params}, IMAGES)
  assert np.abs(np.asarray(want - base)).max() > 1e-2  # the adapters do change the output
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_adapters(nano_vit):
  """dL/dB = s A^T dL/dW' and dL/dA = s dL/dW' B^T (flattened to [fan_in, fan_out])."""
  model, params = nano_vit
  path = f"{ATTN}/out/kernel"
  rank, alpha = 2, 3.0
  adapted = _randomize_adapters(lora.add_lora(params, rank=rank, targets=path,
                                              rng=jax.random.PRNGKey(0)))
  merge = lambda p: lora.merge_lora(p, alpha)
  merged, merge_vjp = jax.vjp(merge, adapted)
  g_merged = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, IMAGES) ** 2)))(merged)
  grads, = merge_vjp(g_merged)  # the chain rule through merge_lora, as jax.grad(loss . merge)
  g_w = np.asarray(_flat(g_merged)[path], np.float64).reshape(32, 32)  # [heads*head_dim, width]
  ab = adapted["lora"][lora.escape(path)]
  a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
  s = alpha / rank
  g = grads["lora"][lora.escape(path)]
  np.testing.assert_allclose(g["b"], s * a.T @ g_w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g["a"], s * g_w @ b.T, rtol=1e-4, atol=1e-6)


def test_lora_preset_trains_only_adapters(nano_vit):
  model, params = nano_vit
  config = _config(**presets.lora(rank=4, alpha=16.0))
  assert config.lora.rank == 4 and config.lora.targets == presets.LORA_TARGETS
  adapted = lora.add_lora(params, rank=config.lora.rank, targets=config.lora.targets,
                          rng=jax.random.PRNGKey(0))
  tx, schedules = optim.make_optimizer(config, adapted)
  assert set(schedules) == {"lora"}
  state = tx.init(adapted)
  labels = jax.nn.one_hot(np.arange(4) % 5, 5)

  @jax.jit
  def step(p, state):
    def loss(p):
      logits = model.apply({"params": lora.merge_lora(p, config.lora.alpha)}, IMAGES)
      return optax.softmax_cross_entropy(logits, labels).mean()
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  new = adapted
  for _ in range(3):  # A gets a gradient only once B != 0: from the second step on
    new, state = step(new, state)
  p0, p3 = _flat(adapted), _flat(new)
  for path in p0:
    if path.startswith("lora/"):
      assert not np.array_equal(p3[path], p0[path]), path
    else:
      np.testing.assert_array_equal(p3[path], p0[path])  # bit-identical
  # AdamW's mu and nu exist for the adapters only; the rest of the state is step counts.
  lora_bytes = optim.tree_bytes(adapted["lora"])
  state_bytes = optim.tree_bytes(state)
  assert 2 * lora_bytes <= state_bytes <= 2 * lora_bytes + 64
  assert optim.tree_bytes(params) > 10 * lora_bytes
  assert jax.tree.leaves(state[-1].inner_states["frozen"]) == []


def test_jit_and_eval_shape(nano_vit):
  _, params = nano_vit
  shapes = jax.eval_shape(lambda p: lora.add_lora(p, rank=2, targets=presets.LORA_TARGETS,
                                                  rng=jax.random.PRNGKey(0)), params)
  assert shapes["lora"][lora.escape(f"{ATTN}/value/kernel")]["a"].shape == (32, 2)
  adapted = _randomize_adapters(lora.add_lora(params, rank=2, targets=presets.LORA_TARGETS,
                                              rng=jax.random.PRNGKey(0)))
  eager = lora.merge_lora(adapted, 16.0)
  jitted = jax.jit(lora.merge_lora, static_argnums=1)(adapted, 16.0)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert jax.eval_shape(lambda p: lora.merge_lora(p, 16.0), adapted)["cls"].shape == (1, 1, 32)


def test_bfloat16_kernels_merge_in_their_dtype(nano_vit):
  _, params = nano_vit
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  adapted = _randomize_adapters(lora.add_lora(params16, rank=2, targets=presets.LORA_TARGETS,
                                              rng=jax.random.PRNGKey(0)))
  assert adapted["lora"][lora.escape(f"{ATTN}/query/kernel")]["a"].dtype == jnp.bfloat16
  merged = lora.merge_lora(adapted, 16.0)
  assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}


def test_errors(nano_vit):
  _, params = nano_vit
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"match no kernel.*'head/kernel'"):
    lora.init_lora(params, rank=2, targets="txt/.*", rng=key)
  with pytest.raises(ValueError, match=r"rank=0"):
    lora.init_lora(params, rank=0, targets=presets.LORA_TARGETS, rng=key)
  adapted = lora.add_lora(params, rank=2, targets=presets.LORA_TARGETS, rng=key)
  with pytest.raises(ValueError, match=r"already hold a 'lora' subtree with 4 adapters"):
    lora.add_lora(adapted, rank=2, targets=presets.LORA_TARGETS, rng=key)
  name = lora.escape(f"{ATTN}/out/kernel")
  bad = {**adapted, "lora": {name: {"a": jnp.zeros((16, 2)), "b": jnp.zeros((2, 32))}}}
  with pytest.raises(ValueError, match=r"expected a \[32, r\] and b \[r, 32\], found a \(16, 2\)"):
    lora.merge_lora(bad, 16.0)
  bad = {**adapted, "lora": {"txt.head.kernel": {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 4))}}}
  with pytest.raises(KeyError, match=r"'txt/head/kernel', which is not in the base params"):
    lora.merge_lora(bad, 16.0)
  with pytest.raises(ValueError, match=r"shape \(2, 3, 4\)"):
    lora.kernel_in_axes("foo/kernel", (2, 3, 4))


def test_config_defaults_and_preset_update():
  c = common.get_base_config()
  assert c.lora.rank == 0 and c.lora.alpha == 16.0 and c.lora.targets == presets.LORA_TARGETS
  c.update(presets.lora(rank=8, targets=r".*/query/kernel"))
  assert (c.lora.rank, c.lora.alpha, c.lora.targets) == (8, 16.0, r".*/query/kernel")
  with pytest.raises(ValueError, match=r"rank=0"):
    presets.lora(rank=0)
  with pytest.raises(ValueError, match=r"unknown towers \['image'\]"):
    presets.clip_full(tower_lr_mult={"image": 0.1})


def test_lora_default_targets_on_clip(clip_params):
  adapted = lora.add_lora(clip_params, rank=2, targets=presets.LORA_TARGETS,
                          rng=jax.random.PRNGKey(0))
  towers = sorted({name.split(".")[0] for name in adapted["lora"]})
  assert towers == ["img", "txt"]
  assert len(adapted["lora"]) == 2 * 2 * 2  # towers x blocks x (query, value)
  assert all(re.fullmatch(r"(img|txt)\.Transformer\.encoderblock_\d\.MultiHead"
                          r"DotProductAttention_1\.(query|value)\.kernel", n)
             for n in adapted["lora"])
  tx, _ = optim.make_optimizer(_config(**presets.lora()), adapted)
  assert optim.tree_bytes(jax.eval_shape(tx.init, adapted)) <= (
      2 * optim.tree_bytes(adapted["lora"]) + 64)


def _steps(config, params, n=3):
  """n AdamW steps with fixed random grads; returns (params, optimizer state)."""
  rng = np.random.default_rng(7)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(grads, s, p))
  for _ in range(n):
    updates, state = update(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("preset,locked,head_trains", [
    (presets.lit(), "img", False),
    (presets.lit(train_head=True), "img", True),
    (presets.locked_text(), "txt", False),
])
def test_locked_tower_bit_identical(clip_params, preset, locked, head_trains):
  new, state = _steps(_config(**preset), clip_params)
  p0, p1 = _flat(clip_params), _flat(new)
  for path in p0:
    stays = path.startswith(f"{locked}/") and not (head_trains and
                                                   path.startswith(f"{locked}/head/"))
    if stays:
      np.testing.assert_array_equal(p1[path], p0[path], err_msg=path)
    else:
      assert not np.array_equal(p1[path], p0[path]), path
  assert jax.tree.leaves(state[-1].inner_states[f"{locked}_locked"]) == []
  locked_bytes = sum(optim.tree_bytes(v) for p, v in p0.items() if p.startswith(f"{locked}/")
                     and not (head_trains and p.startswith(f"{locked}/head/")))
  tx_full, _ = optim.make_optimizer(_config(), clip_params)
  state_full = jax.eval_shape(tx_full.init, clip_params)
  # Only the moment arrays: each group keeps its own scalar step counts.
  moments = lambda st: optim.tree_bytes([x for x in jax.tree.leaves(st) if x.ndim])
  assert moments(state_full) - moments(state) == 2 * locked_bytes


def test_clip_full_tower_lr_mult(clip_params):
  zeros = jax.tree.map(jnp.zeros_like, clip_params)
  config = _config(optimizer="sgd", momentum=0.0, weight_decay=0.0, grad_norm_clip=0.0,
                   **presets.clip_full(tower_lr_mult={"img": 0.1}))
  new, _ = _steps(config, zeros, n=1)  # plain SGD from 0: the params are -lr * mult * grads
  rng = np.random.default_rng(7)
  grads = _flat(jax.tree.map(lambda x: rng.normal(size=x.shape), clip_params))
  for path, value in _flat(new).items():
    mult = 0.1 if path.startswith("img/") else 1.0
    np.testing.assert_allclose(value, -0.01 * mult * grads[path], rtol=1e-5, err_msg=path)
