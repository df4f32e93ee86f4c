"""timm's ViT train step, the peer of benchmarks/train_step.py; run by it in another interpreter.

    PY benchmarks/peer_timm.py --model ti16 --batch 32 [--compile]

Imports only torch and timm (they live in their own venv: timm needs torchvision, which does not
import beside the test extras' CPU torch). The step matches ours: the same image size and batch,
soft-label softmax cross-entropy, global-norm clipping at 1, SGD with momentum 0.9, fp32. Prints
one `RESULT {json}` line per mode.
"""
import argparse
import json
import os

import peer_timing  # benchmarks/, on sys.path as the script's own folder

# timm's names for our presets.
TIMM_NAMES = {"ti16": "vit_tiny_patch16_224", "s16": "vit_small_patch16_224",
              "s32": "vit_small_patch32_224", "b16": "vit_base_patch16_224",
              "b32": "vit_base_patch32_224", "b8": "vit_base_patch8_224",
              "l16": "vit_large_patch16_224", "l32": "vit_large_patch32_224",
              "h14": "vit_huge_patch14_224"}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="ti16")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--modes", default="eager,compile")
  args = ap.parse_args()
  if args.model not in TIMM_NAMES:
    raise SystemExit(f"--model {args.model}: timm has no preset of that size; expected one of "
                     f"{', '.join(TIMM_NAMES)}.")

  import torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  images = torch.randn(args.batch, 3, args.image_size, args.image_size)
  labels = torch.nn.functional.one_hot(torch.randint(0, args.num_classes, (args.batch,)),
                                       args.num_classes).float()

  for mode in args.modes.split(","):
    model = timm.create_model(TIMM_NAMES[args.model], pretrained=False,
                              num_classes=args.num_classes, img_size=args.image_size)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    n_params = sum(p.numel() for p in model.parameters())

    def step(x, y):
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      return loss

    fn = torch.compile(step) if mode == "compile" else step
    best, warmup = peer_timing.time_step(fn, (images, labels), args.steps, args.repeats)
    row = dict(impl=f"timm {mode} {TIMM_NAMES[args.model]}", params=n_params,
               images_per_s=args.batch / best, step_ms=best * 1e3, warmup_s=warmup,
               torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
