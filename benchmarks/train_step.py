"""Throughput of the jitted train step: images/s and achieved GFLOP/s (XLA's cost analysis).

    python benchmarks/train_step.py --model ti16 --batch 32
    python benchmarks/train_step.py --model b16 --batch 8 --dtype bfloat16

Runs the real step from vit_jax.train (forward, backward, optimizer update, donated state) on a
synthetic batch at --image-size, with the config's optimizer (default: upstream's fine-tuning
SGD with momentum). Prints one line per measurement; the best of --repeats windows is reported.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import optim
from vit_jax import parallel
from vit_jax import train
from vit_jax.configs import vit as vit_config


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="ti16")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw", "adafactor"])
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--steps", type=int, default=5, help="steps per timed window")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  config = vit_config.get_config(f"{args.model},imagenet2012")
  config.unlock()
  config.num_classes, config.batch, config.batch_eval = args.num_classes, args.batch, args.batch
  config.optimizer, config.dtype, config.mesh = args.optimizer, args.dtype, [("data", 1)]
  config.optim_dtype = "float32"  # plain SGD momentum, as the upstream baseline
  backend = parallel.PjitBackend(config)
  task = train.get_task(config)
  rng = np.random.RandomState(0)
  batch = {"image": rng.randn(args.batch, args.image_size, args.image_size, 3).astype(np.float32),
           "labels": np.eye(args.num_classes, dtype=np.float32)[
               rng.randint(0, args.num_classes, args.batch)]}
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0), batch)
  tx, schedules = optim.make_optimizer(config, params)
  state = backend.put_state(train.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                                             opt_state=tx.init(params)))
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  device_batch = backend.put_batch(batch)
  rng_key = jax.random.PRNGKey(1)

  cost = step.lower(state, device_batch, rng_key).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))

  state, metrics = step(state, device_batch, rng_key)  # compile + first step
  jax.block_until_ready(metrics)
  best = float("inf")
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, device_batch, rng_key)
    jax.block_until_ready(metrics)
    best = min(best, (time.perf_counter() - t0) / args.steps)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"model={config.model.name} params={n_params:,} batch={args.batch} "
        f"image={args.image_size} dtype={args.dtype} optimizer={args.optimizer} "
        f"devices={jax.device_count()} ({jax.default_backend()})")
  print(f"step_time={best * 1e3:.1f} ms  images/s={args.batch / best:.2f}  "
        f"GFLOP/step={flops / 1e9:.1f}  GFLOP/s={flops / best / 1e9:.1f}")


if __name__ == "__main__":
  main()
