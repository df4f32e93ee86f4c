"""Image–text contrastive training of the CLIP dual encoder, and its zero-shot / retrieval evals.

The task interface is classification.py's: `init_params`, `loss_fn`, `evaluators`. What differs:
- the loss is symmetric InfoNCE (`config.contrastive_loss="softmax"`, CLIP) or SigLIP's sigmoid
  loss ("sigmoid") over the GLOBAL batch: under pmap every device gathers the others' embeddings
  (`losses.*(axis_name="batch")`); under pjit the batch already is one global array;
- adaptation (full, LiT's locked image tower, locked text tower, LoRA) is only param groups
  (configs/param_groups.py) plus, for LoRA, adapters in `params["lora"]` merged before apply;
- evaluators: "zeroshot" (prompt-ensembled class embeddings from the text tower, computed once per
  evaluation, then top-1/top-5 over the eval split's labelled images) and "retrieval" (every
  image and caption of the eval split embedded, then R@1/5/10 both ways on the host).
"""
import os
from typing import Any, Dict, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import losses
from vit_jax import tasks
from vit_jax import parallel
from vit_jax import evaluation
from vit_jax.configs import models as model_configs
from vit_jax.evaluation import retrieval
from vit_jax.evaluation import zeroshot
from vit_jax.models import clip
from vit_jax.models import lora
from vit_jax.models import vit


def _known_classnames():
  from vit_jax.input_pipeline import ops  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return ops.CLASSNAMES


class ContrastiveTask:

  def __init__(self, config):
    self.config = config
    if config.accum_steps != 1:
      # Negatives would come from each micro-batch only: a different loss from the full batch's.
      raise ValueError(f"config.accum_steps={config.accum_steps}: the contrastive loss needs the "
                       "whole batch at once (its negatives); use accum_steps=1 (and remat, or a "
                       "smaller batch, for memory).")
    if config.contrastive_loss not in ("softmax", "sigmoid"):
      raise ValueError(f"config.contrastive_loss={config.contrastive_loss!r}: expected 'softmax' "
                       "(CLIP's InfoNCE) or 'sigmoid' (SigLIP).")
    if config.contrastive_loss == "sigmoid" and config.model.logit_bias_init is None:
      raise ValueError("config.contrastive_loss='sigmoid' (SigLIP) needs a logit bias: set "
                       "config.model.logit_bias_init (SigLIP: -10) and logit_scale_init "
                       "(SigLIP: log(10)).")
    if config.model.text.context_length != config.context_length:
      raise ValueError(f"config.model.text.context_length={config.model.text.context_length} but "
                       f"the tokenizer pads to config.context_length={config.context_length}: "
                       "make them equal.")
    self.model = clip.CLIP(
        remat=config.remat, remat_policy=config.remat_policy, dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype), **model_configs.clip_kwargs(config.model))
    self.axis_name = parallel.AXIS if config.parallelism == "pmap" else None
    self._tokenizer = None

  # -- params ---------------------------------------------------------------------------------

  def init_params(self, rng: jax.Array, batch: Dict[str, Any]):
    """Params for `batch`'s image size and context length; pretrained if `config.pretrained_path`
    is set (HF CLIPModel, OpenAI .pt, open_clip, our .npz); LoRA adapters if `config.lora.rank`."""
    image = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
    tokens = jnp.zeros((1, self.config.context_length), jnp.int32)
    init_rng, lora_rng = jax.random.split(rng)
    params = self.model.init(init_rng, image, tokens)["params"]
    if self.config.get("pretrained_path"):
      from vit_jax import checkpoints_convert  # lazy: torch/safetensors only when used
      _, params = checkpoints_convert.load_model(
          self.config.pretrained_path, model_config=self.config.model,
          image_size=tuple(image.shape[1:3]), context_length=self.config.context_length,
          resize_method=self.config.posemb_resize_method)
      params = jax.tree.map(jnp.asarray, params)
    params, note = lora.add_lora_from_config(params, self.config.lora, lora_rng)
    if note:
      logging.info("%s", note)
    return params

  def model_params(self, params):
    """The params the flax module takes: LoRA adapters folded into their kernels."""
    return lora.merge_lora(params, self.config.lora.alpha)

  # -- training -------------------------------------------------------------------------------

  def loss_fn(self, params, batch, rng) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    out = self.model.apply({"params": self.model_params(params)}, batch["image"], batch["tokens"],
                           train=True, rngs={"dropout": rng})
    if self.config.contrastive_loss == "softmax":
      return losses.contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                                     axis_name=self.axis_name)
    return losses.siglip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                              out["logit_bias"], axis_name=self.axis_name)

  # -- evaluation -----------------------------------------------------------------------------

  @property
  def tokenizer(self):
    """The tokenizer the input pipeline's `tokenize` op uses (same file, same context)."""
    if self._tokenizer is None:
      from vit_jax.input_pipeline import tokenizer  # pylint: disable=g-import-not-at-top
      self._tokenizer = tokenizer.get_tokenizer(self.config.tokenizer_path,
                                                self.config.context_length)
    return self._tokenizer

  def encode_image(self, params, images):
    return self.model.apply({"params": self.model_params(params)}, images,
                            method=clip.CLIP.encode_image)

  def encode_text(self, params, tokens):
    return self.model.apply({"params": self.model_params(params)}, tokens,
                            method=clip.CLIP.encode_text)

  def classnames(self):
    """Zero-shot class names: config.zeroshot.classnames, else the dataset's known names."""
    names = self.config.zeroshot.classnames
    if names:
      return list(names)
    from vit_jax.input_pipeline import ops  # pylint: disable=g-import-not-at-top
    if self.config.dataset in ops.CLASSNAMES:
      return list(ops.CLASSNAMES[self.config.dataset])
    raise ValueError(f"Zero-shot evaluation needs class names: set config.zeroshot.classnames "
                     f"(dataset {self.config.dataset!r} has none built in).")

  def _zeroshot(self) -> evaluation.Evaluator:
    classnames, templates = self.classnames(), self.config.zeroshot.templates
    encode_text = jax.jit(self.encode_text)

    def prepare(params):
      return jnp.asarray(zeroshot.class_embeddings(
          lambda tokens: encode_text(params, tokens), self.tokenizer.encode, classnames,
          templates))

    step = zeroshot.make_eval_fn(self.encode_image)
    return evaluation.Evaluator(step=step, finalize=zeroshot.finalize, prepare=prepare)

  def _retrieval(self) -> evaluation.Evaluator:
    def step(params, aux, batch):
      del aux
      tokens = batch["tokens"]  # [batch, captions, context]
      b, k, length = tokens.shape
      txt = self.encode_text(params, tokens.reshape(b * k, length)).reshape(b, k, -1)
      return {"image": self.encode_image(params, batch["image"]), "text": txt,
              "texts_mask": batch["texts_mask"], "_mask": batch["_mask"]}

    def finalize(out):
      n, k = out["texts_mask"].shape
      metrics = retrieval.retrieval_metrics(
          out["image"], out["text"].reshape(n * k, -1), np.repeat(np.arange(n), k),
          image_mask=out["_mask"], text_mask=out["texts_mask"].reshape(-1))
      n_images = int(out["_mask"].sum())
      metrics.update({"num_examples": n_images,
                      "num_captions": int(out["texts_mask"][out["_mask"]].sum())})
      for kk in (1, 5, 10):  # chance, with one relevant image per caption
        metrics[f"t2i/chance@{kk}"] = retrieval.chance_recall(n_images, kk)
      return metrics

    return evaluation.Evaluator(step=step, finalize=finalize, reduce="gather")

  def evaluators(self):
    builders = {"zeroshot": self._zeroshot, "retrieval": self._retrieval}
    unknown = [e for e in self.config.evals if e not in builders]
    if unknown:
      raise ValueError(f"config.evals={list(self.config.evals)}: unknown {unknown}; expected "
                       f"any of {sorted(builders)}.")
    return {name: builders[name]() for name in self.config.evals}

  # -- using the trained model (predict.py, export.py) ---------------------------------------

  def logit_scale(self, params) -> float:
    """The multiplier of the cosine similarities, clamped as in the model (CLIP: <= 100)."""
    log_scale = float(np.asarray(params["logit_scale"]))
    if self.model.max_logit_scale is not None:
      log_scale = min(log_scale, float(np.log(self.model.max_logit_scale)))
    return float(np.exp(log_scale))

  def predict_head(self, params, options) -> tasks.PredictHead:
    """Zero-shot over options["labels"] (default: the run's zero-shot class names; prompt-ensembled through options["templates"], default
    config.zeroshot.templates; scores are CLIP's softmax over the labels, or SigLIP's sigmoids),
    or retrieval over options["texts"] (scores are cosine similarities). top_k (default 5).
    Records: {"top_k": [{"label", "index", "score"}, ...]} (zero-shot also "class", "label": the
    best one); the image embedding is in the outputs
    (`Predictor.predict_arrays`) for other uses."""
    labels, texts = list(options.get("labels") or ()), list(options.get("texts") or ())
    if not labels and not texts and (self.config.zeroshot.classnames
                                     or self.config.dataset in _known_classnames()):
      labels = self.classnames()  # the run's own zero-shot classes
    if bool(labels) == bool(texts):
      raise ValueError("CLIP predictions need either labels (zero-shot classification) or texts "
                       f"(retrieval), one of the two; found {len(labels)} labels and {len(texts)} "
                       "texts.")
    k = int(options.get("top_k") or 5)
    encode_text = jax.jit(self.encode_text)
    templates = (options.get("templates") or self.config.zeroshot.templates) if labels else ("{}",)
    names = labels or texts
    # One template "{}" embeds each text as it is (class_embeddings then only normalises).
    text_embeds = zeroshot.class_embeddings(lambda t: encode_text(params, t),
                                            self.tokenizer.encode, names, templates)
    zero_shot, sigmoid = bool(labels), self.config.contrastive_loss == "sigmoid"
    scale = self.logit_scale(params)
    bias = float(np.asarray(params["logit_bias"])) if "logit_bias" in params else 0.0

    def fn(params, text_embeds, images):
      image = clip.l2_normalize(self.encode_image(params, images))
      cosine = image @ text_embeds.T  # [batch, labels or texts]
      if not zero_shot:
        scores = cosine
      elif sigmoid:
        scores = jax.nn.sigmoid(scale * cosine + bias)
      else:
        scores = jax.nn.softmax(scale * cosine, axis=-1)
      return {"scores": scores, "image_embeds": image}

    def records(out, info):
      del info
      tops = tasks.top_k_labels(out["scores"], names, k)
      if not zero_shot:
        return [{"top_k": top} for top in tops]
      return [{"class": top[0]["index"], "label": top[0]["label"], "top_k": top} for top in tops]

    return tasks.PredictHead(fn=fn, aux=text_embeds.astype(np.float32), records=records,
                             summary=lambda r: tasks.format_top(r["top_k"]),
                             class_names=labels or None)

  def export_functions(self, params, image_shape=None):
    """{"encode_image": images float32 [batch, H, W, C] -> L2-normalised embeddings,
    "encode_text": int32 tokens [batch, context] -> L2-normalised embeddings}."""
    params = self.model_params(params)  # LoRA folded in
    # The config's size; the channels of the patch embedding (a model trained on gray
    # Fashion-MNIST takes 1).
    h, w = vit._pair(self.config.model.image_size)  # pylint: disable=protected-access
    shape = tuple(image_shape or (h, w, int(params["img"]["embedding"]["kernel"].shape[2])))
    length = int(self.config.context_length)
    tower = lambda method: lambda x: {"embeddings": clip.l2_normalize(
        self.model.apply({"params": params}, x, method=method))}
    note = (f"Similarity logits = {self.logit_scale(params):.6g} * image @ text.T"
            + (f" + {float(np.asarray(params['logit_bias'])):.6g}" if "logit_bias" in params
               else "") + ".")
    return {
        "encode_image": tasks.ExportFunction(
            tower(clip.CLIP.encode_image), (("images", ("batch",) + shape, "float32"),),
            f"images: float32 [batch, {shape[0]}, {shape[1]}, {shape[2]}], preprocessed as "
            f"config.pp.test without its label ops: {self.config.pp.test!r}. Output: "
            f"L2-normalised embeddings [batch, {self.config.model.embed_dim}]. {note}"),
        "encode_text": tasks.ExportFunction(
            tower(clip.CLIP.encode_text), (("tokens", ("batch", length), "int32"),),
            f"tokens: int32 [batch, {length}], CLIP BPE ids from vit_jax.input_pipeline.tokenizer "
            f"(context {length}, zero-padded; file config.tokenizer_path). Output: L2-normalised "
            f"embeddings [batch, {self.config.model.embed_dim}]. {note}"),
    }

  def write_checkpoint(self, params, fmt: str, out: str) -> str:
    """hf: a CLIPModel directory; npz: our CLIP names (LoRA folded in either way)."""
    from vit_jax.checkpoints_convert import clip as clip_convert  # pylint: disable=g-import-not-at-top
    params = jax.tree.map(np.asarray, self.model_params(params))
    if fmt == "hf":
      return clip_convert.export_hf_clip(params, self.config.model, out)
    path = os.path.join(out, "params.npz")
    clip_convert.export_npz(params, self.config.model, path)
    return path
