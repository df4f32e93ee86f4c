"""Throughput of the CLIP contrastive train step: images/s, step time, XLA GFLOP/step, memory.

    python benchmarks/clip_step.py                        # CLIP B/32, 224 px, context 77, batch 32
    python benchmarks/clip_step.py --model b32 --batch 32 --peer open_clip \
        --torch-python .venv-timm/bin/python
    python benchmarks/clip_step.py --model nano --image-size 16 --steps 1 --repeats 1  # smoke test

Runs the real step from vit_jax.train (`make_train_step` with the contrastive task's loss: CLIP's
symmetric InfoNCE over the whole batch; forward and backward through both towers, the config's
AdamW update with global-norm clipping at 1, donated state) on a synthetic batch: images at
--image-size and token sequences of --context-length (start, random ids, end, padding). The best
of --repeats windows of --steps steps is reported, with the model FLOP utilisation and the
compiled step's per-device memory (train_step.py's `measure` / `report`).

--peer open_clip --torch-python PY also times open_clip's model of the same size in that
interpreter (benchmarks/peer_open_clip.py: `ViT-B-32-quickgelu` for b32, pretrained=None; the
same batch, AdamW, clipping and `open_clip.ClipLoss`), eager and `torch.compile`, and prints our
speed as a ratio of each.
"""
import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def synthetic_batch(batch: int, image_size: int, context_length: int, vocab_size: int):
  """{"image": [batch, size, size, 3] ~ N(0, 1), "tokens": [batch, context] int32}: each sequence
  is start, random ids, end (the largest id, where the text tower pools), zero padding, with a
  length drawn from [2, context]."""
  rng = np.random.RandomState(0)
  tokens = np.zeros((batch, context_length), np.int32)
  for i, n in enumerate(rng.randint(2, context_length + 1, batch)):
    tokens[i, 0] = vocab_size - 2
    tokens[i, 1:n - 1] = rng.randint(1, vocab_size - 2, n - 2)
    tokens[i, n - 1] = vocab_size - 1
  return {"image": rng.randn(batch, image_size, image_size, 3).astype(np.float32),
          "tokens": tokens}


def make_config(args):
  """configs/clip.py for --model with this benchmark's batch, size, context and dtype, 1 device."""
  from vit_jax.configs import clip as clip_config  # pylint: disable=g-import-not-at-top
  config = clip_config.get_config(f"{args.model},captions")
  config.unlock()
  config.batch = config.batch_eval = args.batch
  config.dtype, config.mesh = args.dtype, [("data", 1)]
  config.model.image_size = args.image_size
  config.context_length = config.model.text.context_length = args.context_length
  return config


def peer_spec(model_config) -> dict:
  """Our CLIP's sizes, for the peer to build the same model where open_clip has no preset."""
  img, txt = model_config.image, model_config.text
  return dict(embed_dim=model_config.embed_dim, patch=img.patches.size[0],
              vision=[img.hidden_size, img.transformer.num_layers, img.transformer.num_heads],
              vision_mlp_ratio=img.transformer.mlp_dim / img.hidden_size,
              text=[txt.width, txt.num_layers, txt.num_heads],
              text_mlp_ratio=txt.mlp_dim / txt.width, vocab_size=txt.vocab_size)


def run_ours(args, config) -> dict:
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  backend = parallel.PjitBackend(config)
  task = train.get_task(config)
  batch = synthetic_batch(args.batch, args.image_size, args.context_length,
                          config.model.text.vocab_size)
  init = lambda rng: train.create_train_state(config, task, rng, batch)[0]
  state = backend.put_state(jax.jit(init)(jax.random.PRNGKey(0)))
  tx, schedules = optim.make_optimizer(config, state.params)
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  seconds, flops, memory = bench.measure(step, state, backend.put_batch(batch),
                                         jax.random.PRNGKey(1), args.steps, args.repeats)
  return bench.report(f"vit_jax {config.model.name} contrastive", n_params, args, seconds, flops,
                      memory)


def run_peer(args, config) -> list:
  """open_clip's step in `--torch-python` (benchmarks/peer_open_clip.py), eager and compiled."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"peer_{args.peer}.py")
  name = config.model.name.replace("CLIP-", "").replace("_", "").lower()  # CLIP-B_32 -> b32
  cmd = [args.torch_python, script, "--model", name, "--spec",
         json.dumps(peer_spec(config.model)), "--batch", str(args.batch), "--image-size",
         str(args.image_size), "--context-length", str(args.context_length), "--vocab-size",
         str(config.model.text.vocab_size), "--dtype", args.dtype, "--steps", str(args.steps),
         "--repeats", str(args.repeats), "--modes", args.peer_modes]
  if args.peer_device:
    cmd += ["--device", args.peer_device]
  if args.peer_threads:
    cmd += ["--threads", str(args.peer_threads)]
  rows = bench.peer_rows(cmd)
  for r in rows:
    print(f"{r['impl']}: params={r['params']:,} (torch {r['torch']}, open_clip "
          f"{r['open_clip']}, {r['device']}, {r['threads']} threads)\n  "
          f"step_time={r['step_ms']:.1f} ms  images/s={r['images_per_s']:.2f}  "
          f"(warm-up {r['warmup_s']:.1f} s)", flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="b32", help="a CLIP preset of configs/models.py")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--context-length", type=int, default=77)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--steps", type=int, default=5, help="steps per timed window")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--peer", choices=["open_clip"], help="time this PyTorch peer too")
  ap.add_argument("--torch-python", default=sys.executable,
                  help="the interpreter that has torch + open_clip (e.g. .venv-timm/bin/python)")
  ap.add_argument("--peer-modes", default="eager,compile")
  ap.add_argument("--peer-device", help="cpu | cuda (default: cuda if the peer's torch has it)")
  ap.add_argument("--peer-threads", type=int, help="the peer's CPU threads (default: all)")
  ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table)")
  args = ap.parse_args()
  config = make_config(args)
  args.optimizer = config.optimizer  # what `bench.report` prints (configs/clip.py: adamw)
  peers = run_peer(args, config) if args.peer else []
  ours = run_ours(args, config)
  for r in peers:
    print(f"vit_jax / {r['impl']}: {ours['images_per_s'] / r['images_per_s']:.2f}x")


if __name__ == "__main__":
  main()
