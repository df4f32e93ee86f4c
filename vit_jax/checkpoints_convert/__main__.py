r"""Converts a ViT or CLIP checkpoint between formats.

  python -m vit_jax.checkpoints_convert SRC DST [--model b16] [--image-size 384]
      [--num-classes N] [--resize-method bilinear|bicubic|bicubic_antialias] [--num-heads N]
      [--context-length 16] [--text-resize-method truncate|bilinear|...]
      [--hidden-act quick_gelu|gelu] [--vision-heads N] [--text-heads N]

SRC: upstream/AugReg/big_vision `.npz` (`file.npz:img` for a sub-model), an HF directory or
file, or a timm state dict; or a CLIP checkpoint: an HF `CLIPModel` directory or file, a CLIP
`.npz` written here, an OpenAI CLIP `.pt` (TorchScript, read without running it) or an open_clip
state dict (`--hidden-act gelu` for open_clip's LAION models, whose names lack -quickgelu).
DST ending in `.npz`: upstream-style npz (CLIP: our '/'-joined names);
anything else: an HF `ViTForImageClassification` (CLIP: `CLIPModel`) directory. Prints the
detected format, the model, what was resized or dropped, and the parameter count.
"""
import argparse
import sys

from vit_jax.checkpoints_convert import clip
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
  parser.add_argument("--model", help="model preset (b16, ViT-B_16, ...; CLIP: b32, l14): gives "
                      "the heads where the file does not (timm), and is checked against the file")
  parser.add_argument("--num-heads", type=int,
                      help="attention heads, for a timm file of a width no preset has")
  parser.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                      help="resample position embeddings for this size (one value, or H W)")
  parser.add_argument("--num-classes", type=int, default=-1,
                      help="new head size (zero-initialised); default: keep the checkpoint's")
  parser.add_argument("--resize-method", default="bilinear", choices=posemb.METHODS)
  parser.add_argument("--context-length", type=int,
                      help="CLIP: text tokens per sequence (OWL-ViT: 16)")
  parser.add_argument("--text-resize-method", default="truncate",
                      choices=clip.TEXT_RESIZE_METHODS,
                      help="CLIP: how a shorter (or longer) context gets its position embeddings")
  parser.add_argument("--hidden-act", choices=clip.HIDDEN_ACTS,
                      help="OpenAI / open_clip CLIP: the MLP activation, which the weights do not "
                      "tell; default quick_gelu (OpenAI, open_clip *-quickgelu); open_clip's "
                      "LAION models (names without -quickgelu) need gelu")
  parser.add_argument("--vision-heads", type=int,
                      help="CLIP: image-tower attention heads where the file does not record "
                      "them (default: 64-wide heads)")
  parser.add_argument("--text-heads", type=int,
                      help="CLIP: text-tower attention heads where the file does not record them")
  args = parser.parse_args(argv)

  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  try:
    state = core.read_state(args.src)
    if clip.is_clip(list(state.arrays)):
      return _main_clip(args, state)
    given = [flag for flag, value in (("--context-length", args.context_length),
                                      ("--hidden-act", args.hidden_act),
                                      ("--vision-heads", args.vision_heads),
                                      ("--text-heads", args.text_heads)) if value is not None]
    if given:
      raise common.CheckpointError(f"{', '.join(given)}: for CLIP checkpoints; this is a ViT.")
    preset = models.get_model_config(args.model) if args.model else None
    heads = args.num_heads or (preset.transformer.num_heads if preset else None)
    ckpt = core.translate(state, num_heads=heads)
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
  except (common.CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"model: {_describe(model_config)}")
  for note in notes:
    print(f"  {note}")
  flat = common.flatten(params)
  print(f"parameters: {common.num_params(flat):,}")
  try:
    if args.dst.endswith(".npz"):
      shapes = npz.export_npz(params, args.dst, model_config)
      print(f"wrote upstream .npz: {args.dst} ({len(flat)} arrays)")
      meta = sorted(k for k in shapes if k.startswith(npz.METADATA))
      if meta:
        # Upstream files mean tanh gelu and eps 1e-6; this model differs, so the file says so.
        print(f"  recorded {', '.join(meta)}: the activation and LayerNorm epsilon differ from "
              "upstream's (timm and upstream ignore these entries; big_vision needs "
              f"dont_load=['{npz.METADATA}.*'])")
    else:
      torch_formats.export_hf(params, model_config, args.dst, image_size=image_size)
      print(f"wrote HF ViTForImageClassification directory: {args.dst}")
  except common.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _main_clip(args, state) -> int:
  """The CLI for a CLIP source: HF CLIPModel, our CLIP .npz, OpenAI `.pt` or open_clip."""
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  if args.num_classes != -1 or args.num_heads is not None:
    raise common.CheckpointError("--num-classes and --num-heads are ViT options; the source is "
                                 "a CLIP checkpoint.")
  fmt = clip.describe_format(state.arrays, state.path)
  if args.hidden_act is not None and fmt not in (clip.OPENAI_FORMAT, clip.OPEN_CLIP_FORMAT):
    raise common.CheckpointError(f"--hidden-act is for OpenAI / open_clip files; {state.path} is "
                                 f"a {fmt} checkpoint, which records its activation.")
  ckpt = clip.from_state(state, vision_heads=args.vision_heads, text_heads=args.text_heads,
                         hidden_act=args.hidden_act)
  print(f"detected: {ckpt.format} ({ckpt.path})")
  if args.model:
    preset = models.get_clip_config(args.model)
    ours, theirs = clip.architecture(preset), clip.architecture(ckpt.model_config)
    diff = [f"{k}: --model {v} vs file {theirs[k]}" for k, v in ours.items() if v != theirs[k]]
    if diff:
      raise common.CheckpointError(f"--model {args.model} does not match the checkpoint: "
                                   + "; ".join(diff))
  image_size = tuple((args.image_size * 2)[:2]) if args.image_size else None
  _, params, model_config, notes = clip.fit(
      ckpt, image_size=image_size, context_length=args.context_length,
      resize_method=args.resize_method, text_resize_method=args.text_resize_method)
  print(f"model: {clip.describe(model_config)}")
  for note in notes:
    print(f"  {note}")
  flat = common.flatten(params)
  print(f"parameters: {common.num_params(flat):,}")
  if args.dst.endswith(".npz"):
    clip.export_npz(params, model_config, args.dst)
    print(f"wrote CLIP .npz: {args.dst} ({len(flat)} arrays + activation/epsilon records)")
  else:
    clip.export_hf_clip(params, model_config, args.dst)
    print(f"wrote HF CLIPModel directory: {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
