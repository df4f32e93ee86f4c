"""Defaults for every key a trainer reads, so a misspelt `--config.key` fails loudly.

Names follow upstream vision_transformer where it has one (`base_lr`, `warmup_steps`,
`decay_type`, `grad_norm_clip`, `accum_steps`, `batch`, `batch_eval`, `pp`, `tfds_data_dir`, ...).
Each section below belongs to the module that reads it; add a key in the section of its reader.
"""
import ml_collections
from ml_collections import config_dict

from vit_jax.configs import param_groups


def add_loop_keys(c: ml_collections.ConfigDict) -> None:
  """Read by train.py and parallel.py."""
  c.task = "classification"
  c.seed = 0
  c.total_steps = 1000
  c.log_every_steps = 50  # stdout + TensorBoard scalars
  c.eval_every_steps = 0  # 0: evaluate only at the end
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.plots = True  # at the end of the run: PNG curves (and a classification report) in workdir/plots
  c.accum_steps = 1  # micro-batches per step (same update, lower peak memory)
  c.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.param_dtype = "float32"
  c.remat = False  # recompute each block's activations in the backward pass
  # With remat: which values to keep anyway, a jax.checkpoint_policies name, e.g.
  # 'dots_with_no_batch_dims_saveable' (keep the GEMM outputs: less recompute, more memory).
  c.remat_policy = config_dict.placeholder(str)
  c.parallelism = "pjit"  # pjit (jax.jit + Mesh/NamedSharding) | pmap
  # ((axis name, size), ...): axes data, fsdp, model; -1 takes the remaining devices. A tuple, so
  # the command line can set it: --config.mesh="(('data', 2), ('fsdp', -1))".
  c.mesh = (("data", -1),)
  # pjit: where params and optimizer state live. replicate: a copy on every device | fsdp: each
  # leaf split along its largest dimension that divides the mesh's fsdp axis (big_vision's rule).
  c.sharding = "replicate"
  c.fsdp_min_size = 2**14  # fsdp: leaves with fewer elements stay replicated (not worth a gather)
  # [(regex, spec)]: the first rule whose regex re.search-es a param's '/'-joined path gives its
  # PartitionSpec-like tuple, e.g. (".*/MlpBlock_3/Dense_0/kernel", (None, "model")); fsdp then
  # splits a dimension the rule left free. "tensor_parallel" as an entry stands for
  # parallel.TENSOR_PARALLEL_RULES (attention heads and MLP hidden units over "model").
  c.sharding_rules = ()
  c.early_stopping = ml_collections.ConfigDict(dict(
      metric=config_dict.placeholder(str),  # e.g. "accuracy"; unset: no early stopping
      mode="max", patience=3, min_delta=0.0))
  # Loss.
  c.loss = "softmax_xent"  # softmax_xent | sigmoid_xent
  c.label_smoothing = 0.0
  # Fine-tuning init (checkpoints_convert reads these).
  c.pretrained_path = config_dict.placeholder(str)
  c.pretrained_dir = config_dict.placeholder(str)  # with model_name: upstream's naming
  c.model_name = config_dict.placeholder(str)
  c.posemb_resize_method = "bilinear"  # bilinear (upstream zoom) | bicubic (HF) | bicubic_antialias


def add_optim_keys(c: ml_collections.ConfigDict) -> None:
  """Read by optim.py (configs/param_groups.py has ready-made param_groups recipes)."""
  c.optimizer = "sgd"  # sgd | adamw | adafactor (optax's defaults, factored)
  c.base_lr = 0.03
  c.warmup_steps = 500  # linear warmup from 0
  c.decay_type = "cosine"  # cosine | linear | rsqrt (timescale = warmup_steps) | constant
  c.linear_end = 0.0  # linear decay ends at this fraction of the peak LR (upstream: absolute)
  c.grad_norm_clip = 1.0  # 0 or None: no clipping; frozen grads are not counted
  c.momentum = 0.9  # sgd; 0: plain SGD
  c.optim_dtype = "float32"  # dtype of SGD momentum / Adam first moment (bfloat16 saves memory)
  c.b1 = 0.9  # adamw
  c.b2 = 0.999  # adamw
  c.weight_decay = 0.0  # decoupled: param -= lr * weight_decay * param
  c.wd_mask = "default"  # default: no decay on biases, LayerNorm scales, pos/cls embeddings | all
  c.param_groups = config_dict.placeholder(list)  # [(regex, dict)]; see optim.GROUP_KEYS
  c.layerwise_lr_decay = config_dict.placeholder(float)  # BEiT/MAE: factor**(depth+1-layer)
  # LoRA adapters (models/lora.py), added by the task at init and merged before each apply;
  # param_groups.lora() sets this and freezes the base params.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,  # 0: off
      alpha=16.0,  # merged update scale is alpha / rank
      targets=param_groups.LORA_TARGETS))  # regex fullmatched on '/'-joined kernel paths


def add_input_keys(c: ml_collections.ConfigDict) -> None:
  """Read by input_pipeline/."""
  c.dataset = "fashion_mnist"
  c.data_source = "tfds"  # tfds | idx | folder | csv | jsonl; image-caption data (see
  # input_pipeline/captions.py): caption_folder | caption_csv | caption_jsonl, or tfds + caption_key
  c.data_dir = config_dict.placeholder(str)  # idx/folder/csv/caption_* sources: where the files are
  c.tfds_data_dir = config_dict.placeholder(str)
  c.tfds_manual_dir = config_dict.placeholder(str)
  c.train_split = "train"
  c.eval_split = "test"
  c.num_classes = 10
  c.batch = 512  # global train batch, over all hosts and devices
  c.batch_eval = 512
  c.pp = ml_collections.ConfigDict(dict(train="", test=""))  # big_vision-style op strings
  c.shuffle_buffer = 50_000
  c.cache_train = False
  c.prefetch = 2
  c.skip_corrupt = False
  c.tfds_download = False  # tfds source: download_and_prepare a dataset missing from tfds_data_dir
  c.input_threads = 2  # tf.data private threadpool size: leaves the other cores to JAX
  c.aug_level = config_dict.placeholder(str)  # AugReg level none|light1|...|strong2 (randaug +
  # mixup), or "checkpoint": the level in the pretrained_path / model_name AugReg filename
  c.mixup_alpha = 0.0  # Beta(alpha, alpha) mixup on train batches; 0: off
  c.cutmix_alpha = 0.0  # Beta(alpha, alpha) cutmix on train batches; 0: off
  c.mix_switch_prob = 0.5  # with both alphas > 0: probability that a batch gets cutmix, else mixup
  # Image-caption data. Training batches hold one caption per image ('texts' [b], drawn anew each
  # epoch with the example's seed when it has several), eval batches all of them ('texts' [b, K]
  # with 'texts_mask' [b, K], K = max_captions_eval); `tokenize` in pp gives 'tokens'.
  c.caption_key = config_dict.placeholder(str)  # tfds source: the text feature, '/' for nested
  # ones ("captions/text" for coco_captions); unset: a classification dataset (image, label)
  c.max_captions_eval = 5  # captions per eval image (COCO, Flickr30k: 5); more is an error
  c.tokenizer_path = config_dict.placeholder(str)  # CLIP BPE for `tokenize` (and the text model's
  # prompts): OpenAI's .gz, a tokenizer.json, or a folder; unset: OpenAI's, from open_clip's wheel
  c.context_length = 77  # tokens per text, SOT and EOT included (CLIP 77, OWL-ViT 16)


def parse_arg(arg: str, default: str, datasets, example: str):
  """'MODEL,DATASET[,RECIPE]' (empty: `default`) -> (model, dataset, recipe or None), checking the
  dataset against `datasets`; `example` goes in the error message."""
  parts = [p.strip() for p in (arg or default).split(",")]
  if len(parts) not in (2, 3):
    raise ValueError(f"Config argument {arg!r}: expected 'MODEL,DATASET[,RECIPE]' such as "
                     f"{example!r}.")
  if parts[1] not in datasets:
    raise ValueError(f"Unknown dataset {parts[1]!r} in config argument {arg!r}: expected one of "
                     f"{', '.join(datasets)}.")
  return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  add_loop_keys(c)
  add_optim_keys(c)
  add_input_keys(c)
  return c
