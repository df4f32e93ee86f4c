"""Throughput of the jitted train step: images/s and achieved GFLOP/s (XLA's cost analysis).

    python benchmarks/train_step.py --model ti16 --batch 32
    python benchmarks/train_step.py --model b16 --batch 8 --dtype bfloat16
    python benchmarks/train_step.py --model ti16 --batch 32 --upstream /path/to/vision_transformer
    python benchmarks/train_step.py --model ti16 --batch 32 --peer timm --torch-python .venv-timm/bin/python
    python benchmarks/train_step.py --model b16 --batch 32 --memory   # bytes per device, from shapes
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/train_step.py --model b16 --batch 8 --placements replicate,fsdp

Runs the real step from vit_jax.train (forward, backward, optimizer update, donated state) on a
synthetic batch at --image-size, with the config's optimizer (default: upstream's fine-tuning
SGD with momentum 0.9 and global-norm clipping at 1). Prints one line per measurement; the best
of --repeats windows of --steps steps is reported.

--upstream DIR (a checkout of google-research/vision_transformer) also times upstream's
`vit_jax/models_vit.py` VisionTransformer in the same run, with the same optimizer, loss, batch
and jit/donation, as the baseline; it runs in a subprocess with DIR first on sys.path (upstream's
package is also called `vit_jax`) and imports nothing of ours.

--peer timm --torch-python PY times timm's model of the same size in that interpreter
(benchmarks/peer_timm.py: same batch, image size, loss, clipping and SGD), eager and
`torch.compile`, in the same run, and prints our speed as a ratio of each.

Every run also prints the compiled step's memory analysis (per device: arguments, outputs,
temporaries) and the model FLOP utilisation: XLA's FLOP count of the step over the device's peak
(PEAK_TFLOPS below, matched on `device_kind`, or --peak-tflops). --memory prints, from shapes
only (nothing runs or is allocated), the per-device bytes of params, gradients, optimizer state
and the activations kept for the backward pass, for fp32, bf16, remat, remat with a policy and
accum_steps (--memory-xla adds XLA:CPU's analysis of each compiled step).

--placements replicate,fsdp[,tensor_parallel] times the same step under each pjit placement
(PLACEMENTS below: all devices on one axis; tensor_parallel: 2-way over "model"), alternating
them over --rounds, and prints each one's step time as a ratio of the first. On fake CPU devices
(XLA_FLAGS above) the collectives are memory copies between threads of one process: a proxy for
the extra work FSDP's gathers and reduce-scatters add, not for a real interconnect.
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

# Dense peak TFLOP/s per device by (device_kind substring, dtype), from the vendors' data sheets
# (no sparsity). fp32 on NVIDIA is the non-tensor-core rate; TPUs are given for bf16 only.
PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
    ("V100", "bfloat16"): 125.0, ("V100", "float32"): 15.7,  # V100: fp16 tensor cores
    ("TPU v3", "bfloat16"): 123.0, ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5e", "bfloat16"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v5", "bfloat16"): 459.0,
    ("TPU v6 lite", "bfloat16"): 918.0, ("TPU v6e", "bfloat16"): 918.0,
}


def peak_tflops(dtype: str, override=None):
  """Peak TFLOP/s of device 0 for `dtype` (first matching PEAK_TFLOPS entry), or None."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for (name, dt), peak in PEAK_TFLOPS.items():
    if name in kind and dt == dtype:
      return peak
  return None


def _train_module():
  """Our vit_jax.train, or None in the --upstream worker (where `vit_jax` is upstream's)."""
  try:
    from vit_jax import train  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return train if hasattr(train, "memory_analysis") else None


def measure(step, state, batch, rng_key, steps: int, repeats: int):
  """(best seconds per step, XLA's FLOPs per step, memory analysis) of
  `step(state, batch, rng) -> (state, out)`; compiles once and times the executable."""
  compiled = step.lower(state, batch, rng_key).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  memory = _train_module().memory_analysis(compiled) if _train_module() else {}
  state, out = compiled(state, batch, rng_key)  # first step
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, out = compiled(state, batch, rng_key)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / steps)
  return best, flops, memory


def synthetic_batch(batch: int, image_size: int, num_classes: int):
  rng = np.random.RandomState(0)
  return {"image": rng.randn(batch, image_size, image_size, 3).astype(np.float32),
          "labels": np.eye(num_classes, dtype=np.float32)[rng.randint(0, num_classes, batch)]}


def report(name: str, n_params: int, args, seconds: float, flops: float, memory=None) -> dict:
  row = dict(impl=name, params=n_params, images_per_s=args.batch / seconds,
             step_ms=seconds * 1e3, gflop_per_step=flops / 1e9, gflop_per_s=flops / seconds / 1e9)
  print(f"{name}: params={n_params:,} batch={args.batch} image={args.image_size} "
        f"dtype={args.dtype} optimizer={args.optimizer} devices={jax.device_count()} "
        f"({jax.default_backend()}, {jax.devices()[0].device_kind})")
  peak = peak_tflops(args.dtype, args.peak_tflops)
  mfu = f"{100 * row['gflop_per_s'] / (peak * 1e3):.1f}% of {peak:g} TFLOP/s" if peak else (
      "n/a (no peak for this device: pass --peak-tflops)")
  print(f"  step_time={row['step_ms']:.1f} ms  images/s={row['images_per_s']:.2f}  "
        f"GFLOP/step={row['gflop_per_step']:.1f}  GFLOP/s={row['gflop_per_s']:.1f}  MFU={mfu}",
        flush=True)
  if memory:
    print(f"  {_train_module().format_memory(memory)}", flush=True)
  return row


def _our_step(args, **overrides):
  """(compiled-step factory inputs) for our model: (step, state, batch, n_params, name)."""
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import vit as vit_config  # pylint: disable=g-import-not-at-top

  config = vit_config.get_config(f"{args.model},imagenet2012")
  config.unlock()
  config.num_classes, config.batch, config.batch_eval = args.num_classes, args.batch, args.batch
  config.optimizer, config.dtype, config.mesh = args.optimizer, args.dtype, [("data", 1)]
  config.optim_dtype = "float32"  # plain SGD momentum, as the upstream baseline
  config.update(overrides)
  backend = parallel.PjitBackend(config)
  task = train.get_task(config)
  batch = synthetic_batch(args.batch, args.image_size, args.num_classes)
  abstract = args.memory
  init = lambda rng: train.create_train_state(config, task, rng, batch)[0]
  if abstract:  # shapes only: nothing is allocated
    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  else:
    state = backend.put_state(jax.jit(init)(jax.random.PRNGKey(0)))
    batch = backend.put_batch(batch)
  tx, schedules = optim.make_optimizer(config, state.params)
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return step, state, batch, n_params, config.model.name, task, config


def run_ours(args) -> dict:
  step, state, batch, n_params, name, _, _ = _our_step(args)
  seconds, flops, memory = measure(step, state, batch, jax.random.PRNGKey(1), args.steps,
                                   args.repeats)
  return report(f"vit_jax {name}", n_params, args, seconds, flops, memory)


MEMORY_SETTINGS = {
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "remat": {"remat": True},
    "remat+dots_saveable": {"remat": True, "remat_policy": "dots_with_no_batch_dims_saveable"},
    "bf16+remat": {"dtype": "bfloat16", "remat": True},
    "accum4": {"accum_steps": 4},
}


def saved_activation_bytes(loss_fn, params, batch, rng) -> int:
  """Bytes the forward keeps for the backward pass (jax's residuals: what remat and bf16 shrink),
  for one (micro-)batch, from shapes only and independent of the platform."""
  from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top  (no public twin)
  residuals = ad_checkpoint.saved_residuals(lambda p, b: loss_fn(p, b, rng)[0], params, batch)
  # The params and the batch show up as residuals too ("from the argument"); they are counted
  # once, as params (and the batch is the input).
  return int(sum(np.prod(r.shape) * np.dtype(r.dtype).itemsize for r, why in residuals
                 if "from the argument" not in why))


def run_memory(args) -> None:
  """Per-device bytes for each MEMORY_SETTINGS entry, from shapes (nothing runs or is allocated).

  params + gradients + optimizer state + the activations saved for the backward pass is the
  estimate that carries to any accelerator. XLA's own analysis of the CPU compilation is printed
  beside it with --memory-xla, but XLA:CPU drops remat's optimisation barriers and computes bf16 in fp32, so that
  column does not show what remat or bf16 save on a GPU or TPU.
  """
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  print(f"{args.model} batch={args.batch} per device, image={args.image_size}, "
        f"optimizer={args.optimizer} (MiB per device)")
  print(f"{'setting':<22}{'params':>9}{'grads':>9}{'opt state':>11}{'activations':>13}"
        f"{'estimate':>10}{'XLA:CPU peak':>14}")
  for name, overrides in MEMORY_SETTINGS.items():
    step, state, batch, _, _, task, config = _our_step(args, **overrides)
    micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (x.shape[0] // config.accum_steps,) + x.shape[1:], x.dtype), batch)
    acts = saved_activation_bytes(task.loss_fn, state.params, micro, jax.random.PRNGKey(1))
    params, opt = optim.tree_bytes(state.params), optim.tree_bytes(state.opt_state)
    mem = {}
    if args.memory_xla:  # a full compile per setting: minutes for L/16 at 384 px
      mem = train.memory_analysis(step.lower(state, batch, jax.random.PRNGKey(1)).compile())
    mib = lambda b: f"{b / 2**20:,.0f}" if b else "-"
    print(f"{name:<22}{mib(params):>9}{mib(params):>9}{mib(opt):>11}{mib(acts):>13}"
          f"{mib(2 * params + opt + acts):>10}{mib(mem.get('peak', 0)):>14}", flush=True)


def peer_rows(cmd) -> list:
  """Runs a peer script in its own interpreter; returns its `RESULT {json}` rows."""
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
  return [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines()
          if l.startswith("RESULT ")]


def run_peer(args) -> list:
  """timm's step in `--torch-python` (benchmarks/peer_timm.py), eager and torch.compile."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"peer_{args.peer}.py")
  cmd = [args.torch_python, script, "--model", args.model, "--batch", str(args.batch),
         "--image-size", str(args.image_size), "--num-classes", str(args.num_classes),
         "--steps", str(args.steps), "--repeats", str(args.repeats), "--modes", args.peer_modes]
  rows = peer_rows(cmd)
  for r in rows:
    print(f"{r['impl']}: params={r['params']:,} (torch {r['torch']}, timm {r['timm']}, "
          f"{r['threads']} threads)\n  step_time={r['step_ms']:.1f} ms  "
          f"images/s={r['images_per_s']:.2f}  (warm-up {r['warmup_s']:.1f} s)", flush=True)
  return rows


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
  seconds, flops, memory = measure(step, (params, tx.init(params)), jax.device_put(batch),
                           jax.random.PRNGKey(1), args.steps, args.repeats)
  return report(f"upstream models_vit {model_config.model_name}", n_params, args, seconds, flops,
                memory)


PLACEMENTS = {
    "replicate": dict(mesh=(("data", -1),), sharding="replicate"),
    "fsdp": dict(mesh=(("fsdp", -1),), sharding="fsdp"),
    "tensor_parallel": dict(mesh=(("data", -1), ("model", 2)), sharding_rules=("tensor_parallel",)),
}


def run_placements(args) -> None:
  """Our step under each of --placements, alternated over --rounds (best of each), as ratios."""
  names = args.placements.split(",")
  unknown = [n for n in names if n not in PLACEMENTS]
  if unknown:
    sys.exit(f"--placements: unknown {unknown}; expected some of {list(PLACEMENTS)}.")
  best = {}
  for r in range(args.rounds):
    for name in names:
      step, state, batch, n_params, model, _, _ = _our_step(args, **PLACEMENTS[name])
      seconds, flops, memory = measure(step, state, batch, jax.random.PRNGKey(1), args.steps,
                                       args.repeats)
      del state
      if r == 0:
        report(f"vit_jax {model} [{name}]", n_params, args, seconds, flops, memory)
      best[name] = min(best.get(name, float("inf")), seconds)
  base = names[0]
  for name in names:
    print(f"{name}: {best[name] * 1e3:.1f} ms/step (best of {args.rounds} rounds) = "
          f"{best[name] / best[base]:.2f}x {base}", flush=True)


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
  ap.add_argument("--peer", choices=["timm"], help="time this PyTorch peer too (--torch-python)")
  ap.add_argument("--torch-python", default=sys.executable,
                  help="the interpreter that has torch + timm (e.g. .venv-timm/bin/python)")
  ap.add_argument("--peer-modes", default="eager,compile")
  ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table)")
  ap.add_argument("--placements", help="comma list of " + ",".join(PLACEMENTS) +
                  ": time our step under each (pjit, all devices)")
  ap.add_argument("--rounds", type=int, default=2, help="--placements: alternations")
  ap.add_argument("--memory", action="store_true",
                  help="print per-device memory for each setting, from shapes (nothing runs)")
  ap.add_argument("--memory-xla", action="store_true",
                  help="with --memory: also compile each setting for XLA:CPU's own analysis")
  args = ap.parse_args()

  if args.memory:
    run_memory(args)
    return
  if args.placements:
    run_placements(args)
    return

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
  peers = run_peer(args) if args.peer else []
  ours = run_ours(args)
  for r in rows + peers:
    print(f"vit_jax / {r['impl']}: {ours['images_per_s'] / r['images_per_s']:.2f}x")


if __name__ == "__main__":
  main()
