"""open_clip's CLIP train step, the peer of benchmarks/clip_step.py, run by it in another venv.

    PY benchmarks/peer_open_clip.py --model b32 --batch 32 [--modes eager,compile]

Imports only torch and open_clip (their own venv, as peer_timm.py). The step matches ours: the
same model (open_clip's `ViT-B-32-quickgelu` etc., randomly initialised, pretrained=None; presets
open_clip lacks, e.g. our nano, are built as `open_clip.CLIP` from --spec, our config's sizes),
batch, image size and context length; the symmetric InfoNCE loss (`open_clip.ClipLoss`); AdamW
(betas 0.9/0.98, weight decay 0.1 off 1-D params, as open_clip's trainer), global-norm clipping
at 1 and the logit-scale clamp at ln 100 after the update. --dtype bfloat16 runs under autocast
(params stay fp32, as ours). On CUDA, fp32 matmuls may use TF32, as JAX's default precision
does there. Prints one `RESULT {json}` line per mode.
"""
import argparse
import contextlib
import json
import math
import os

import peer_timing  # benchmarks/, on sys.path as the script's own folder

# open_clip's names for our presets: all quick_gelu, as OpenAI's (and our) CLIP.
OPEN_CLIP_NAMES = {"b32": "ViT-B-32-quickgelu", "b16": "ViT-B-16-quickgelu",
                   "l14": "ViT-L-14-quickgelu"}


def build_model(args):
  import open_clip  # pylint: disable=g-import-not-at-top
  name = OPEN_CLIP_NAMES.get(args.model.lower().replace("/", "").replace("-", ""))
  if name:
    model = open_clip.create_model(name, pretrained=None, force_image_size=args.image_size,
                                   force_context_length=args.context_length)
    return model, name
  if not args.spec:
    raise SystemExit(f"--model {args.model}: open_clip has no preset of that size; pass --spec "
                     "(clip_step.py does) or one of " + ", ".join(OPEN_CLIP_NAMES))
  s = json.loads(args.spec)
  (vw, vl, vh), (tw, tl, th) = s["vision"], s["text"]
  vision = dict(image_size=args.image_size, patch_size=s["patch"], width=vw, layers=vl,
                head_width=vw // vh, mlp_ratio=s["vision_mlp_ratio"])
  text = dict(context_length=args.context_length, vocab_size=s["vocab_size"], width=tw,
              heads=th, layers=tl, mlp_ratio=s["text_mlp_ratio"])
  model = open_clip.CLIP(s["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True)
  return model, f"CLIP(spec: vision {vw}x{vl}x{vh}/{s['patch']}, text {tw}x{tl}x{th})"


def synthetic_batch(torch, batch, image_size, context_length, vocab_size, device):
  """Images [b, 3, h, w] ~ N(0, 1); tokens [b, context]: start, random ids, end (the largest id,
  where the text tower pools), zero padding; lengths drawn from [2, context]."""
  g = torch.Generator().manual_seed(0)
  images = torch.randn(batch, 3, image_size, image_size, generator=g)
  tokens = torch.zeros(batch, context_length, dtype=torch.long)
  lengths = torch.randint(2, context_length + 1, (batch,), generator=g)
  for i, n in enumerate(lengths.tolist()):
    tokens[i, 0] = vocab_size - 2
    tokens[i, 1:n - 1] = torch.randint(1, vocab_size - 2, (n - 2,), generator=g)
    tokens[i, n - 1] = vocab_size - 1
  return images.to(device), tokens.to(device)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="b32")
  ap.add_argument("--spec", help="JSON sizes for a model open_clip has no preset of")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--context-length", type=int, default=77)
  ap.add_argument("--vocab-size", type=int, default=49408)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--modes", default="eager,compile")
  ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
  ap.add_argument("--threads", type=int, default=os.cpu_count(),
                  help="CPU threads (default: all; fewer on a shared machine, where idle-spinning "
                  "OpenMP threads that wait for busy cores slow every op down)")
  args = ap.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  import open_clip  # pylint: disable=g-import-not-at-top
  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  torch.set_num_threads(args.threads)
  if device.type == "cuda":
    torch.set_float32_matmul_precision("high")  # TF32, as XLA's default on NVIDIA
  sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if (
      args.dtype == "bfloat16") else contextlib.nullcontext
  torch.manual_seed(0)
  images, tokens = synthetic_batch(torch, args.batch, args.image_size, args.context_length,
                                   args.vocab_size, device)

  for mode in args.modes.split(","):
    model, name = build_model(args)
    model.to(device).train()
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "logit_scale" in n)]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": 0.1}],
                            lr=1e-5, betas=(0.9, 0.98), eps=1e-8)
    loss_fn = open_clip.ClipLoss()
    n_params = sum(p.numel() for p in model.parameters())

    def step(x, t):
      opt.zero_grad(set_to_none=True)
      with autocast():
        image_features, text_features, logit_scale = model(x, t)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
      return loss

    fn = torch.compile(step) if mode == "compile" else step
    best, warmup = peer_timing.time_step(fn, (images, tokens), args.steps, args.repeats, sync)
    row = dict(impl=f"open_clip {mode} {name}", params=n_params, images_per_s=args.batch / best,
               step_ms=best * 1e3, warmup_s=warmup, torch=torch.__version__,
               open_clip=open_clip.__version__, device=str(device),
               threads=torch.get_num_threads())
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
