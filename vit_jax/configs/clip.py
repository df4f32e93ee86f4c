"""CLIP contrastive configs: `--config=vit_jax/configs/clip.py:MODEL,DATASET[,RECIPE]`.

MODEL is a CLIP preset of configs/models.py: b32, b16, l14 (OpenAI's), mu (the CPU demo: patch 7
at 28 px; mu16 / mu32 at 64 / 128 px), nano (tests).
DATASET:
  fashion_mnist  the offline from-scratch demo: Debian's Fashion-MNIST images, each captioned
                 from its class name with a random template; evaluated zero-shot on the test
                 split (the class names through the prompt templates, no labels used in training).
  tuxpaint       Debian's tuxpaint-stamps-default: ~785 real photos and cut-outs with one-line
                 human captions, split 90/10 by a fixed order; evaluated by retrieval R@1/5/10.
  captions       your own image–caption data: `config.data_dir/{train,val}.jsonl` of
                 {"path", "caption"} (or "captions": [...]); retrieval on the val split.
RECIPE (configs/param_groups.py): full (default: both towers and the scale train), lit (locked
image tower, LiT), locked_text, lora (rank 8 adapters on the q/v projections of both towers; all
base weights frozen, no optimizer state for them).

Fine-tuning defaults (with `config.pretrained_path`: an HF CLIPModel directory, an OpenAI .pt, an
open_clip state dict): AdamW, LR 1e-5, 10% warmup then cosine, wd 0.1 (not on biases, norms,
embeddings), clip 1.0. The from-scratch demos use a larger LR.
"""
import ml_collections
from ml_collections import config_dict

from vit_jax.configs import common
from vit_jax.configs import models
from vit_jax.configs import param_groups
from vit_jax.evaluation import prompts

DEFAULT = "mu,fashion_mnist"
DATASETS = ("fashion_mnist", "tuxpaint", "captions")
RECIPES = ("full", "lit", "locked_text", "lora")
TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Captions for the Fashion-MNIST demo: one drawn per image per epoch (its seed picks).
FASHION_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a black and white "
                     "photo of a {}.", "a small photo of the {}.", "a photo of the {}, an item of "
                     "clothing.")


def add_contrastive_keys(c: ml_collections.ConfigDict) -> None:
  """Read by tasks/contrastive.py."""
  c.task = "contrastive"
  c.contrastive_loss = "softmax"  # softmax (CLIP's InfoNCE) | sigmoid (SigLIP: set logit_bias_init)
  c.evals = ("zeroshot",)  # any of zeroshot, retrieval; all on config.eval_split
  c.zeroshot = ml_collections.ConfigDict(dict(
      classnames=config_dict.placeholder(tuple),  # None: the dataset's own names
      # Prompt templates, each with one "{}"; default: OpenAI's 7 best ImageNet templates
      # (prompts.IMAGENET_TEMPLATES has all 80).
      templates=prompts.IMAGENET_TEMPLATES_SHORT))


def _clip_pp(size: int, train: bool) -> str:
  crop = f"inception_crop({size}, area_min=50)|flip_lr" if train else f"resize({size})"
  return f"decode|{crop}|normalize('clip')|tokenize"


def _dataset(c: ml_collections.ConfigDict, dataset: str, image_size: int) -> None:
  if dataset == "fashion_mnist":
    c.dataset, c.data_source, c.data_dir = "fashion_mnist", "idx", FASHION_MNIST_DIR
    c.num_classes = 10
    c.train_split, c.eval_split = "train", "test"
    templates = ", ".join(repr(t) for t in FASHION_TEMPLATES)
    c.pp.train = (f"decode|flip_lr|class_caption('fashion_mnist', ({templates}))|"
                  "value_range(-1,1)|tokenize")
    c.pp.test = "decode|value_range(-1,1)|onehot(10)"
    c.evals = ("zeroshot",)
    c.zeroshot.templates = FASHION_TEMPLATES  # the caption templates: no new words at test time
    # Captions are a few words: 16 tokens (OWL-ViT's context) instead of CLIP's 77.
    c.context_length = c.model.text.context_length = 16
    c.cache_train, c.shuffle_buffer = True, 60_000
    c.batch, c.batch_eval = 256, 1000
    c.total_steps, c.warmup_steps = 1000, 100
    c.base_lr, c.weight_decay = 1e-3, 0.1
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 100, 250, 500
  elif dataset == "tuxpaint":
    c.dataset, c.data_source, c.data_dir = "tuxpaint", "caption_folder", TUXPAINT_DIR
    c.skip_corrupt = True  # 17 mirrored stamps have no caption file: skipped and counted
    c.train_split, c.eval_split = "train[:90%]", "train[90%:]"
    c.pp.train, c.pp.test = _clip_pp(image_size, True), _clip_pp(image_size, False)
    c.evals = ("retrieval",)
    c.max_captions_eval = 1
    c.context_length = c.model.text.context_length = 32  # one-line captions
    c.cache_train, c.shuffle_buffer = False, 1000
    c.batch, c.batch_eval = 64, 80
    c.total_steps, c.warmup_steps = 400, 40  # ~36 epochs of 706 images: it overfits past this
    c.base_lr, c.weight_decay = 5e-4, 0.1
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 100, 200, 200
  else:  # captions: the user's own jsonl listings
    c.dataset, c.data_source = "captions", "caption_jsonl"
    c.train_split, c.eval_split = "train", "val"
    c.pp.train, c.pp.test = _clip_pp(image_size, True), _clip_pp(image_size, False)
    c.evals = ("retrieval",)
    c.batch, c.batch_eval = 256, 256
    c.total_steps, c.warmup_steps = 2000, 200
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 50, 500, 500


def _recipe(name: str) -> dict:
  if name == "full":
    return param_groups.clip_full()
  if name == "lit":
    return param_groups.lit()
  if name == "locked_text":
    return param_groups.locked_text()
  if name == "lora":
    return param_groups.lora()
  raise ValueError(f"Unknown CLIP recipe {name!r}: expected one of {', '.join(RECIPES)}.")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg` is 'MODEL,DATASET[,RECIPE]', e.g. 'b32,captions,lora' (empty: the Fashion-MNIST demo)."""
  model_name, dataset, recipe = common.parse_arg(arg, DEFAULT, DATASETS, "b32,captions,lit")
  c = common.get_base_config()
  add_contrastive_keys(c)
  c.model = models.get_clip_config(model_name)
  c.context_length = c.model.text.context_length
  # CLIP fine-tuning defaults; the datasets below change what a from-scratch demo needs.
  c.optimizer, c.b1, c.b2 = "adamw", 0.9, 0.98
  c.base_lr, c.weight_decay, c.grad_norm_clip = 1e-5, 0.1, 1.0
  c.decay_type = "cosine"
  c.loss = "softmax_xent"  # unused by this task; kept so shared keys stay valid
  image_size = c.model.image_size
  _dataset(c, dataset, image_size)
  c.update(_recipe(recipe or "full"))
  c.lock()
  return c
