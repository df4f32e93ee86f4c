"""optim.py against closed forms: LR multipliers, freezing, weight-decay mask, layer-wise decay,
schedules, bf16 momentum, and optax.adafactor as the reference for our Adafactor."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import optim
from vit_jax.configs import common
from vit_jax.configs import param_groups as presets
from vit_jax.configs.models import get_model_config, model_kwargs
from vit_jax.models.vit import VisionTransformer

LR = 0.1


@pytest.fixture(scope="module")
def shapes():
  """The nano ViT's param shapes (2 blocks, width 32), without running the model."""
  model = VisionTransformer(num_classes=10, **model_kwargs(get_model_config("nano4")))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))
  return variables["params"]


def _random(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def _config(**kw):
  """Plain SGD at a constant LR: each test turns on only what it checks."""
  c = common.get_base_config()
  c.update(dict(optimizer="sgd", momentum=0.0, grad_norm_clip=0.0, weight_decay=0.0,
                base_lr=LR, decay_type="constant", warmup_steps=0, total_steps=100))
  c.update(kw)
  return c


def _steps(config, params, grads, n=1):
  """n jitted steps with the same grads; returns (params, opt_state, schedules)."""
  tx, schedules = optim.make_optimizer(config, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(n):
    params, state = step(params, state)
  return params, state, schedules


def _flat(tree):
  return dict(zip(optim.param_paths(tree), jax.tree.leaves(tree)))


def _zeros(shapes):
  # Plain SGD ignores the params; starting at 0 makes the new params the update itself, free of
  # float32 cancellation in (p1 - p0).
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def test_lr_mult_head_moves_10x(shapes):
  params, grads = _zeros(shapes), _random(shapes, 1)
  groups = lambda m: [("head/.*", dict(name="head", lr_mult=m)), (".*", dict(name="rest"))]
  p10, _, sched = _steps(_config(param_groups=groups(10.0)), params, grads)
  p1, _, _ = _steps(_config(param_groups=groups(1.0)), params, grads)
  assert set(sched) == {"head", "rest"}
  assert float(sched["head"](0)) == pytest.approx(10 * LR)
  p0, g, p10, p1 = _flat(params), _flat(grads), _flat(p10), _flat(p1)
  for path in p0:
    d10, d1 = np.asarray(p10[path] - p0[path]), np.asarray(p1[path] - p0[path])
    mult = 10.0 if path.startswith("head/") else 1.0
    np.testing.assert_allclose(d10, -LR * mult * np.asarray(g[path]), rtol=1e-6)
    if mult == 1.0:
      np.testing.assert_array_equal(d10, d1)
    else:
      np.testing.assert_allclose(d10, 10 * d1, rtol=1e-6)


def _partition_state(state):
  """The optax.multi_transform state inside our chain (the last element)."""
  inner = state[-1]
  assert hasattr(inner, "inner_states"), type(inner)
  return inner.inner_states


def test_frozen_params_bit_identical_and_stateless(shapes):
  params, grads = _random(shapes, 0), _random(shapes, 1)
  frozen_regex = "Transformer/encoderblock_0/.*"
  kw = dict(optimizer="adamw", grad_norm_clip=1.0, weight_decay=0.1, warmup_steps=2)
  frozen_cfg = _config(param_groups=[(frozen_regex, dict(name="frozen", frozen=True)),
                                     (".*", dict(name="rest"))], **kw)
  new, state, sched = _steps(frozen_cfg, params, grads, n=3)
  _, state_all, _ = _steps(_config(**kw), params, grads, n=1)
  assert set(sched) == {"rest"}  # nothing to log for a frozen group

  p0, p3 = _flat(params), _flat(new)
  frozen = [p for p in p0 if re.fullmatch(frozen_regex, p)]
  assert frozen and len(frozen) < len(p0)
  for path in p0:
    if path in frozen:
      np.testing.assert_array_equal(p3[path], p0[path])  # bit-identical
    else:
      assert not np.array_equal(p3[path], p0[path]), path
  # The frozen group's own state holds no arrays, and Adam's mu/nu exist only for trainable leaves.
  inner = _partition_state(state)
  assert jax.tree.leaves(inner["frozen"]) == []
  trainable_leaves = len(p0) - len(frozen)
  slot_leaves = [x for x in jax.tree.leaves(inner["rest"]) if x.ndim > 0]
  assert len(slot_leaves) == 2 * trainable_leaves
  # Bytes: AdamW holds mu and nu (float32) per trainable leaf; freezing drops exactly those.
  frozen_bytes = sum(p0[p].size * 4 for p in frozen)
  assert optim.tree_bytes(state_all) - optim.tree_bytes(state) == 2 * frozen_bytes
  assert optim.tree_bytes(jax.eval_shape(lambda: state)) == optim.tree_bytes(state)


def test_clipping_ignores_frozen_grads():
  params = {"a": jnp.zeros((3,)), "b": jnp.zeros((4,))}
  grads = {"a": jnp.full((3,), 100.0), "b": jnp.asarray([3.0, 4.0, 0.0, 0.0])}  # |b| = 5
  cfg = _config(grad_norm_clip=1.0, param_groups=[("a", dict(frozen=True)), (".*", {})])
  new, _, _ = _steps(cfg, params, grads)
  np.testing.assert_array_equal(new["a"], params["a"])
  np.testing.assert_allclose(new["b"], -LR * np.asarray(grads["b"]) / 5.0, rtol=1e-6)


def test_group_errors_list_paths(shapes):
  with pytest.raises(ValueError, match=r"unmatched.*'cls'.*'head/kernel'"):
    optim.make_optimizer(_config(param_groups=[("Transformer/.*", {})]), shapes)
  with pytest.raises(ValueError, match=r"'nonexistent/\.\*' matches no parameter.*head/kernel"):
    optim.make_optimizer(
        _config(param_groups=[("nonexistent/.*", {}), (".*", {})]), shapes)
  with pytest.raises(ValueError, match=r"'head/\.\*' only matches paths taken by earlier.*head/bias"):
    optim.make_optimizer(_config(param_groups=[(".*", {}), ("head/.*", {})]), shapes)
  with pytest.raises(ValueError, match=r"unknown keys \['lr_mul'\]"):
    optim.make_optimizer(_config(param_groups=[(".*", dict(lr_mul=2.0))]), shapes)


@pytest.mark.parametrize("wd_mask", ["default", "all"])
def test_weight_decay_mask(shapes, wd_mask):
  params = _random(shapes, 0)
  grads = jax.tree.map(jnp.zeros_like, params)  # Adam's direction is then exactly 0
  wd = 0.5
  cfg = _config(optimizer="adamw", weight_decay=wd, wd_mask=wd_mask, param_groups=[
      ("head/kernel", dict(name="head", weight_decay=0.0)), (".*", dict(name="rest"))])
  new, _, _ = _steps(cfg, params, grads)
  p0, p1 = _flat(params), _flat(new)
  undecayed = {p for p in p0 if p.endswith(("/bias", "/scale", "pos_embedding")) or p == "cls"}
  assert "cls" in undecayed and "Transformer/posembed_input/pos_embedding" in undecayed
  assert "Transformer/encoder_norm/scale" in undecayed
  for path in p0:
    decayed = path != "head/kernel" and (wd_mask == "all" or path not in undecayed)
    factor = 1.0 - LR * wd if decayed else 1.0
    np.testing.assert_allclose(p1[path], np.asarray(p0[path]) * factor, rtol=1e-6, err_msg=path)


def test_layerwise_lr_decay(shapes):
  params, grads = _zeros(shapes), _random(shapes, 1)
  factor, depth = 0.5, 2
  cfg = _config(layerwise_lr_decay=factor,
                param_groups=[("head/.*", dict(name="head", lr_mult=3.0)), (".*", {})])
  new, _, _ = _steps(cfg, params, grads)
  p0, p1, g = _flat(params), _flat(new), _flat(grads)
  expected_layer = {"embedding/kernel": 0, "cls": 0, "Transformer/posembed_input/pos_embedding": 0,
                    "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": 1,
                    "Transformer/encoderblock_1/LayerNorm_0/scale": 2,
                    "Transformer/encoder_norm/scale": 3, "head/kernel": 3}
  for path, layer in expected_layer.items():
    assert optim.layer_id(path, depth) == layer
  for path in p0:
    layer = optim.layer_id(path, depth)
    lr = LR * factor ** (depth + 1 - layer) * (3.0 if path.startswith("head/") else 1.0)
    np.testing.assert_allclose(np.asarray(p1[path] - p0[path]), -lr * np.asarray(g[path]),
                               rtol=1e-6, err_msg=path)


@pytest.mark.parametrize("decay_type,mid,end", [
    ("cosine", 0.5, 0.0),
    ("linear", 0.5 * (1 + 0.1), 0.1),  # linear_end = 0.1 of the peak
    ("rsqrt", math.sqrt(10 / 55), math.sqrt(10 / 100)),  # timescale = warmup = 10
    ("constant", 1.0, 1.0),
])
def test_schedule_closed_form(decay_type, mid, end):
  base, warmup, total = 2.0, 10, 100
  s = optim.create_learning_rate_schedule(total, base, decay_type, warmup, linear_end=0.1)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(base * 0.5)
  assert float(s(warmup)) == pytest.approx(base)
  assert float(s(55)) == pytest.approx(base * mid, rel=1e-6)
  assert float(s(total)) == pytest.approx(base * end, abs=1e-7)
  assert float(jax.jit(s)(jnp.int32(55))) == pytest.approx(base * mid, rel=1e-6)


def test_tx_follows_schedule_per_group():
  """The LR applied at step k is schedules[group](k), with the count carried in the state."""
  params = {"head": jnp.zeros(()), "body": jnp.zeros(())}
  grads = {"head": jnp.ones(()), "body": jnp.ones(())}
  cfg = _config(decay_type="cosine", warmup_steps=2, total_steps=6, param_groups=[
      ("head", dict(name="head", lr_mult=10.0, warmup_steps=0)), (".*", dict(name="body"))])
  tx, sched = optim.make_optimizer(cfg, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k in range(6):
    u, state = update(grads, state, params)
    for name in ("head", "body"):
      assert float(u[name]) == pytest.approx(-float(sched[name](k)), rel=1e-6), (name, k)
  assert float(sched["head"](0)) == pytest.approx(10 * LR)  # no warmup for the head
  assert float(sched["body"](1)) == pytest.approx(LR / 2)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_bf16_first_moment(optimizer):
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  cfg = _config(optimizer=optimizer, momentum=0.9, optim_dtype="bfloat16")
  _, state, _ = _steps(cfg, params, params, n=2)
  dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim > 0}
  # SGD: only the momentum (bf16). AdamW: mu in bf16, nu kept in float32.
  assert dtypes == ({jnp.dtype(jnp.bfloat16)} if optimizer == "sgd" else
                    {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)})
  assert optim.tree_bytes(state) < optim.tree_bytes(
      _steps(_config(optimizer=optimizer, momentum=0.9), params, params)[1])


def test_adafactor_matches_optax():
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(256, 128)), jnp.float32),
            "b": jnp.ones((128,))}
  grads = {"w": jnp.full((256, 128), 0.1), "b": jnp.full((128,), -0.2)}
  ours, state, _ = _steps(_config(optimizer="adafactor"), params, grads, n=3)
  ref_tx = optax.adafactor(learning_rate=LR)
  ref, ref_state = params, ref_tx.init(params)
  for _ in range(3):
    u, ref_state = ref_tx.update(grads, ref_state, ref)
    ref = optax.apply_updates(ref, u)
  for k in params:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-7)
  assert optim.tree_bytes(state) < params["w"].nbytes  # factored: rows + cols, not the matrix


def test_same_step_under_pmap_and_jit():
  params = {"w": jnp.ones((4, 3)), "head": {"kernel": jnp.ones((3, 2))}}
  grads = jax.tree.map(lambda x: x * 0.5, params)
  cfg = _config(momentum=0.9, grad_norm_clip=1.0, warmup_steps=3,
                **presets.backbone_head(head_lr_mult=10.0))
  tx, _ = optim.make_optimizer(cfg, params)
  step = lambda p, s: tx.update(grads, s, p)
  u_jit, _ = jax.jit(step)(params, tx.init(params))
  n = jax.local_device_count()
  rep = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), t)
  u_pmap, _ = jax.pmap(step)(rep(params), rep(tx.init(params)))
  for a, b in zip(jax.tree.leaves(u_jit), jax.tree.leaves(u_pmap)):
    np.testing.assert_allclose(b, np.broadcast_to(a, b.shape), rtol=1e-6)


def test_presets_resolve_on_vit(shapes):
  cfg = _config()
  cfg.update(presets.freeze_first_blocks(1))
  groups = optim.assign_groups(optim.parse_param_groups(cfg), shapes)
  frozen = {p for p, g in groups.items() if g.frozen}
  assert {"embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding",
          "Transformer/encoderblock_0/LayerNorm_0/scale"} <= frozen
  assert not any(p.startswith(("Transformer/encoderblock_1/", "head/")) for p in frozen)
  cfg.update(presets.backbone_head(10.0))
  groups = optim.assign_groups(optim.parse_param_groups(cfg), shapes)
  assert {p for p, g in groups.items() if g.name == "head"} == {"head/kernel", "head/bias"}
  cfg.update(presets.layerwise_decay(0.65))
  tx, sched = optim.make_optimizer(cfg, shapes)
  assert set(sched) == {"head", "backbone"}
  assert optim.tree_bytes(jax.eval_shape(tx.init, shapes)) > 0
