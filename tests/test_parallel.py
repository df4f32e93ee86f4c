"""pmap and pjit accumulate gradients over micro-batches like one full batch; bad batch sizes and
meshes fail clearly. (That pmap and pjit train to the same params and loss is asserted in
tests/test_sharding.py::test_placements_train_to_the_same_params, beside the sharded layouts.)"""
import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import optim
from vit_jax import parallel
from vit_jax import train
from vit_jax.configs import vit as vit_config


def _config(parallelism, **overrides):
  c = vit_config.get_config("nano4,fashion_mnist")
  c.unlock()
  c.parallelism = parallelism
  c.batch, c.batch_eval = 16, 16
  c.total_steps, c.warmup_steps = 3, 1
  c.optimizer, c.base_lr, c.momentum = "sgd", 0.1, 0.9
  c.update(overrides)
  return c


def _run(parallelism, steps=3, batch=16, **overrides):
  """Runs `steps` train steps from a fixed init on fixed batches; returns host params."""
  config = _config(parallelism, batch=batch, **overrides)
  backend = parallel.get_backend(config)
  task = train.get_task(config)
  rng = np.random.RandomState(0)
  batches = [{"image": rng.randn(batch, 8, 8, 1).astype(np.float32),
              "labels": np.eye(10, dtype=np.float32)[rng.randint(0, 10, batch)]}
             for _ in range(max(steps, 1))]
  params = task.init_params(jax.random.PRNGKey(0), batches[0])
  # A zero head gives zero gradients to everything below it at step 1: perturb it.
  params["head"]["kernel"] = params["head"]["kernel"] + 0.1
  tx, schedules = optim.make_optimizer(config, params)
  state = backend.put_state(train.TrainState(step=np.int32(0), params=params,
                                             opt_state=tx.init(params)))
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  metrics = None
  for b in batches[:steps]:
    state, metrics = step(state, backend.put_batch(b), jax.random.PRNGKey(1))
  return (jax.device_get(backend.get_state(state).params),
          metrics and backend.fetch(metrics))


@pytest.mark.parametrize("parallelism", ["pmap", "pjit"])
def test_accum_steps_matches_full_batch(parallelism):
  # 32 examples over 8 devices, 4 micro-batches: one example per device per micro-batch.
  full, _ = _run(parallelism, steps=1, batch=32)
  accum, _ = _run(parallelism, steps=1, batch=32, accum_steps=4)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), full, accum))
  assert max(diffs) <= 1e-5, max(diffs)


@pytest.mark.parametrize("parallelism,match", [
    ("pjit", r"config.batch=12 does not divide across 8 devices"),
    ("pmap", r"batch.*=12 does not divide across 8 devices"),
])
def test_batch_not_divisible_is_clear(parallelism, match):
  config = _config(parallelism, batch=12)
  with pytest.raises(ValueError, match=match):
    parallel.get_backend(config)


def test_mesh_errors():
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.make_mesh([("data", -1), ("model", -1)])
  with pytest.raises(ValueError, match="multiple of 3 devices; found 8"):
    parallel.make_mesh([("data", -1), ("model", 3)])
  mesh = parallel.make_mesh([("data", -1), ("model", 2)])
  assert dict(mesh.shape) == {"data": 4, "model": 2}
