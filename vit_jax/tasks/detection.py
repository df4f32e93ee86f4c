"""Open-vocabulary detection: OWL-ViT on COCO-format data, with Hungarian-matched losses and
COCO mAP.

The task interface is classification.py's (`init_params`, `loss_fn`, `evaluators`). What differs:
- queries: each training image's queries are category indices from the pipeline
  (`query_classes` [b, Q]: its categories, then sampled negatives, -1 padding); the task turns
  them into text. Each category has a prompt list (config.detection.prompts, else the
  templates applied to its name), tokenized once into a table [C, T, L]; a training step draws
  one prompt per query on the device (OWL-ViT's random prompts), and evaluation uses the
  prompt-ensembled embedding of each category (mean of the normalised embeddings of all its
  prompts), computed once per evaluation. `learned_queries` replaces the text with one learned
  embedding per category (`params["query_embeddings"]`, initialised from those ensembles);
- targets: box j of an image is an instance of query k when their categories agree:
  labels [b, M, Q] = (box_classes[:, :, None] == query_classes[:, None, :]), then
  losses.detection_loss matches predictions to boxes (class + L1 + GIoU cost, in-graph
  Hungarian) and sums the focal class loss and the L1 + GIoU box losses;
- evaluation: COCO mAP through pycocotools (evaluation/detection.py) over the eval split's json,
  with all categories as queries, plus a per-query precision/recall/F1 report and PNGs of a few
  predictions in workdir/eval_detection/;
- domain vocabulary: `config.detection.new_tokens` adds whole words to the tokenizer, with
  embeddings of their own (`txt/extra_token_embedding`) that the `new_tokens` recipe trains while
  the rest of the text tower stays frozen.
"""
from typing import Any, Dict, List, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import losses
from vit_jax import tasks
from vit_jax import parallel
from vit_jax.configs import models as model_configs
from vit_jax.models import clip
from vit_jax.models import lora
from vit_jax.models import owl_vit

# Text queries embedded per call when building the class embeddings (bounded memory).
_TEXT_CHUNK = 256


def prompt_lists(names: List[str], templates, prompts=None) -> List[List[str]]:
  """Each category's prompts: `prompts[name]` when given (every category must have some), else
  every template with the name filled in."""
  if prompts:
    prompts = dict(prompts)
    missing = [n for n in names if not prompts.get(n)]
    unknown = sorted(set(prompts) - set(names))
    if missing or unknown:
      raise ValueError(f"config.detection.prompts: categories without prompts {missing}; names "
                       f"that are not categories {unknown}. Categories: {names}.")
    return [[str(p) for p in prompts[n]] for n in names]
  if not templates or any("{}" not in t for t in templates):
    raise ValueError(f"config.detection.templates={templates!r}: expected templates with one "
                     "'{}' each.")
  return [[t.format(n) for t in templates] for n in names]


class DetectionTask:

  def __init__(self, config):
    from vit_jax.input_pipeline import detection as det_data  # lazy: TensorFlow
    from vit_jax.input_pipeline import tokenizer as tokenizer_lib
    self.config = config
    d = config.detection
    if config.accum_steps != 1:
      raise ValueError(f"config.accum_steps={config.accum_steps}: not supported by the detection "
                       "task yet (its loss normalises by the boxes of the whole batch).")
    if config.model.text.context_length != config.context_length:
      raise ValueError(f"config.model.text.context_length={config.model.text.context_length} but "
                       f"config.context_length={config.context_length}: make them equal.")
    train = det_data.read_coco(det_data.split_files(config, config.train_split)[0])
    self.category_names = list(train.category_names)
    self.category_ids = [int(i) for i in train.category_ids]
    if config.num_classes is not None and config.num_classes != len(self.category_names):
      raise ValueError(f"config.num_classes={config.num_classes}, but the train json has "
                       f"{len(self.category_names)} categories.")
    self.tokenizer = tokenizer_lib.get_tokenizer(config.tokenizer_path, config.context_length)
    kwargs = model_configs.owl_vit_kwargs(config.model)
    if d.new_tokens:
      new_ids = self.tokenizer.add_tokens(list(d.new_tokens))
      logging.info("Added %d words to the tokenizer (ids %s): %s", len(new_ids), new_ids,
                   list(d.new_tokens))
      text = dict(kwargs["text"])
      text.update(extra_tokens=self.tokenizer.vocab_size - text.get("vocab_size", 49408),
                  eot_token_id=self.tokenizer.eot_id)
      kwargs["text"] = text
    self.model = owl_vit.OwlViT(
        remat=config.remat, remat_policy=config.remat_policy, dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype), **kwargs)
    self.axis_name = parallel.AXIS if config.parallelism == "pmap" else None
    # [C, T, L] prompt tokens (zero rows pad categories with fewer prompts) and [C] counts.
    lists = prompt_lists(self.category_names, d.templates, d.prompts)
    most = max(len(p) for p in lists)
    table = np.zeros((len(lists), most, config.context_length), np.int32)
    for c, ps in enumerate(lists):
      table[c, :len(ps)] = self.tokenizer.encode(ps)
    self.prompt_tokens = table
    self.prompt_counts = np.array([len(p) for p in lists], np.int32)
    self._embed_text = jax.jit(self.embed_text)  # one compilation for every evaluation

  # -- params ---------------------------------------------------------------------------------

  def init_params(self, rng: jax.Array, batch: Dict[str, Any]):
    """Params for `batch`'s image size; pretrained if `config.pretrained_path` is set (an OWL-ViT
    checkpoint: everything; a CLIP checkpoint: the towers, heads fresh); learned query
    embeddings and LoRA adapters when configured."""
    image = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
    tokens = jnp.asarray(self.prompt_tokens[None, :1, 0])  # [1, 1, L]
    init_rng, lora_rng = jax.random.split(rng)
    # Jitted: flax's eager init of both towers dispatches op by op (tens of seconds on a CPU).
    params = jax.jit(self.model.init)(init_rng, image, tokens)["params"]
    if self.config.get("pretrained_path"):
      from vit_jax.checkpoints_convert import owl_vit as owl_convert  # lazy: torch/safetensors
      params = owl_convert.load_pretrained(
          self.config.pretrained_path, self.config.model, params,
          image_size=tuple(image.shape[1:3]), resize_method=self.config.posemb_resize_method)
      params = jax.tree.map(jnp.asarray, params)
    params = dict(params)
    if self.config.detection.learned_queries:
      params["query_embeddings"] = jnp.asarray(self.ensemble_embeddings(params))
      logging.info("Learned queries: %s, initialised from the prompt ensembles",
                   params["query_embeddings"].shape)
    params, note = lora.add_lora_from_config(params, self.config.lora, lora_rng)
    if note:
      logging.info("%s", note)
    return params

  def model_params(self, params):
    """The params the flax module takes: LoRA folded in, learned queries set aside."""
    params = lora.merge_lora(params, self.config.lora.alpha)
    return {k: v for k, v in params.items() if k != "query_embeddings"}

  def embed_text(self, params, tokens):
    """int [..., L] -> unnormalised query embeddings [..., embed_dim]."""
    return self.model.apply({"params": self.model_params(params)}, tokens,
                            method=owl_vit.OwlViT.embed_text)

  def ensemble_embeddings(self, params) -> np.ndarray:
    """[C, embed_dim]: per category, the mean of its prompts' L2-normalised text embeddings
    (prompt ensembling, as CLIP's zero-shot classifier), normalised again."""
    if "query_embeddings" in params:
      return np.asarray(params["query_embeddings"])
    c, t, length = self.prompt_tokens.shape
    flat = self.prompt_tokens.reshape(c * t, length)
    embed = self._embed_text
    chunks = []
    for i in range(0, len(flat), _TEXT_CHUNK):
      part = flat[i:i + _TEXT_CHUNK]
      pad = _TEXT_CHUNK - len(part)  # one compiled shape
      part = np.concatenate([part, np.zeros((pad, length), part.dtype)]) if pad else part
      chunks.append(np.asarray(clip.l2_normalize(embed(params, part)))[:len(part) - pad])
    z = np.concatenate(chunks).reshape(c, t, -1)
    mask = (np.arange(t)[None, :] < self.prompt_counts[:, None])[..., None]
    mean = (z * mask).sum(1) / self.prompt_counts[:, None]
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

  # -- training -------------------------------------------------------------------------------

  def targets(self, batch) -> Dict[str, jnp.ndarray]:
    """The loss's targets from a batch: boxes [b, M, 4], labels [b, M, Q], masks."""
    box_classes, query_classes = batch["box_classes"], batch["query_classes"]
    box_mask, query_mask = box_classes >= 0, query_classes >= 0
    labels = ((box_classes[:, :, None] == query_classes[:, None, :])
              & box_mask[:, :, None] & query_mask[:, None, :])
    return {"boxes": batch["boxes"], "labels": labels.astype(jnp.float32), "box_mask": box_mask,
            "query_mask": query_mask}

  def sample_query_tokens(self, query_classes, rng):
    """int [b, Q] category indices (-1 padding) -> tokens [b, Q, L]: one of each category's
    prompts, drawn uniformly; zero rows (padding queries) for -1."""
    table = jnp.asarray(self.prompt_tokens)
    counts = jnp.asarray(self.prompt_counts)
    cls = jnp.maximum(query_classes, 0)
    pick = jnp.floor(jax.random.uniform(rng, query_classes.shape) * counts[cls]).astype(jnp.int32)
    tokens = table[cls, jnp.minimum(pick, counts[cls] - 1)]
    return jnp.where((query_classes >= 0)[..., None], tokens, 0)

  def loss_fn(self, params, batch, rng) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    prompt_rng, dropout_rng = jax.random.split(rng)
    if self.axis_name is not None:  # pmap: each device draws its own queries' prompts
      prompt_rng = jax.random.fold_in(prompt_rng, jax.lax.axis_index(self.axis_name))
    query_classes = batch["query_classes"]
    query_mask = query_classes >= 0
    variables = {"params": self.model_params(params)}
    if "query_embeddings" in params:
      query_embeds = params["query_embeddings"][jnp.maximum(query_classes, 0)]
      out = self.model.apply(variables, batch["image"], None, query_embeds=query_embeds,
                             query_mask=query_mask, train=True, rngs={"dropout": dropout_rng})
    else:
      tokens = self.sample_query_tokens(query_classes, prompt_rng)
      out = self.model.apply(variables, batch["image"], tokens, train=True,
                             rngs={"dropout": dropout_rng})
    d = self.config.detection
    return losses.detection_loss(
        out, self.targets(batch), matcher=d.matcher, class_weight=d.class_loss_weight,
        bbox_weight=d.bbox_loss_weight, giou_weight=d.giou_loss_weight,
        cost_class_weight=d.class_cost_weight, cost_bbox_weight=d.bbox_cost_weight,
        cost_giou_weight=d.giou_cost_weight, focal_alpha=d.focal_alpha,
        focal_gamma=d.focal_gamma, normalization=d.normalization, axis_name=self.axis_name)

  # -- evaluation -----------------------------------------------------------------------------

  def predict(self, params, class_embeddings, images):
    """images [b, S, S, 3], class embeddings [C, E] -> (pred_logits [b, n, C], pred_boxes
    [b, n, 4] cxcywh in [0, 1])."""
    b = images.shape[0]
    queries = jnp.broadcast_to(class_embeddings[None], (b,) + class_embeddings.shape)
    out = self.model.apply({"params": self.model_params(params)}, images, None,
                           query_embeds=queries)
    return out["pred_logits"], out["pred_boxes"]

  def evaluators(self):
    from vit_jax.evaluation import detection as det_eval  # lazy: pycocotools
    from vit_jax.input_pipeline import detection as det_data
    d = self.config.detection
    gt_json, image_root = det_data.split_files(self.config, self.config.eval_split)
    ev = det_eval.make_coco_evaluator(
        self.predict, gt_json=gt_json, image_root=image_root,
        category_ids=self.category_ids, category_names=self.category_names, top_k=d.top_k,
        score_threshold=d.score_threshold, nms_iou=d.nms_iou,
        report_threshold=d.report_threshold, num_images=d.num_visualizations)
    ev.prepare = lambda params: jnp.asarray(self.ensemble_embeddings(params))
    return {"coco": ev}

  # -- using the trained model (predict.py, export.py) ---------------------------------------

  def query_embeddings(self, params, queries=(), query_image=None, query_box=None):
    """[Q, embed_dim] query embeddings and their names: text queries (L2-normalised text
    embeddings, as the model embeds text queries), or one image query: the class embedding of the
    token whose predicted box best fits `query_box` (cx, cy, w, h in [0, 1] of the preprocessed
    `query_image` [S, S, 3]; OWL-ViT's one-shot heuristic, `OwlViT.embed_image_query`)."""
    if bool(queries) == (query_image is not None):
      raise ValueError("OWL-ViT predictions need either text queries or a query image with a "
                       f"query box, one of the two; found {len(queries)} text queries and "
                       f"{'a' if query_image is not None else 'no'} query image.")
    if queries:
      tokens = self.tokenizer.encode(list(queries))
      return np.asarray(clip.l2_normalize(self._embed_text(params, tokens))), list(queries)
    box = np.asarray(query_box, np.float32).reshape(1, 4)
    embed, _ = jax.jit(lambda p, im, b: self.model.apply(
        {"params": self.model_params(p)}, im, b, method=owl_vit.OwlViT.embed_image_query))(
            params, jnp.asarray(query_image, jnp.float32)[None], box)
    return np.asarray(embed), ["query"]

  def predict_head(self, params, options) -> tasks.PredictHead:
    """options: queries (text) or query_image + query_box (see `query_embeddings`); threshold
    (default config.detection.report_threshold), top_k (default config.detection.top_k), nms_iou
    (default config.detection.nms_iou). Records: {"detections": [{"label", "query", "score",
    "box": COCO pixel [x, y, w, h] in the file's own pixels}, ...], best first}."""
    from vit_jax.evaluation import detection as det_eval  # lazy: pycocotools
    d = self.config.detection
    query_embeds, names = self.query_embeddings(
        params, options.get("queries") or (), options.get("query_image"),
        options.get("query_box"))
    threshold = options.get("threshold")
    threshold = d.report_threshold if threshold is None else float(threshold)
    k = int(options.get("top_k") or d.top_k)
    nms_iou = options.get("nms_iou", d.nms_iou)

    def fn(params, query_embeds, images):
      pred_logits, pred_boxes = self.predict(params, query_embeds, images)
      return det_eval.top_k_detections(pred_logits, pred_boxes, k)

    def records(outputs, info):
      dets = det_eval.postprocess(outputs, score_threshold=threshold, nms_iou=nms_iou,
                                  max_detections=k)
      out = []
      for image_dets, (h, w) in zip(dets, info["orig_size"]):
        boxes = det_eval.to_pixel_xywh(image_dets["boxes"], int(h), int(w))
        out.append({"detections": [
            {"label": names[int(c)], "query": int(c), "score": float(sc),
             "box": [round(float(v), 2) for v in b]}
            for sc, c, b in zip(image_dets["scores"], image_dets["classes"], boxes)]})
      return out

    def summary(r):
      dets = r["detections"]
      if not dets:
        return f"no box >= {threshold:g}"
      return f"{len(dets)} boxes: " + ", ".join(f"{x['label']} {x['score']:.2f}" for x in dets[:3])

    def draw(pixels, record, path):
      dets = record["detections"]
      return det_eval.draw_detections(pixels, [x["box"] for x in dets],
                                      [x["label"] for x in dets], [x["score"] for x in dets], path)

    return tasks.PredictHead(fn=fn, aux=query_embeds.astype(np.float32), records=records,
                             summary=summary, draw=draw)

  def export_functions(self, params, image_shape=None):
    """{"detect": images float32 [batch, S, S, 3] and query tokens int32 [queries, context] ->
    logits [batch, patches, queries], boxes [batch, patches, 4] (cx, cy, w, h in [0, 1] of the
    padded square)}."""
    params = self.model_params(params)
    size = int(self.config.model.image_size)
    shape = tuple(image_shape or (size, size, 3))
    length = int(self.config.context_length)

    def detect(images, query_tokens):
      variables = {"params": params}
      # The text tower runs once per query, not once per (image, query).
      embeds = clip.l2_normalize(self.model.apply(variables, query_tokens,
                                                  method=owl_vit.OwlViT.embed_text))
      b = images.shape[0]
      out = self.model.apply(
          variables, images, None, query_embeds=jnp.broadcast_to(embeds[None],
                                                                 (b,) + embeds.shape),
          query_mask=jnp.broadcast_to(query_tokens[None, :, 0] > 0, (b, query_tokens.shape[0])))
      result = {"logits": out["pred_logits"], "boxes": out["pred_boxes"]}
      if "objectness_logits" in out:
        result["objectness_logits"] = out["objectness_logits"]
      return result

    doc = (f"images: float32 [batch, {shape[0]}, {shape[1]}, {shape[2]}], preprocessed as "
           f"config.pp.test without its box ops: {self.config.pp.test!r} (pad bottom/right to a "
           f"square, resize, CLIP normalisation). query_tokens: int32 [queries, {length}], CLIP "
           "BPE ids (vit_jax.input_pipeline.tokenizer; a row starting with 0 is padding). "
           "Outputs: logits [batch, patches, queries] (score = sigmoid(logit)), boxes [batch, "
           "patches, 4] cx, cy, w, h in [0, 1] of the padded square (x max(height, width) for "
           "pixels).")
    return {"detect": tasks.ExportFunction(
        detect, (("images", ("batch",) + shape, "float32"),
                 ("query_tokens", ("queries", length), "int32")), doc)}

  def write_checkpoint(self, params, fmt: str, out: str) -> str:
    """hf: an OwlViT / Owlv2 ForObjectDetection directory (LoRA folded in)."""
    from vit_jax.checkpoints_convert import owl_vit as owl_convert  # pylint: disable=g-import-not-at-top
    if fmt != "hf":
      raise ValueError(f"--format={fmt}: OWL-ViT params export as hf (an HF detector directory, "
                       "which checkpoints_convert reads back); a workdir's checkpoints/ folder "
                       "is itself a pretrained_path.")
    params = jax.tree.map(np.asarray, self.model_params(params))
    return owl_convert.export_hf_owl_vit(params, self.config.model, out)
