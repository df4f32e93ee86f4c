"""The detection task through the one training loop: OWL-ViT (nano) trains on a COCO json under
pjit, its COCO evaluator (run by train.evaluate over padded multi-device batches) equals
pycocotools on the same model's predictions made image by image, pmap and pjit give one loss, and
the recipes, learned queries and added vocabulary build the trees they promise."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax import optim
from vit_jax import parallel
from vit_jax import train
from vit_jax.configs import owl_vit as owl_config
from vit_jax.models import box_ops
from vit_jax.tasks import detection

CATEGORIES = ((3, "cat"), (7, "dog"), (9, "bus"))


def _coco(root, seed, n):
  """n images of various shapes with 1-2 boxes each (categories 3, 7, 9)."""
  rng = np.random.RandomState(seed)
  images, anns = [], []
  for i in range(n):
    w, h = int(rng.choice([24, 32, 40])), int(rng.choice([24, 32]))
    images.append((100 * seed + i + 1, w, h))
    for _ in range(rng.randint(1, 3)):
      bw, bh = rng.randint(6, 12, 2)
      x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
      anns.append((len(anns) + 1000 * seed + 1, 100 * seed + i + 1,
                   int(rng.choice([3, 7, 9])), [float(x), float(y), float(bw), float(bh)]))
  return util.write_coco(root, images, anns, categories=CATEGORIES, name=f"split{seed}.json")


def _config(tmp_path, parallelism="pjit", recipe="seeds", **detection_overrides):
  train_json = _coco(tmp_path, 1, 12)
  val_json = _coco(tmp_path, 2, 5)
  c = owl_config.get_config(f"nano,{train_json},{recipe}")
  c.unlock()
  c.detection.val_json = val_json
  c.parallelism = parallelism
  c.batch, c.batch_eval, c.total_steps, c.warmup_steps = 8, 8, 3, 1
  c.shuffle_buffer, c.prefetch, c.log_every_steps = 16, 1, 1
  c.eval_every_steps, c.checkpoint_every_steps = 0, 0
  c.detection.max_boxes, c.detection.max_queries, c.detection.num_negatives = 4, 3, 2
  c.detection.templates = ("a photo of a {}.", "a {}.")
  c.detection.num_visualizations = 2
  c.detection.report_threshold = 0.0
  for k, v in detection_overrides.items():
    setattr(c.detection, k, v)
  return c


def _abstract_train_state(config, task, batch):
  """The step-0 TrainState's structure, shapes and dtypes, on device 0, as a checkpoint restore
  target: jax.eval_shape of train.create_train_state, so no init is computed (the nano
  detector's eager init costs ~7 s)."""
  shapes = jax.eval_shape(lambda: train.create_train_state(config, task, jax.random.PRNGKey(0),
                                                           batch)[0])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def test_trains_and_coco_eval_matches_pycocotools(tmp_path):
  config = _config(tmp_path)
  workdir = str(tmp_path / "w")
  result = train.train_and_evaluate(config, workdir)
  assert result["coco/num_examples"] == 5
  for k in ("AP", "AP50", "AP75", "AR100", "precision@0", "recall@0", "f1@0"):
    assert f"coco/{k}" in result
  step_dir = os.path.join(workdir, "eval_detection", "step_3")
  pngs = [f for f in os.listdir(step_dir) if f.endswith(".png")]
  assert len(pngs) == 2 and os.path.getsize(os.path.join(step_dir, "per_query.csv")) > 0

  # Independently: the final params, predictions image by image (no padding, no device
  # sharding), boxes to pixels by hand, pycocotools' COCOeval directly.
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  task = train.get_task(config)
  ckpt_state = train.checkpoint.Checkpointer(workdir).restore(
      3, _abstract_train_state(config, task, next(input_pipeline.make_train_iterator(config))))
  params = ckpt_state.params
  queries = jnp.asarray(task.ensemble_embeddings(params))
  gt = json.load(open(config.detection.val_json))
  results = []
  eval_data = input_pipeline.make_eval_data(config)
  predict = jax.jit(task.predict)
  for batch in eval_data:
    for i in np.flatnonzero(batch["_mask"]):
      logits, boxes = predict(params, queries, jnp.asarray(batch["image"][i:i + 1]))
      scores = np.asarray(jax.nn.sigmoid(logits[0]))  # [n, C]
      xyxy = np.asarray(box_ops.cxcywh_to_xyxy(boxes[0])) * batch["orig_size"][i].max()
      h, w = batch["orig_size"][i]
      xyxy = np.clip(xyxy, 0, [w, h, w, h])
      flat = np.argsort(-scores.ravel(), kind="stable")[:config.detection.top_k]
      for f in flat:
        p, c = divmod(int(f), scores.shape[1])
        x0, y0, x1, y1 = xyxy[p]
        results.append({"image_id": int(batch["image_id"][i]), "category_id": CATEGORIES[c][0],
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "score": float(scores[p, c])})
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  ev = COCOeval(coco, coco.loadRes(results), "bbox")
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  np.testing.assert_allclose(result["coco/AP"], ev.stats[0], atol=1e-6)
  np.testing.assert_allclose(result["coco/AP50"], ev.stats[1], atol=1e-6)
  np.testing.assert_allclose(result["coco/AR100"], ev.stats[8], atol=1e-6)


def test_pmap_loss_equals_pjit(tmp_path):
  config = _config(tmp_path, normalization="global")
  batch = next(input_pipeline.make_train_iterator(config))
  task = train.get_task(config)
  params = task.init_params(jax.random.PRNGKey(0), batch)
  rng = jax.random.PRNGKey(1)
  config.parallelism = "pmap"
  pmap_task = detection.DetectionTask(config)
  n = 2
  shard = lambda x: x.reshape((n, -1) + x.shape[1:])
  # Same prompts on both sides: each device draws its own, so the prompts differ from the
  # one-device draw; one prompt per category makes the draw irrelevant.
  pmap_task.prompt_tokens = task.prompt_tokens = task.prompt_tokens[:, :1]
  pmap_task.prompt_counts = task.prompt_counts = np.ones_like(task.prompt_counts)
  loss, metrics = jax.jit(task.loss_fn)(params, train.device_batch(batch), rng)
  pmapped = jax.pmap(lambda p, b, r: jax.lax.pmean(pmap_task.loss_fn(p, b, r), parallel.AXIS),
                     axis_name=parallel.AXIS, in_axes=(None, 0, None), devices=jax.devices()[:n])
  ploss, pmetrics = pmapped(params, jax.tree.map(shard, train.device_batch(batch)), rng)
  np.testing.assert_allclose(ploss[0], loss, rtol=1e-5)
  for k in ("loss_class", "loss_bbox", "loss_giou"):
    np.testing.assert_allclose(pmetrics[k][0], metrics[k], rtol=1e-5, atol=1e-6)


def test_learned_queries_and_new_vocabulary(tmp_path):
  config = _config(tmp_path, recipe="new_tokens", learned_queries=True,
                   new_tokens=("xq7mosfet",), templates=("a photo of a {}.", "a {} xq7mosfet."))
  batch = next(input_pipeline.make_train_iterator(config))
  task = train.get_task(config)
  params = task.init_params(jax.random.PRNGKey(0), batch)
  # The added word is one token past CLIP's vocabulary, with an embedding row of its own.
  assert task.tokenizer.encode("xq7mosfet")[0, 1] == 49408
  assert params["txt"]["extra_token_embedding"]["embedding"].shape[0] == 1
  # Learned queries start at the prompt ensembles: mean of normalised prompt embeddings.
  z = np.asarray(task.embed_text({k: v for k, v in params.items() if k != "query_embeddings"},
                                  jnp.asarray(task.prompt_tokens.reshape(-1, 16))))
  z = (z / np.linalg.norm(z, axis=-1, keepdims=True)).reshape(3, 2, -1).mean(1)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  np.testing.assert_allclose(params["query_embeddings"], z, atol=1e-5)
  # The loss takes the learned queries (shapes only: the loss itself is tested above).
  loss = jax.eval_shape(task.loss_fn, params, train.device_batch(batch), jax.random.PRNGKey(1))[0]
  assert loss.shape == ()
  # The new_tokens recipe: the text tower frozen except the added embeddings.
  groups = optim.assign_groups(optim.parse_param_groups(config), params)
  by_group = {}
  for path, g in groups.items():
    by_group.setdefault(g.name, []).append(path)
  assert by_group["new_tokens"] == ["txt/extra_token_embedding/embedding"]
  assert all(p.startswith("txt/") for p in by_group["text_frozen"])
  assert "query_embeddings" in by_group["heads"]


@pytest.mark.parametrize("recipe", owl_config.RECIPES)
def test_recipes_cover_the_tree(tmp_path, recipe):
  defaults = owl_config.get_config(f"nano,/data/train.json,{recipe}")
  config = _config(tmp_path, recipe=recipe,
                   new_tokens=("xq7mosfet",) if recipe == "new_tokens" else ())
  task = detection.DetectionTask(config)
  shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0),
                          {"image": np.zeros((1, 16, 16, 3), np.float32)})
  groups = optim.assign_groups(optim.parse_param_groups(config), shapes)
  lrs = {g.name: (g.base_lr, g.frozen) for g in groups.values()}
  if recipe == "seeds":
    assert lrs == {"text": (2e-5, False), "vision": (1e-5, False), "heads": (5e-4, False)}
    assert (defaults.optimizer, defaults.weight_decay, defaults.warmup_steps, defaults.b2,
            defaults.decay_type) == ("adamw", 0.01, 500, 0.999, "cosine")
    assert groups["merged_class_token/scale"].name == "vision"
  elif recipe == "scenic":
    assert lrs == {"text": (2e-6, False), "image_and_heads": (5e-5, False)}
    assert (defaults.weight_decay, defaults.warmup_steps) == (0.0, 1000)
  elif recipe == "heads":
    assert groups["box_head/dense2/kernel"].name == "heads"
    assert groups["img/embedding/kernel"].frozen and groups["txt/head/kernel"].frozen
  elif recipe == "lora":
    assert not groups[next(p for p in groups if p.startswith("lora/"))].frozen
    assert groups["class_head/dense0/kernel"].name == "heads"
    assert groups["img/embedding/kernel"].frozen
  else:  # new_tokens
    assert groups["txt/extra_token_embedding/embedding"].name == "new_tokens"
    assert groups["txt/token_embedding/embedding"].frozen


@pytest.mark.parametrize("name", ["b32", "b16", "l14", "v2_b16", "v2_l14", "mu"])
def test_presets(name):
  c = owl_config.get_config(f"{name},/data/train.json")
  assert c.model.image_size == {"b32": 768, "b16": 768, "l14": 840, "v2_b16": 960,
                                "v2_l14": 1008, "mu": c.model.image_size}[name]
  assert c.context_length == 16 and c.task == "detection"
  assert f"pad_to_square({c.model.image_size}, pad_value=0.5)" in c.pp.train
  assert c.model.objectness == name.startswith("v2")


def test_bad_config_arguments():
  with pytest.raises(ValueError, match="MODEL,TRAIN_JSON"):
    owl_config.get_config("b32")
  with pytest.raises(ValueError, match="recipe"):
    owl_config.get_config("b32,/x.json,nope")
  with pytest.raises(ValueError, match="categories without prompts"):
    detection.prompt_lists(["cat", "dog"], ("a {}",), {"cat": ["a cat"]})


def test_pretrained_path_owl_vit_file_or_clip_backbone(tmp_path):
  """The task's init from `pretrained_path`: an OWL-ViT (HF) directory gives every param; a CLIP
  file gives the towers (position embeddings resampled to the run's size), heads as initialised."""
  from vit_jax.checkpoints_convert import clip as clip_convert  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints_convert import owl_vit as owl_convert  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  from vit_jax.models import clip  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path)
  task = detection.DetectionTask(config)
  batch = {"image": np.zeros((1, 16, 16, 3), np.float32)}
  fresh = task.init_params(jax.random.PRNGKey(0), batch)
  flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                    for path, v in jax.tree_util.tree_flatten_with_path(t)[0]}

  # An OWL-ViT checkpoint (our export, read back as HF's): everything comes from the file.
  other = jax.tree.map(lambda x: x + 0.5, fresh)
  owl_convert.export_hf_owl_vit(other, config.model, str(tmp_path / "owl"))
  config.pretrained_path = str(tmp_path / "owl")
  loaded = flat(task.init_params(jax.random.PRNGKey(0), batch))
  for k, v in flat(other).items():
    np.testing.assert_allclose(loaded[k], v, atol=1e-6, err_msg=k)

  # A CLIP checkpoint made at 8 px (a 2x2 grid): the towers load, resampled to 16 px (4x4).
  clip_config = models.get_clip_config("nano")
  clip_config.text.context_length = 16
  clip_model = clip.CLIP(**models.clip_kwargs(clip_config))
  clip_params = jax.jit(clip_model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 3)),
                                         jnp.zeros((1, 16), jnp.int32))["params"]
  clip_convert.export_npz(clip_params, clip_config, str(tmp_path / "clip.npz"))
  config.pretrained_path = str(tmp_path / "clip.npz")
  loaded = flat(task.init_params(jax.random.PRNGKey(0), batch))
  src, init = flat(clip_params), flat(fresh)
  for k in ("txt/token_embedding/embedding", "txt/head/kernel",
            "img/Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel", "img/embedding/kernel"):
    np.testing.assert_array_equal(loaded[k], src[k], err_msg=k)
  assert loaded["img/Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)
  np.testing.assert_array_equal(loaded["img/Transformer/posembed_input/pos_embedding"][0, 0],
                                src["img/Transformer/posembed_input/pos_embedding"][0, 0])
  for k in ("box_head/dense0/kernel", "class_head/dense0/kernel", "merged_class_token/scale"):
    np.testing.assert_array_equal(loaded[k], init[k], err_msg=k)
  assert "img/head/kernel" not in loaded
