"""Search space for fine-tuning a pretrained ViT (configs/vit.py:MODEL,DATASET): LR, how many
encoder blocks stay frozen, how much faster the head learns, and the AugReg level. Freezing
depth and the head's LR multiplier are not single config keys: `apply` turns them into
`config.param_groups` (configs/param_groups.py), as a recipe would.

  python -m vit_jax.sweep --config=vit_jax/configs/vit.py:b16,cifar10 \
      --config.pretrained_path=~/ckpt/ViT-B_16.npz --space=vit_jax/configs/sweep_finetune.py \
      --study-dir=~/sweeps/b16_cifar10 --trials=24 --config.eval_every_steps=500
"""
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution

from vit_jax import sweep
from vit_jax.configs import param_groups


def get_config():
  s = sweep.base_settings()
  s.metric, s.direction = "eval/accuracy", "maximize"
  s.pruner = "hyperband"
  return s


def get_space():
  return {
      "base_lr": FloatDistribution(1e-3, 0.1, log=True),  # SGD momentum, as upstream fine-tuning
      "freeze_blocks": CategoricalDistribution([0, 4, 8]),  # not config keys: see apply()
      "head_lr_mult": CategoricalDistribution([1.0, 10.0]),
      "aug_level": CategoricalDistribution(["none", "light1"]),
  }


def apply(config, params):
  """Frozen stem + the first `freeze_blocks` blocks; the head at `head_lr_mult` x base_lr."""
  frozen = param_groups.freeze_first_blocks(params["freeze_blocks"])["param_groups"][:-1]
  config.param_groups = frozen + [
      ("head/.*", dict(name="head", lr_mult=params["head_lr_mult"])),
      (".*", dict(name="backbone")),
  ]
