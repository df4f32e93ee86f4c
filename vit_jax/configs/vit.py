"""ViT classification configs: `--config=vit_jax/configs/vit.py:MODEL,DATASET`.

MODEL is a preset of configs/models.py (ti16, s16, s32, b16, b32, b8, l16, l32, h14, mu7, nano4);
DATASET is one of DATASETS below. The fine-tuning datasets use upstream vision_transformer's
recipe (SGD momentum 0.9, batch 512, base LR 0.03 — 0.01 for b16+cifar10 —, grad-norm clip 1,
500 warmup steps then cosine; train: inception crop 384 + flip; eval: resize the short side to 448
then a central 384 crop). `fashion_mnist` is the bundled offline demo: it trains from scratch on
the Debian `dataset-fashion-mnist` files and is tuned to finish on a 2-core CPU in minutes.

An optional third field picks a fine-tuning recipe from configs/param_groups.py:
`backbone_head` (head LR x10), `freezeK` (freeze the stem and the first K blocks, e.g. `freeze6`),
`layerwise_decay` (MAE/BEiT: AdamW, LR x 0.65 per layer from the top). E.g.
`vit.py:b16,cifar10,backbone_head`.

With no argument: `mu7,fashion_mnist`.
"""
import re

import ml_collections

from vit_jax.configs import common
from vit_jax.configs import models
from vit_jax.configs import param_groups

DEFAULT = "mu7,fashion_mnist"

# dataset: (num_classes, train_split, eval_split, total_steps, warmup_steps)
_FINETUNE = {
    "cifar10": (10, "train[:98%]", "test", 10_000, 500),
    "cifar100": (100, "train[:98%]", "test", 10_000, 500),
    "imagenet2012": (1000, "train[:99%]", "validation", 20_000, 500),
    "oxford_iiit_pet": (37, "train[:90%]", "test", 500, 100),
    "oxford_flowers102": (102, "train[:90%]", "test", 500, 100),
}
DATASETS = tuple(_FINETUNE) + ("fashion_mnist",)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _finetune(c: ml_collections.ConfigDict, dataset: str, model: str) -> None:
  num_classes, train_split, eval_split, steps, warmup = _FINETUNE[dataset]
  c.dataset = dataset
  c.data_source = "tfds"
  c.num_classes = num_classes
  c.train_split, c.eval_split = train_split, eval_split
  c.total_steps, c.warmup_steps = steps, warmup
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.optim_dtype = "bfloat16"  # upstream's memory saving for the momentum accumulator
  c.base_lr = 0.01 if (model == "ViT-B_16" and dataset == "cifar10") else 0.03
  c.decay_type = "cosine"
  c.grad_norm_clip = 1.0
  c.batch = c.batch_eval = 512
  c.eval_every_steps = 1000 if steps > 1000 else 100
  c.checkpoint_every_steps = 1000
  crop, resize = 384, 448
  c.pp.train = (f"decode|inception_crop({crop})|flip_lr|value_range(-1,1)|"
                f"onehot({num_classes})")
  # Eval keeps the aspect ratio: resize the short side, then a central square crop.
  c.pp.test = (f"decode|resize_small({resize})|central_crop({crop})|value_range(-1,1)|"
               f"onehot({num_classes})")


def _fashion_mnist(c: ml_collections.ConfigDict) -> None:
  """From-scratch training on 28x28 grayscale, sized for a 2-core CPU (see README figures)."""
  c.dataset = "fashion_mnist"
  c.data_source = "idx"  # `--config.data_source=tfds` reads the same dataset through tfds
  c.data_dir = FASHION_MNIST_DIR
  c.num_classes = 10
  c.train_split, c.eval_split = "train", "test"
  c.total_steps = 3000  # 6.4 epochs of 60k at batch 128: under 10 min on 2 slow cores
  c.warmup_steps = 200
  c.optimizer = "adamw"
  c.base_lr = 2e-3
  c.weight_decay = 0.05
  c.decay_type = "cosine"
  c.grad_norm_clip = 1.0
  c.batch, c.batch_eval = 128, 1000
  c.cache_train = True
  c.shuffle_buffer = 60_000
  c.log_every_steps = 300
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 1000
  c.label_smoothing = 0.0
  c.pp.train = "decode|flip_lr|value_range(-1,1)|onehot(10)"
  c.pp.test = "decode|value_range(-1,1)|onehot(10)"


RECIPES = ("backbone_head", "freezeK", "layerwise_decay")


def _recipe(name: str) -> dict:
  if name == "backbone_head":
    return param_groups.backbone_head()
  if name == "layerwise_decay":
    return param_groups.layerwise_decay()
  match = re.fullmatch(r"freeze(\d+)", name)
  if match:
    return param_groups.freeze_first_blocks(int(match.group(1)))
  raise ValueError(f"Unknown recipe {name!r}: expected one of {', '.join(RECIPES)}.")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg` is 'MODEL,DATASET[,RECIPE]', e.g. 'b16,cifar10' (empty: the Fashion-MNIST demo)."""
  model_name, dataset, recipe = common.parse_arg(arg, DEFAULT, DATASETS, "b16,cifar10")
  c = common.get_base_config()
  c.model = models.get_model_config(model_name)
  if dataset == "fashion_mnist":
    _fashion_mnist(c)
  else:
    _finetune(c, dataset, c.model.name)
  if recipe:
    c.update(_recipe(recipe))
  c.lock()
  return c
