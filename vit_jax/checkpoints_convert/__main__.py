r"""Converts a ViT checkpoint between formats.

  python -m vit_jax.checkpoints_convert SRC DST [--model b16] [--image-size 384]
      [--num-classes N] [--resize-method bilinear|bicubic|bicubic_antialias] [--num-heads N]

SRC: upstream/AugReg/big_vision `.npz` (`file.npz:img` for a sub-model), an HF directory or
file, or a timm state dict. DST ending in `.npz`: upstream-style npz; anything else: an HF
`ViTForImageClassification` directory. Prints the detected format, the model, what was resized
or dropped, and the parameter count.
"""
import argparse
import sys

from vit_jax.checkpoints_convert import common
from vit_jax.checkpoints_convert import core
from vit_jax.checkpoints_convert import npz
from vit_jax.checkpoints_convert import posemb
from vit_jax.checkpoints_convert import torch as torch_formats

_ARCH_FIELDS = (("patch", lambda c: tuple(c.patches.size)), ("width", lambda c: c.hidden_size),
                ("layers", lambda c: c.transformer.num_layers),
                ("mlp_dim", lambda c: c.transformer.mlp_dim),
                ("heads", lambda c: c.transformer.num_heads))


def _describe(c) -> str:
  arch = ", ".join(f"{n}={f(c)}" for n, f in _ARCH_FIELDS)
  return (f"{c.name}: {arch}, classifier={c.classifier}, "
          f"representation_size={c.representation_size}, "
          f"gelu={'tanh' if c.approximate_gelu else 'erf'}, "
          f"layernorm_epsilon={c.layernorm_epsilon:g}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_jax.checkpoints_convert",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("src")
  parser.add_argument("dst", help="*.npz: upstream npz; otherwise an HF directory")
  parser.add_argument("--model", help="model preset (b16, ViT-B_16, ...): gives the number of "
                      "heads where the file does not (timm), and is checked against the file")
  parser.add_argument("--num-heads", type=int,
                      help="attention heads, for a timm file of a width no preset has")
  parser.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                      help="resample position embeddings for this size (one value, or H W)")
  parser.add_argument("--num-classes", type=int, default=-1,
                      help="new head size (zero-initialised); default: keep the checkpoint's")
  parser.add_argument("--resize-method", default="bilinear", choices=posemb.METHODS)
  args = parser.parse_args(argv)

  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  preset = models.get_model_config(args.model) if args.model else None
  try:
    heads = args.num_heads or (preset.transformer.num_heads if preset else None)
    ckpt = core.read(args.src, num_heads=heads)
    print(f"detected: {ckpt.format} ({ckpt.path})")
    model_config = ckpt.model_config()
    if preset is not None:
      # --model names the architecture; activation, pooling and head come from the file.
      diff = [f"{n}: --model {f(preset)} vs file {f(model_config)}" for n, f in _ARCH_FIELDS
              if f(preset) != f(model_config)]
      if diff:
        raise common.CheckpointError(f"--model {args.model} does not match the checkpoint: "
                                     + "; ".join(diff))
    image_size = tuple((args.image_size * 2)[:2]) if args.image_size else ckpt.image_size()
    params, model_config, notes = core.fit_to_model(
        ckpt, model_config, image_size=image_size, num_classes=args.num_classes,
        resize_method=args.resize_method)
  except (common.CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"model: {_describe(model_config)}")
  for note in notes:
    print(f"  {note}")
  flat = common.flatten(params)
  print(f"parameters: {common.num_params(flat):,}")
  try:
    if args.dst.endswith(".npz"):
      npz.export_npz(params, args.dst)
      print(f"wrote upstream .npz: {args.dst} ({len(flat)} arrays)")
      if not model_config.approximate_gelu or model_config.layernorm_epsilon != 1e-6:
        # The npz format stores arrays only; every npz reader assumes upstream's model.
        print(f"  note: .npz records no activation; readers assume tanh gelu and LayerNorm eps "
              f"1e-6. Load it with model.approximate_gelu={model_config.approximate_gelu}, "
              f"model.layernorm_epsilon={model_config.layernorm_epsilon:g} for exact outputs.")
    else:
      torch_formats.export_hf(params, model_config, args.dst, image_size=image_size)
      print(f"wrote HF ViTForImageClassification directory: {args.dst}")
  except common.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
