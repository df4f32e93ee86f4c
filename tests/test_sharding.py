"""Sharded params under pjit (FSDP, tensor-parallel rules) train to the same numbers as replicated
params and as pmap, hold 1/k of each sharded leaf per device, keep the optimizer state beside its
param, and bad meshes or rules fail with errors that name what is wrong."""
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import optim
from vit_jax import parallel
from vit_jax import train
from vit_jax.configs import clip as clip_config
from vit_jax.configs import param_groups
from vit_jax.configs import vit as vit_config

STEPS = 5
PLACEMENTS = {
    "replicate": dict(parallelism="pjit"),
    "pmap": dict(parallelism="pmap"),
    "fsdp_2x4": dict(mesh=[("data", 2), ("fsdp", 4)], sharding="fsdp"),
    "fsdp_8": dict(mesh=[("fsdp", 8)], sharding="fsdp"),
    "tensor_parallel_2": dict(mesh=[("data", 4), ("model", 2)],
                              sharding_rules=["tensor_parallel"]),
}


def _vit_config(**overrides):
  c = vit_config.get_config("nano4,fashion_mnist")
  c.unlock()
  c.batch, c.batch_eval, c.total_steps, c.warmup_steps = 16, 16, STEPS, 1
  # SGD with momentum for the 1e-5 comparisons: Adam divides by sqrt(nu) + 1e-8 and so turns the
  # float32 rounding of gradients that are zero in exact arithmetic (attention key biases: the
  # softmax does not see them) into steps of +-lr; its sharded layout is tested on its own below.
  c.optimizer, c.base_lr, c.momentum = "sgd", 0.1, 0.9
  c.fsdp_min_size = 0  # tiny test leaves: shard every one that divides
  c.update(overrides)
  return c


def _clip_config(**overrides):
  c = clip_config.get_config("nano,fashion_mnist")
  c.unlock()
  c.model.image_size = 8
  c.model.image.patches.size = (4, 4)
  c.context_length = c.model.text.context_length = 16
  c.batch, c.batch_eval, c.total_steps, c.warmup_steps = 16, 16, STEPS, 1
  c.optimizer, c.base_lr, c.momentum = "sgd", 0.1, 0.9  # as above
  c.fsdp_min_size = 0
  c.update(overrides)
  return c


def _batches(config, n):
  rng = np.random.RandomState(0)
  b = config.batch
  if config.task == "contrastive":
    return [{"image": rng.randn(b, 8, 8, 3).astype(np.float32),
             "tokens": rng.randint(1, 500, (b, config.context_length)).astype(np.int32)}
            for _ in range(n)]
  return [{"image": rng.randn(b, 8, 8, 1).astype(np.float32),
           "labels": np.eye(10, dtype=np.float32)[rng.randint(0, 10, b)]} for _ in range(n)]


def _init(config, batch):
  task = train.get_task(config)
  params = task.init_params(jax.random.PRNGKey(0), batch)
  if "head" in params:  # a zero head gives zero gradients below it at step 1
    params["head"]["kernel"] = params["head"]["kernel"] + 0.1
  tx, schedules = optim.make_optimizer(config, params)
  state = train.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params))
  return task, state, tx, schedules


def _run(config, steps=STEPS, with_metrics=False):
  """`steps` train steps from a fixed init on fixed batches: (final device state, backend), and
  the last step's metrics on the host if `with_metrics`."""
  backend = parallel.get_backend(config)
  batches = _batches(config, steps)
  task, state, tx, schedules = _init(config, batches[0])
  state = backend.put_state(state)
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  metrics = None
  for b in batches:
    state, metrics = step(state, backend.put_batch(b), jax.random.PRNGKey(1))
  if with_metrics:
    return state, backend, backend.fetch(metrics)
  return state, backend


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.mark.parametrize("make_config", [_vit_config, _clip_config], ids=["vit", "clip"])
def test_placements_train_to_the_same_params(make_config):
  # Also the pmap-vs-pjit agreement of tests/test_parallel.py (which this ViT case's "pmap" and
  # "replicate" runs are): the same params and the same last-step loss (pmean'd and fetched from
  # the replicas under pmap).
  assert jax.device_count() == 8
  results, losses = {}, {}
  for name, overrides in PLACEMENTS.items():
    state, backend, metrics = _run(make_config(**overrides), with_metrics=True)
    results[name] = jax.device_get(backend.get_state(state).params)
    losses[name] = metrics["loss"]
  ref = results.pop("replicate")
  for name, params in results.items():
    assert _max_diff(ref, params) <= 1e-5, (name, _max_diff(ref, params))
    np.testing.assert_allclose(losses[name], losses["replicate"], rtol=1e-5, err_msg=name)
  _, init, _, _ = _init(make_config(), _batches(make_config(), 1)[0])
  assert _max_diff(ref, init.params) > 1e-3  # trained: not five untouched inits


def _shard_fraction(x):
  """The fraction of a global array's elements that one device holds (the same on each)."""
  sizes = {int(np.prod(s.data.shape)) for s in x.addressable_shards}
  assert len(sizes) == 1, sizes
  return sizes.pop() / x.size


@pytest.mark.parametrize("placement,axis,k", [("fsdp_8", "fsdp", 8), ("fsdp_2x4", "fsdp", 4),
                                              ("tensor_parallel_2", "model", 2)])
def test_each_device_holds_one_kth_of_each_sharded_leaf(placement, axis, k):
  config = _vit_config(total_steps=1, **PLACEMENTS[placement])
  state, backend = _run(config, steps=1)  # after a step: the layout survives the update
  plan = backend.shardings(state)
  n_sharded = 0
  for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(
      plan.params, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    if axis in [a for e in s.spec if e for a in ((e,) if isinstance(e, str) else e)]:
      assert _shard_fraction(x) == 1 / k, (x.shape, s.spec)
      n_sharded += 1
    else:
      assert _shard_fraction(x) == 1
  params = jax.tree.leaves(state.params)
  if axis == "fsdp":  # every leaf with a dimension divisible by k: all but the 10-class head bias
    undivisible = [x.shape for x in params if all(d % k for d in x.shape)]
    assert n_sharded == len(params) - len(undivisible), (n_sharded, undivisible)
  else:  # per block: q/k/v kernels and biases, out kernel, MLP in kernel and bias, MLP out kernel
    assert n_sharded == 10 * config.model.transformer.num_layers
  # The batch is split over data x fsdp, and over nothing else.
  assert backend.batch_sharding.spec == P(tuple(a for a in ("data", "fsdp")
                                                if a in backend.mesh.axis_names))
  mlp = state.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert mlp.sharding.spec == (P(None, "fsdp") if axis == "fsdp" else P(None, "model"))


def _specs_by_path(tree, shardings):
  return {optim.path_str(p): s.spec for (p, _), s in zip(
      jax.tree_util.tree_leaves_with_path(tree),
      jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)))}


@pytest.mark.parametrize("recipe", ["adamw", "frozen_groups", "lora"])
def test_optimizer_state_follows_its_param(recipe):
  overrides = dict(mesh=[("data", 2), ("fsdp", 4)], sharding="fsdp", optimizer="adamw",
                   base_lr=1e-3)
  if recipe == "frozen_groups":
    overrides.update(param_groups.freeze_first_blocks(1))
  if recipe == "lora":  # CLIP: LoRA adapters on both towers
    overrides.update(param_groups.lora(rank=4))
  config = (_clip_config if recipe == "lora" else _vit_config)(**overrides)
  backend = parallel.get_backend(config)
  _, state, _, _ = _init(config, _batches(config, 1)[0])
  shardings = backend.shardings(state)
  params = _specs_by_path(state.params, shardings.params)
  opt = _specs_by_path(state.opt_state, shardings.opt_state)
  moments = {k: v for k, v in opt.items() if "/mu/" in k or "/nu/" in k}
  assert moments
  for path, spec in moments.items():
    param = path.split("/mu/" if "/mu/" in path else "/nu/")[-1]
    assert spec == params[param], (path, spec, params[param])
  n_trainable = len([k for k in moments if "/mu/" in k])
  if recipe == "frozen_groups":  # no state for the frozen block and stem
    assert n_trainable < len(params)
  if recipe == "lora":  # state for the adapters only; they are sharded too
    assert all("lora/" in k for k in moments)
    assert any("fsdp" in str(s) for s in moments.values())
  # And the step runs with that layout.
  state = backend.put_state(state)
  task = train.get_task(config)
  tx, schedules = optim.make_optimizer(config, jax.device_get(state.params))
  step = backend.compile_train_step(train.make_train_step(task.loss_fn, tx, schedules,
                                                          backend.mean))
  state, metrics = step(state, backend.put_batch(_batches(config, 1)[0]), jax.random.PRNGKey(0))
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("overrides,match", [
    (dict(mesh=[("data", 3), ("fsdp", 2)], sharding="fsdp"),
     r"config.mesh \[\('data', 3\), \('fsdp', 2\)\]: sizes multiply to 6 devices; found 8"),
    (dict(mesh=[("data", -1), ("tensor", 2)]), r"axis names must be .* found \['data', 'tensor'\]"),
    (dict(mesh=[("data", 4), ("model", 2)]),
     r"axis 'model' \(size 2\) is used by no config.sharding_rules entry"),
    (dict(mesh=[("data", 4), ("fsdp", 2)]),
     r"axis 'fsdp' \(size 2\) shards no param under config.sharding='replicate'"),
    (dict(sharding="fsdp"), r"config.sharding='fsdp' needs an 'fsdp' axis"),
    (dict(sharding="zero3"), r"config.sharding='zero3': expected one of"),
    (dict(mesh=[("data", 4), ("fsdp", 2)], sharding="fsdp",
          sharding_rules=[("query/kernel$", (None, "model"))]),
     r"uses mesh axis 'model', which config.mesh .* does not have"),
    (dict(parallelism="pmap", mesh=[("fsdp", 8)], sharding="fsdp"),
     r"parallelism='pmap' replicates params"),
    (dict(sharding_rules=["megatron"]), r"'megatron': not a preset"),
])
def test_bad_mesh_or_strategy_is_clear(overrides, match):
  with pytest.raises(ValueError, match=match):
    parallel.get_backend(_vit_config(**overrides))


MLP_RULE = ("MlpBlock_3/Dense_0/kernel$", (None, "model"))  # 64 hidden units: split over 4


@pytest.mark.parametrize("rules,match", [
    ([("MlpBlock_9/Dense_0/kernel$", (None, "model")), MLP_RULE],
     r"regex 'MlpBlock_9/Dense_0/kernel\$' matches no param\. Param paths look like: "),
    # nano4's 10-class head: 10 does not split over 4.
    ([("^head/kernel$", (None, "model")), MLP_RULE],
     r"on param head/kernel of shape \(32, 10\): dimension 1 \(size 10\) does not divide over "
     r"mesh axes \('model',\) \(size 4\)"),
    ([("^head/kernel$", (None, None, "model")), MLP_RULE],
     r"matches param head/kernel of shape \(32, 10\): the spec has 3 entries for 2 dimensions"),
])
def test_bad_rule_names_the_param(rules, match):
  config = _vit_config(mesh=[("data", 2), ("model", 4)], sharding_rules=rules)
  backend = parallel.get_backend(config)
  _, state, _, _ = _init(config, _batches(config, 1)[0])
  with pytest.raises(ValueError, match=match):
    backend.put_state(state)


def test_rule_beats_fsdp_threshold():
  # Leaves under fsdp_min_size elements stay replicated, unless a rule places them.
  config = _vit_config(mesh=[("fsdp", 8)], sharding="fsdp", fsdp_min_size=1024,
                       sharding_rules=[("cls$", (None, None, "fsdp"))])
  backend = parallel.get_backend(config)
  _, state, _, _ = _init(config, _batches(config, 1)[0])
  specs = _specs_by_path(state.params, backend.shardings(state).params)
  assert specs["cls"] == P(None, None, "fsdp")  # the rule, though cls is 32 elements
  assert specs["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == P(None, "fsdp")  # 2048
  assert specs["Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias"] == P(None)  # 64 < 1024


def test_activations_stay_split_by_example_under_fsdp():
  # Between blocks the [batch, tokens, width] activations are pinned to the batch axes: without
  # it the partitioner may split a matmul along an FSDP-sharded weight and all-gather activations
  # over the batch (ViT-B/16 on 64 devices: 10.6 GB of temporaries per device instead of 2.1 GB;
  # benchmarks/sharding_memory.py).
  config = _vit_config(**PLACEMENTS["fsdp_2x4"])
  backend = parallel.get_backend(config)
  batch = _batches(config, 1)[0]
  task, state, tx, schedules = _init(config, batch)
  step = backend.compile_train_step(train.make_train_step(task.loss_fn, tx, schedules,
                                                          backend.mean))
  hlo = step.lower(backend.put_state(state), backend.put_batch(batch),
                   jax.random.PRNGKey(0)).as_text()
  tokens = 5  # 4 patches + class token
  pinned = re.findall(r'sharding_constraint .*\[\{"data", "fsdp"\}, \{\}, \{\}\]> : tensor<16x'
                      rf'{tokens}x32xf32>', hlo)
  assert len(pinned) >= config.model.transformer.num_layers + 1, hlo[:2000]
