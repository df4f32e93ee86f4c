"""Search space for the Fashion-MNIST quick start (configs/vit.py): LR, warmup, weight decay and
the AugReg level, with median pruning on the eval accuracy.

  python -m vit_jax.sweep --config=vit_jax/configs/vit.py --space=vit_jax/configs/sweep_quickstart.py \
      --study-dir=~/sweeps/fmnist --trials=20 --config.total_steps=1000 --config.eval_every_steps=200
"""
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution

from vit_jax import sweep


def get_config():
  """The sweep's settings (sweep.base_settings() lists them all); --space.KEY=VALUE overrides."""
  s = sweep.base_settings()
  s.metric, s.direction = "eval/accuracy", "maximize"
  s.sampler = "tpe"
  s.pruner = "median"  # or "hyperband"
  s.on_interrupt = "resume"  # or "retry": a killed trial starts over in a new workdir
  s.enqueue_config = True  # trial 0 trains the quick start's own values: the baseline to beat
  return s


def get_space():
  """Config keys ('a.b' for nested ones) -> optuna distributions."""
  return {
      "base_lr": FloatDistribution(3e-4, 1e-2, log=True),
      "warmup_steps": IntDistribution(0, 400, step=100),
      "weight_decay": FloatDistribution(1e-3, 0.3, log=True),
      # None (the quick start's: flips only) or an AugReg level (RandAugment + mixup).
      "aug_level": CategoricalDistribution([None, "light1", "medium1"]),
  }
