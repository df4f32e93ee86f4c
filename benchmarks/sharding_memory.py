"""Per-device memory of the train step under each placement (replicated, FSDP), from shapes only.

    python benchmarks/sharding_memory.py --no-compile        # shapes only: seconds per model
    python benchmarks/sharding_memory.py --models l16_384 --placements replicate,fsdp8
    python benchmarks/sharding_memory.py --settings fp32,bf16+remat --markdown
    python benchmarks/sharding_memory.py --placements replicate,fsdp4,fsdp8,fsdp64  # v4-8: 4
    python benchmarks/sharding_memory.py --models owl_l14 --per-device-batch 2

For each model (MODELS below: ViT B/16 224 and L/16 384 on 1000 classes, CLIP L/14 224 with
context 77, OWL-ViT L/14 840 with its config's boxes and queries), placement and setting it builds
the real train state of vit_jax.train (AdamW, fp32 moments, fp32 params) with `jax.eval_shape`,
places it with the pjit back-end's plan (`backend.shardings`), and lowers and compiles the real
train step on ShapeDtypeStructs that carry those shardings (the batch with
`backend.batch_sharding`): nothing is allocated or run. Per device it prints params, optimizer
state, the activations jax saves for the backward pass (for the per-device batch), the estimate
params + grads + optimizer state + activations (grads are sharded like the params), and XLA's
memory analysis of the compiled step (arguments, temporaries, peak).

Placements: `replicate` (mesh [("data", 8)]), `fsdpN` (mesh [("fsdp", N)], config.sharding
"fsdp"; `fsdp` alone is fsdp8), `replicateN`. The devices are fake CPU devices
(--xla_force_host_platform_device_count), which a process fixes when jax starts: each model runs
in one subprocess per device count (this script with --worker-devices, one model per process so a
crash loses one model's rows), which prints `RESULT {json}` lines that the parent collects.
Settings are train_step.py's MEMORY_SETTINGS (fp32, bf16, remat, bf16+remat, remat+dots_saveable,
accum4). The global batch is --per-device-batch x devices.

Cost on 2 CPU cores: --no-compile ~3.5 min for all four models; with compiles, 20-90 s per row on 8
devices and 1-7 min per row on 64 (~45 min for all models, 3 placements, fp32 and bf16+remat).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

import jax
import numpy as np

from vit_jax import optim
from vit_jax import parallel
from vit_jax import train
from vit_jax.configs import owl_vit as owl_config
from vit_jax.configs import vit as vit_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_step  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as bench  # pylint: disable=g-import-not-at-top,wrong-import-position

# name: (task, preset of configs/models.py, image size, default per-device batch). OWL-ViT at 840
# px is 3,600 patches per image: without remat one image alone saves ~47 GiB of activations in
# fp32 (mostly attention maps), so one image per device.
MODELS = {
    "b16": ("classification", "b16", 224, 8),
    "l16_384": ("classification", "l16", 384, 8),
    "clip_l14": ("contrastive", "l14", 224, 8),
    "owl_l14": ("detection", "l14", 840, 1),
}
DEFAULT_SETTINGS = "fp32,bf16,remat,bf16+remat"
DEFAULT_DEVICES = 8  # of `replicate` and `fsdp` without a count
CONTEXT_LENGTH = 77  # CLIP's
MIB = 2**20

HEADER = """\
Per-device MiB of the train step: AdamW (fp32 moments), fp32 params, bf16 = compute dtype only.
  params, opt state: what each device holds under the placement's plan (backend.shardings);
  activations: jax's saved residuals for the per-device batch (what remat and bf16 shrink on any
    accelerator; placement-independent);
  estimate = params + grads (sharded like the params) + opt state + activations;
  XLA args / temp / peak: XLA:CPU's memory analysis of the compiled step on fake CPU devices.
  XLA:CPU drops remat's optimisation barriers (it recomputes nothing) and computes bf16 in fp32,
  so its temporaries do NOT show what remat or bf16 save on a GPU or TPU (README, "Train-step
  speed, memory and MFU"): read the estimate for those; XLA's columns show what sharding changes."""


def parse_placement(name: str):
  """'replicate' | 'replicateN' | 'fsdp' | 'fsdpN' -> (strategy, devices, mesh)."""
  m = re.fullmatch(r"(replicate|fsdp)(\d*)", name)
  if not m:
    raise ValueError(f"--placements entry {name!r}: expected replicate[N] or fsdp[N], e.g. fsdp8.")
  strategy, n = m.group(1), int(m.group(2) or DEFAULT_DEVICES)
  return strategy, n, [("data" if strategy == "replicate" else "fsdp", n)]


def parse_batches(arg, models):
  """--per-device-batch: '4' (every model) or 'b16=16,owl_l14=2' (the rest keep MODELS')."""
  out = {m: MODELS[m][3] for m in models}
  if not arg:
    return out
  if "=" not in arg:
    return {m: int(arg) for m in models}
  for item in arg.split(","):
    name, _, n = item.partition("=")
    if name not in MODELS:
      raise ValueError(f"--per-device-batch {arg!r}: unknown model {name!r}.")
    out[name] = int(n)
  return {m: out[m] for m in models}


def write_category_json(directory: str, num_classes: int = 80) -> str:
  """A COCO json with categories and no images: all the detection task reads before training
  (its class names become the query prompts; the model's params do not depend on them)."""
  path = os.path.join(directory, "train.json")
  with open(path, "w") as f:
    json.dump({"images": [], "annotations": [], "categories": [
        {"id": i + 1, "name": f"object {i}"} for i in range(num_classes)]}, f)
  return path


def make_config(model: str, global_batch: int, mesh, strategy: str, overrides, coco_json: str):
  """The model's own config (task, optimizer groups) at this batch, mesh and setting."""
  task, preset, size, _ = MODELS[model]
  if task == "classification":
    config = vit_config.get_config(f"{preset},imagenet2012")  # 1000 classes
  elif task == "contrastive":
    config = clip_step.make_config(types.SimpleNamespace(
        model=preset, batch=global_batch, dtype="float32", image_size=size,
        context_length=CONTEXT_LENGTH))
  else:
    config = owl_config.get_config(f"{preset},{coco_json}")
  config.unlock()
  config.batch = config.batch_eval = global_batch
  # The ViT fine-tuning recipe is SGD with bf16 momentum; compare every model under AdamW.
  config.optimizer, config.optim_dtype = "adamw", "float32"
  config.mesh, config.sharding, config.parallelism = mesh, strategy, "pjit"
  config.update(overrides)
  return config


def example_batch(model: str, config) -> dict:
  """One row of the task's training batch (numpy): shapes and dtypes, scaled up as specs."""
  task, _, size, _ = MODELS[model]
  if task == "classification":
    return bench.synthetic_batch(1, size, config.num_classes)
  if task == "contrastive":
    return clip_step.synthetic_batch(1, size, config.context_length,
                                     config.model.text.vocab_size)
  m, q = config.detection.max_boxes, config.detection.max_queries
  return {"image": np.zeros((1, size, size, 3), np.float32),
          "boxes": np.zeros((1, m, 4), np.float32),
          "box_classes": np.zeros((1, m), np.int32),
          "query_classes": np.zeros((1, q), np.int32)}


def batch_specs(example: dict, rows: int, sharding=None) -> dict:
  return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype, sharding=sharding)
          for k, v in example.items()}


def unsplit_params(state, shardings):
  """(count, bytes) of param leaves that the plan leaves whole on every device."""
  leaves = jax.tree.leaves(state.params)
  specs = jax.tree.leaves(shardings.params, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  whole = [x for x, s in zip(leaves, specs) if s.is_fully_replicated]
  return len(whole), sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in whole)


def measure(model, placement, setting, per_device, compile_step, coco_json, acts_cache) -> dict:
  """One row: bytes per device of `model` under `placement` and `setting`."""
  strategy, n, mesh = parse_placement(placement)
  config = make_config(model, per_device * n, mesh, strategy, bench.MEMORY_SETTINGS[setting],
                       coco_json)
  backend = parallel.get_backend(config, jax.devices()[:n])
  task = train.get_task(config)
  example = example_batch(model, config)
  state = jax.eval_shape(lambda rng: train.create_train_state(config, task, rng, example)[0],
                         jax.random.PRNGKey(0))
  held = train.state_memory(state, backend)
  n_whole, whole_bytes = unsplit_params(state, backend.shardings(state))
  if setting not in acts_cache:  # the same for every placement: the per-device batch
    micro = batch_specs(example, per_device // config.accum_steps)
    acts_cache[setting] = bench.saved_activation_bytes(task.loss_fn, state.params, micro,
                                                       jax.random.PRNGKey(1))
  row = dict(model=model, placement=placement, setting=setting, devices=n,
             per_device_batch=per_device,
             params=sum(x.size for x in jax.tree.leaves(state.params)),
             params_bytes=held["params"], opt_bytes=held["opt_state"],
             act_bytes=acts_cache[setting], unsplit_leaves=n_whole, unsplit_bytes=whole_bytes)
  row["estimate_bytes"] = 2 * row["params_bytes"] + row["opt_bytes"] + row["act_bytes"]
  if compile_step:
    row.update(compile_memory(config, task, backend, state, example, per_device * n))
  return row


def compile_memory(config, task, backend, state, example, global_batch) -> dict:
  """XLA's per-device memory analysis of the real step, compiled for abstract, placed inputs."""
  tx, schedules = optim.make_optimizer(config, state.params)
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  batch = batch_specs(example, global_batch, backend.batch_sharding)
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=backend.replicated)
  t0 = time.perf_counter()
  compiled = step.lower(backend.restore_target(state), batch, rng).compile()
  seconds = time.perf_counter() - t0
  mem = train.memory_analysis(compiled)
  jax.clear_caches()  # one process compiles many large steps: keep only the numbers
  return dict(compile_s=seconds, **{f"xla_{k}_bytes": v for k, v in mem.items()})


def worker(args) -> None:
  """In a process with --worker-devices fake devices: one RESULT line per row."""
  models, settings = args.models.split(","), args.settings.split(",")
  batches = parse_batches(args.per_device_batch, models)
  with tempfile.TemporaryDirectory() as tmp:
    coco_json = write_category_json(tmp)
    for model in models:
      acts_cache = {}
      for placement in args.placements.split(","):
        for setting in settings:
          try:
            row = measure(model, placement, setting, batches[model], not args.no_compile,
                          coco_json, acts_cache)
          except Exception as e:  # pylint: disable=broad-except  (one failed row, not the run)
            row = dict(model=model, placement=placement, setting=setting,
                       error=f"{type(e).__name__}: {e}")
          print("RESULT " + json.dumps(row), flush=True)


def run_worker(args, model: str, devices: int, placements) -> list:
  """This script in a process with `devices` fake CPU devices; returns its rows as they come."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker-devices", str(devices),
         "--models", model, "--placements", ",".join(placements), "--settings", args.settings]
  cmd += ["--per-device-batch", args.per_device_batch] if args.per_device_batch else []
  cmd += ["--no-compile"] if args.no_compile else []
  rows = []
  with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
    for line in proc.stdout:
      if line.startswith("RESULT "):
        rows.append(json.loads(line[len("RESULT "):]))
        print(format_row(rows[-1]), flush=True)
      else:
        print(line, end="")
  if proc.returncode:
    print(f"  worker for {model} on {devices} devices exited with status {proc.returncode}",
          flush=True)
  return rows


COLUMNS = (("model", 9, "model"), ("placement", 10, "placement"), ("setting", 11, "setting"),
           ("params_bytes", 8, "params"), ("opt_bytes", 10, "opt state"),
           ("act_bytes", 12, "activations"), ("estimate_bytes", 9, "estimate"),
           ("xla_argument_bytes", 9, "XLA args"), ("xla_temp_bytes", 9, "XLA temp"),
           ("xla_peak_bytes", 9, "XLA peak"), ("compile_s", 10, "compile s"))


def cell(row: dict, key: str) -> str:
  value = row.get(key)
  if value is None:
    return "-"
  if key == "compile_s":
    return f"{value:.0f}"
  return f"{value / MIB:,.0f}" if key.endswith("_bytes") else str(value)


def format_row(row: dict) -> str:
  if "error" in row:
    return f"{row['model']:<9}{row['placement']:<10}{row['setting']:<11}  FAILED: {row['error']}"
  first = "".join(f"{cell(row, k):<{w}}" for k, w, _ in COLUMNS[:3])
  return first + "".join(f"{cell(row, k):>{w}}" for k, w, _ in COLUMNS[3:])


def format_header() -> str:
  return ("".join(f"{t:<{w}}" for _, w, t in COLUMNS[:3]) +
          "".join(f"{t:>{w}}" for _, w, t in COLUMNS[3:]))


def markdown(rows) -> str:
  lines = ["| " + " | ".join(t for _, _, t in COLUMNS) + " |",
           "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['placement']} | {r['setting']} | failed: "
                   f"{r['error'][:200]} |" + " |" * (len(COLUMNS) - 4))
    else:
      lines.append("| " + " | ".join(cell(r, k) for k, _, _ in COLUMNS) + " |")
  return "\n".join(lines)


def ratio_lines(rows) -> list:
  """(params + opt state) per device of each fsdp placement over replicate's, per model."""
  held = {}
  for r in rows:
    if "error" not in r:
      held.setdefault(r["model"], {})[r["placement"]] = r["params_bytes"] + r["opt_bytes"]
  out = []
  for model, by_placement in held.items():
    base = by_placement.get("replicate")
    for placement, value in by_placement.items():
      if base and placement.startswith("fsdp"):
        aim = "  (aim <= 1/6: " + ("met)" if value / base <= 1 / 6 else "NOT met)") if (
            parse_placement(placement)[1] == 8) else ""
        out.append(f"{model}: (params + opt state) per device, {placement} / replicate = "
                   f"{value / base:.3f} (1/{base / value:.1f}){aim}")
  return out


def unsplit_lines(rows) -> list:
  """Per model and fsdp placement: the param leaves that stay whole (below fsdp_min_size, or with
  no dimension that divides the axis)."""
  seen, out = set(), []
  for r in rows:
    key = (r["model"], r["placement"])
    if "error" in r or key in seen or not r["placement"].startswith("fsdp"):
      continue
    seen.add(key)
    out.append(f"{r['model']} {r['placement']}: {r['unsplit_leaves']} param leaves replicated, "
               f"{r['unsplit_bytes'] / MIB:.2f} MiB per device")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {', '.join(MODELS)}")
  ap.add_argument("--placements", default="replicate,fsdp8,fsdp64",
                  help="replicate[N] (default N 8), fsdp[N]")
  ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                  help=f"of {', '.join(bench.MEMORY_SETTINGS)}")
  ap.add_argument("--per-device-batch", default=None,
                  help="N for every model, or MODEL=N,... (default: " +
                  ", ".join(f"{m} {v[3]}" for m, v in MODELS.items()) + ")")
  ap.add_argument("--no-compile", action="store_true", help="shapes only: no XLA columns")
  ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
  ap.add_argument("--worker-devices", type=int, help=argparse.SUPPRESS)
  args = ap.parse_args()
  models, placements = args.models.split(","), args.placements.split(",")
  for name in models:
    if name not in MODELS:
      ap.error(f"--models: unknown {name!r}; expected some of {', '.join(MODELS)}.")
  for name in args.settings.split(","):
    if name not in bench.MEMORY_SETTINGS:
      ap.error(f"--settings: unknown {name!r}; expected some of "
               f"{', '.join(bench.MEMORY_SETTINGS)}.")
  by_devices = {}
  for p in placements:
    try:
      by_devices.setdefault(parse_placement(p)[1], []).append(p)
    except ValueError as e:
      ap.error(str(e))
  if args.worker_devices:
    return worker(args)

  batches = parse_batches(args.per_device_batch, models)
  print(HEADER)
  print("Per-device batch: " + ", ".join(f"{m} {b}" for m, b in batches.items()) +
        " (global batch = per-device x devices); placements: " + ", ".join(
            f"{p} = {parse_placement(p)[2]}" for p in placements) + "\n")
  print(format_header(), flush=True)
  t0 = time.perf_counter()
  rows = []
  for model in models:
    for devices, group in by_devices.items():
      rows += run_worker(args, model, devices, group)
  print(f"\nWall time {time.perf_counter() - t0:.0f} s")
  print("\n".join(ratio_lines(rows) + unsplit_lines(rows)))
  if args.markdown:
    print("\n" + markdown(rows))


if __name__ == "__main__":
  main()
