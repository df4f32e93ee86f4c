"""Throughput of the jitted train step: images/s and achieved GFLOP/s (XLA's cost analysis).

    python benchmarks/train_step.py --model ti16 --batch 32
    python benchmarks/train_step.py --model b16 --batch 8 --dtype bfloat16
    python benchmarks/train_step.py --model ti16 --batch 32 --upstream /path/to/vision_transformer

Runs the real step from vit_jax.train (forward, backward, optimizer update, donated state) on a
synthetic batch at --image-size, with the config's optimizer (default: upstream's fine-tuning
SGD with momentum 0.9 and global-norm clipping at 1). Prints one line per measurement; the best
of --repeats windows of --steps steps is reported.

--upstream DIR (a checkout of google-research/vision_transformer) also times upstream's
`vit_jax/models_vit.py` VisionTransformer in the same run, with the same optimizer, loss, batch
and jit/donation, as the baseline; it runs in a subprocess with DIR first on sys.path (upstream's
package is also called `vit_jax`) and imports nothing of ours.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def measure(step, state, batch, rng_key, steps: int, repeats: int):
  """(best seconds per step, XLA's FLOPs per step) of `step(state, batch, rng) -> (state, out)`."""
  cost = step.lower(state, batch, rng_key).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  state, out = step(state, batch, rng_key)  # compile + first step
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, out = step(state, batch, rng_key)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / steps)
  return best, flops


def synthetic_batch(batch: int, image_size: int, num_classes: int):
  rng = np.random.RandomState(0)
  return {"image": rng.randn(batch, image_size, image_size, 3).astype(np.float32),
          "labels": np.eye(num_classes, dtype=np.float32)[rng.randint(0, num_classes, batch)]}


def report(name: str, n_params: int, args, seconds: float, flops: float) -> dict:
  row = dict(impl=name, params=n_params, images_per_s=args.batch / seconds,
             step_ms=seconds * 1e3, gflop_per_step=flops / 1e9, gflop_per_s=flops / seconds / 1e9)
  print(f"{name}: params={n_params:,} batch={args.batch} image={args.image_size} "
        f"dtype={args.dtype} optimizer={args.optimizer} devices={jax.device_count()} "
        f"({jax.default_backend()})")
  print(f"  step_time={row['step_ms']:.1f} ms  images/s={row['images_per_s']:.2f}  "
        f"GFLOP/step={row['gflop_per_step']:.1f}  GFLOP/s={row['gflop_per_s']:.1f}", flush=True)
  return row


def run_ours(args) -> dict:
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import vit as vit_config  # pylint: disable=g-import-not-at-top

  config = vit_config.get_config(f"{args.model},imagenet2012")
  config.unlock()
  config.num_classes, config.batch, config.batch_eval = args.num_classes, args.batch, args.batch
  config.optimizer, config.dtype, config.mesh = args.optimizer, args.dtype, [("data", 1)]
  config.optim_dtype = "float32"  # plain SGD momentum, as the upstream baseline
  backend = parallel.PjitBackend(config)
  task = train.get_task(config)
  batch = synthetic_batch(args.batch, args.image_size, args.num_classes)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0), batch)
  tx, schedules = optim.make_optimizer(config, params)
  state = backend.put_state(train.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                                             opt_state=tx.init(params)))
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  seconds, flops = measure(step, state, backend.put_batch(batch), jax.random.PRNGKey(1),
                           args.steps, args.repeats)
  return report(f"vit_jax {config.model.name}", n_params, args, seconds, flops)


def run_upstream(args) -> dict:
  """Upstream's models_vit.VisionTransformer + optax SGD, as upstream's train.py builds them."""
  from vit_jax import models_vit  # pylint: disable=g-import-not-at-top  (upstream's package)
  from vit_jax.configs import models as upstream_models  # pylint: disable=g-import-not-at-top
  if args.optimizer != "sgd" or args.dtype != "float32":
    sys.exit("--upstream compares the float32 SGD step only.")
  names = {"ti16": "ViT-Ti_16", "s16": "ViT-S_16", "s32": "ViT-S_32", "b16": "ViT-B_16",
           "b32": "ViT-B_32", "b8": "ViT-B_8", "l16": "ViT-L_16", "l32": "ViT-L_32",
           "h14": "ViT-H_14"}
  model_config = upstream_models.MODEL_CONFIGS[names.get(args.model, args.model)]
  model = models_vit.VisionTransformer(num_classes=args.num_classes, **model_config)
  batch = synthetic_batch(args.batch, args.image_size, args.num_classes)
  params = jax.jit(lambda k, x: model.init(k, x, train=False)["params"])(
      jax.random.PRNGKey(0), batch["image"][:1])
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.sgd(learning_rate=0.03, momentum=0.9))

  def loss_fn(params, images, labels, rng):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=1))

  def step(state, batch, rng):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch["image"], batch["labels"], rng)
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(step, donate_argnums=(0,))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  seconds, flops = measure(step, (params, tx.init(params)), jax.device_put(batch),
                           jax.random.PRNGKey(1), args.steps, args.repeats)
  return report(f"upstream models_vit {model_config.model_name}", n_params, args, seconds, flops)


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
  ap.add_argument("--upstream", metavar="DIR",
                  help="a google-research/vision_transformer checkout: time it too")
  ap.add_argument("--upstream-worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()

  if args.upstream_worker:  # in the subprocess: upstream's vit_jax is first on sys.path
    print("RESULT " + json.dumps(run_upstream(args)))
    return

  rows = []
  if args.upstream:
    if not os.path.exists(os.path.join(args.upstream, "vit_jax", "models_vit.py")):
      sys.exit(f"--upstream {args.upstream}: no vit_jax/models_vit.py there.")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.upstream))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                           "--upstream-worker"],
                          env=env, cwd=os.path.abspath(args.upstream), stdout=subprocess.PIPE,
                          text=True, check=True)
    for line in proc.stdout.splitlines():
      if line.startswith("RESULT "):
        rows.append(json.loads(line[len("RESULT "):]))
      else:
        print(line)
  rows.append(run_ours(args))
  if len(rows) == 2:
    print(f"speed-up over upstream: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x")


if __name__ == "__main__":
  main()
