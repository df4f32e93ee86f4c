"""Image classification: the ViT, its (softmax or sigmoid) cross-entropy, and top-1 evaluation.

A task supplies only what differs between tasks; train.py owns the loop. The interface:
  model                                  the flax module
  init_params(rng, batch) -> params      fresh (or pretrained) params for a batch's shapes
  loss_fn(params, batch, rng) -> (loss, metrics)    mean over the (micro-)batch; train mode
  evaluators() -> {name: (eval_fn, finalize)}      eval_fn(params, batch) -> sums
"""
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from vit_jax import losses
from vit_jax.configs import models as model_configs
from vit_jax.evaluation import accuracy
from vit_jax.models import vit


class ClassificationTask:

  def __init__(self, config):
    self.config = config
    self.model = vit.VisionTransformer(
        num_classes=config.num_classes, remat=config.remat, remat_policy=config.remat_policy,
        dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
        **model_configs.model_kwargs(config.model))
    self.per_example_loss = losses.classification_loss(config.loss, config.label_smoothing)

  def init_params(self, rng: jax.Array, batch: Dict[str, Any]):
    """Params for images shaped like `batch['image']`; loads `config.pretrained_*` if set."""
    image = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
    params = self.model.init(rng, image, train=False)["params"]
    if self.config.get("pretrained_path") or self.config.get("pretrained_dir"):
      from vit_jax import checkpoints_convert  # lazy: torch/safetensors only when used
      params = checkpoints_convert.load_for_finetune(self.config, params,
                                                     image_size=image.shape[1:3])
    return params

  def loss_fn(self, params, batch, rng) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    logits = self.model.apply({"params": params}, batch["image"], train=True,
                              rngs={"dropout": rng})
    loss = jnp.mean(self.per_example_loss(logits, batch["labels"]))
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1))
    return loss, {"accuracy": acc}

  def evaluators(self) -> Dict[str, Tuple[Callable, Callable]]:
    apply_fn = lambda params, images: self.model.apply({"params": params}, images, train=False)
    # Eval reports the plain (unsmoothed) cross-entropy, comparable across label smoothings.
    eval_loss = losses.classification_loss(self.config.loss)
    return {"eval": (accuracy.make_eval_fn(apply_fn, eval_loss), accuracy.finalize)}
