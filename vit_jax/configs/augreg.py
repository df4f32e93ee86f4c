r"""Fine-tunes a ViT from an AugReg checkpoint ("How to train your ViT?", arXiv:2106.10270).

  python -m vit_jax.main --workdir=/tmp/vit \
    --config=vit_jax/configs/augreg.py:B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0 \
    --config.pretrained_dir=/path/to/augreg

The argument is an AugReg filename without ".npz" (as in gs://vit_models/augreg/index.csv, also
fine-tuned ones ending in "--imagenet2012-steps_20k-lr_0.03-res_384"), or just the model ("B_16")
for upstream's recommended i21k checkpoint of that model; optionally followed by ",DATASET" (a
dataset of configs/vit.py; default cifar10). The file is read from
`{pretrained_dir}/{model_name}.npz`; download it from
https://storage.googleapis.com/vit_models/augreg/{model_name}.npz.

As upstream's configs/augreg.py: the model config is the filename's architecture, and fine-tuning
runs without AugReg (dropout and stochastic depth 0, `aug_level` unset); the pre-training recipe
read from the filename (lr, aug level, wd, dropout, stochastic depth) is kept in `config.augreg`.
"""
import re

import ml_collections

from vit_jax.configs import vit

# Upstream's recommended (best upstream validation) i21k checkpoint per model: README table.
RECOMMENDED = {
    "Ti_16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "S_16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "S_32": "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0",
    "B_16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "B_32": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
    "B_8": "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
    "L_16": "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0",
}
AUG_LEVELS = ("none", "light0", "light1", "medium0", "medium1", "medium2", "strong0", "strong1",
              "strong2")

_PRETRAIN = re.compile(
    r"^(?P<model>[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*?_\d+)-(?P<dataset>i1k|i21k(?:_\d+)?)-"
    r"(?P<epochs>\d+)ep-lr_(?P<lr>[\d.e-]+)-aug_(?P<aug>[a-z]+\d?)-wd_(?P<wd>[\d.e-]+)-"
    r"do_(?P<do>[\d.]+)-sd_(?P<sd>[\d.]+)$")
_ADAPT = re.compile(r"^(?P<dataset>[\w]+)-steps_(?P<steps>\d+)k-lr_(?P<lr>[\d.e-]+)-"
                    r"res_(?P<res>\d+)$")


def parse_filename(filename: str) -> ml_collections.ConfigDict:
  """'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0[--adapt...]' -> its fields."""
  pretrain, _, adapt = filename.partition("--")
  m = _PRETRAIN.match(pretrain)
  if not m:
    raise ValueError(
        f"Not an AugReg filename: {filename!r}. Expected e.g. "
        f"'{RECOMMENDED['B_16']}' (optionally '--imagenet2012-steps_20k-lr_0.03-res_384'), "
        f"or a model: {', '.join(RECOMMENDED)}.")
  if m["aug"] not in AUG_LEVELS:
    raise ValueError(f"Unknown AugReg aug level {m['aug']!r} in {filename!r}: expected one of "
                     f"{AUG_LEVELS}.")
  out = ml_collections.ConfigDict(dict(
      filename=filename, model=m["model"], dataset=m["dataset"], epochs=int(m["epochs"]),
      lr=float(m["lr"]), aug_level=m["aug"], weight_decay=float(m["wd"]),
      dropout_rate=float(m["do"]), stochastic_depth=float(m["sd"]),
      adapt_dataset="", adapt_steps=0, adapt_lr=0.0, adapt_resolution=0))
  if adapt:
    a = _ADAPT.match(adapt)
    if not a:
      raise ValueError(f"Unrecognised fine-tuning suffix {adapt!r} in {filename!r}: expected e.g. "
                       "'imagenet2012-steps_20k-lr_0.03-res_384'.")
    out.adapt_dataset, out.adapt_steps = a["dataset"], int(a["steps"]) * 1000
    out.adapt_lr, out.adapt_resolution = float(a["lr"]), int(a["res"])
  return out


def get_config(arg: str = "B_16") -> ml_collections.ConfigDict:
  """`arg`: 'FILENAME_OR_MODEL[,DATASET]'."""
  name, _, dataset = arg.partition(",")
  name = RECOMMENDED.get(name.strip(), name.strip())
  augreg = parse_filename(name)
  if augreg.model.startswith("R"):
    raise ValueError(f"{name}: hybrid ResNet+ViT models ({augreg.model}) are not implemented.")
  c = vit.get_config(f"{augreg.model},{dataset.strip() or 'cifar10'}")
  c.model_name = name  # read from {pretrained_dir}/{model_name}.npz
  c.pretrained_dir = "."
  # Upstream: "No AugReg during fine-tuning"; the pre-training values stay in c.augreg.
  c.model.transformer.dropout_rate = 0.0
  c.model.transformer.attention_dropout_rate = 0.0
  c.model.transformer.stochastic_depth = 0.0
  with c.unlocked():
    c.augreg = augreg
  return c
