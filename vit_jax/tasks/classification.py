"""Image classification: the ViT, its (softmax or sigmoid) cross-entropy, and top-1 evaluation.

A task supplies only what differs between tasks; train.py owns the loop. The interface:
  model                                  the flax module
  init_params(rng, batch) -> params      fresh (or pretrained) params for a batch's shapes
  loss_fn(params, batch, rng) -> (loss, metrics)    mean over the (micro-)batch; train mode
  evaluators() -> {name: evaluation.Evaluator, or an (eval_fn, finalize) pair}
and, for using the trained model (tasks/__init__.py):
  predict_head(params, options) -> PredictHead     top-k class names and probabilities
  export_functions(params) -> {name: ExportFunction}
"""
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from vit_jax import evaluation
from vit_jax import losses
from vit_jax import tasks
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

  def evaluators(self) -> Dict[str, evaluation.Evaluator]:
    """{"eval": accuracy, loss, and the confusion matrix in workdir/eval/ per evaluation}."""
    apply_fn = lambda params, images: self.model.apply({"params": params}, images, train=False)
    # Eval reports the plain (unsmoothed) cross-entropy, comparable across label smoothings.
    eval_loss = losses.classification_loss(self.config.loss)
    return {"eval": accuracy.make_evaluator(apply_fn, eval_loss)}

  # -- using the trained model (predict.py, export.py) ---------------------------------------

  def class_names(self):
    """Names in label order: the dataset's (tfds label names, folder names, listing names,
    built-in lists), else "0", "1", ..."""
    from vit_jax.input_pipeline import sources  # lazy: TensorFlow
    names = sources.class_names(self.config)
    return list(names) if names else [str(i) for i in range(self.config.num_classes)]

  def probabilities(self, logits):
    """What the loss trained the logits to be: softmax, or independent sigmoids."""
    if self.config.loss == "sigmoid_xent":
      return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)

  def predict_head(self, params, options) -> tasks.PredictHead:
    """options: top_k (default 5), class_names (default: the dataset's). Records: {"top_k":
    [{"label", "index", "score"}, ...], "class": the argmax of the logits, as evaluation takes}."""
    del params
    k = int(options.get("top_k") or 5)
    names = list(options.get("class_names") or self.class_names())
    if len(names) != self.config.num_classes:
      raise ValueError(f"{len(names)} class names for a {self.config.num_classes}-class model.")

    def fn(params, aux, images):
      del aux
      logits = self.model.apply({"params": params}, images, train=False)
      return {"probs": self.probabilities(logits), "class": jnp.argmax(logits, -1)}

    def records(out, info):
      del info
      return [{"class": int(c), "label": names[int(c)], "top_k": top}
              for c, top in zip(out["class"], tasks.top_k_labels(out["probs"], names, k))]

    return tasks.PredictHead(fn=fn, records=records, class_names=names,
                             summary=lambda r: tasks.format_top(r["top_k"]))

  def export_functions(self, params, image_shape=None):
    """{"classify": images float32 [batch, H, W, C] -> logits, probabilities [batch, classes]}."""
    shape = tuple(image_shape or vit.input_shape(params, self.config.model))

    def classify(images):
      logits = self.model.apply({"params": params}, images, train=False)
      return {"logits": logits, "probabilities": self.probabilities(logits)}

    doc = (f"images: float32 [batch, {shape[0]}, {shape[1]}, {shape[2]}], preprocessed as "
           f"config.pp.test without its label ops: {self.config.pp.test!r}. Outputs logits and "
           f"{'sigmoid' if self.config.loss == 'sigmoid_xent' else 'softmax'} probabilities "
           f"[batch, {self.config.num_classes}].")
    return {"classify": tasks.ExportFunction(classify, (("images", ("batch",) + shape, "float32"),),
                                             doc)}

  def write_checkpoint(self, params, fmt: str, out: str) -> str:
    """hf: a ViTForImageClassification directory (id2label from the class names); npz:
    upstream's names."""
    from vit_jax import checkpoints_convert  # pylint: disable=g-import-not-at-top
    from vit_jax.checkpoints_convert import torch as torch_formats  # pylint: disable=g-import-not-at-top
    if fmt == "hf":
      shape = vit.input_shape(params, self.config.model)
      return torch_formats.export_hf(params, self.config.model, out, image_size=shape[:2],
                                     id2label=dict(enumerate(self.class_names())))
    path = os.path.join(out, "params.npz")
    checkpoints_convert.npz.export_npz(params, path, self.config.model)
    return path
