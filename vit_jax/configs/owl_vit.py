"""OWL-ViT detection configs: `--config=vit_jax/configs/owl_vit.py:MODEL,TRAIN_JSON[,RECIPE]`.

MODEL is an OWL-ViT preset of configs/models.py: b32, b16, l14 (OWL-ViT v1 at 768 / 768 / 840 px),
v2_b16, v2_l14 (OWLv2, with the objectness head, at 960 / 1008 px), mu (the CPU demo), nano (tests).
TRAIN_JSON is a COCO-format file (`images`, `annotations` with pixel `[x, y, w, h]`, `categories`);
`~` is expanded. The val split is `config.detection.val_json`, by default the `val.json` next to
it; images are found under `config.detection.image_root` (default: the json's directory).
RECIPE (configs/param_groups.py): seeds (default: AdamW, vision 1e-5 / text 2e-5 / heads 5e-4,
500 warmup steps, cosine), scenic (scenic's own: Adam, text 2e-6 / rest 5e-5, 1000 warmup steps),
heads (towers frozen), lora (rank-8 adapters on both towers, heads trainable), new_tokens (the text
tower frozen except the embeddings of `config.detection.new_tokens`).

Start from a public checkpoint with `--config.pretrained_path=`: an HF OwlViT/Owlv2 directory or
file, a scenic checkpoint, or any CLIP checkpoint (then only the towers load and the heads start
fresh, as scenic's `init_from.codebase='clip'`). The `mu` demo trains from scratch.
"""
import os

import ml_collections
from ml_collections import config_dict

from vit_jax.configs import common
from vit_jax.configs import models
from vit_jax.configs import param_groups

DEFAULT = "mu,~/owl_demo/train.json"
RECIPES = ("seeds", "scenic", "heads", "lora", "new_tokens")
# Images are padded bottom/right to a square before resizing, with grey 0.5 (in [0, 1] units):
# scenic's v1 and v2 training (`resize_with_pad`) and its inference notebook do so. HF's
# processors differ: OwlViT's stretches to a square without padding, Owlv2's pads with 0.0.
PAD_VALUE = 0.5
# Query prompts: each category's name through these templates. Training draws one per query per
# step; evaluation averages the normalised embeddings of all of them (prompt ensembling).
TEMPLATES = ("a photo of a {}.", "a {}.", "a photo of the {}.", "a picture of a {}.",
             "a close-up photo of a {}.", "a photo of a small {}.", "a photo of a large {}.")


def add_detection_keys(c: ml_collections.ConfigDict) -> None:
  """Read by tasks/detection.py, input_pipeline/detection.py and evaluation/detection.py."""
  c.task = "detection"
  c.data_source = "coco"
  c.train_split, c.eval_split = "train", "val"
  c.num_classes = config_dict.placeholder(int)  # from the train json's categories
  c.detection = ml_collections.ConfigDict(dict(
      # Data (input_pipeline/detection.py).
      train_json=config_dict.placeholder(str),
      val_json=config_dict.placeholder(str),
      test_json=config_dict.placeholder(str),
      image_root=config_dict.placeholder(str),  # None: the json's directory
      val_image_root=config_dict.placeholder(str),  # None: image_root
      test_image_root=config_dict.placeholder(str),
      max_boxes=20,  # boxes per image after augmentation (more are dropped, fewer padded)
      max_queries=16,  # queries per training image: its categories, then negatives
      num_negatives=16,  # absent categories added as negative queries (up to max_queries)
      drop_bad_boxes=False,  # False: an invalid json is refused with the validator's report
      skip_crowd=True,  # COCO iscrowd annotations are not training targets
      # Queries.
      templates=TEMPLATES,
      prompts=config_dict.placeholder(dict),  # {category name: [prompt, ...]}: replaces templates
      new_tokens=(),  # words added to the tokenizer, with trainable embeddings (recipe new_tokens)
      learned_queries=False,  # True: one learned embedding per category replaces the text tower's
      # Loss (losses.detection_loss) and matching.
      matcher="jax",  # jax (in-graph Hungarian) | scipy (host callback)
      class_loss_weight=1.0, bbox_loss_weight=1.0, giou_loss_weight=1.0,
      class_cost_weight=1.0, bbox_cost_weight=1.0, giou_cost_weight=1.0,
      focal_alpha=0.3, focal_gamma=2.0,  # scenic's
      normalization="per_example",  # per_example (scenic) | global
      # Evaluation (evaluation/detection.py).
      top_k=100,  # detections per image for COCO mAP
      score_threshold=0.0,
      nms_iou=config_dict.placeholder(float),  # class-wise NMS IoU; None: no NMS (OWL-ViT's)
      # Score threshold of the per-query precision/recall/F1 report and the PNGs (focal-loss
      # scores run low: HF's OWL-ViT examples show boxes above 0.1).
      report_threshold=0.1,
      num_visualizations=4,  # PNGs of predictions per evaluation, in workdir/eval_detection
  ))


def _pp(size: int, pad_value: float, train: bool) -> str:
  """input_pipeline/detection.py's ops; `det_queries` and `pad_boxes` take max_queries,
  num_negatives and max_boxes from config.detection."""
  pad = f"pad_to_square({size}, pad_value={pad_value})"
  if not train:
    return f"decode|{pad}|pad_boxes|normalize('clip')"
  # scenic's crop (keeps >= 60% of a box's area, else drops the box), flip, the seeds' jitter.
  return (f"decode|det_crop(min_area_fraction=0.6)|det_flip_lr|color_jitter(0.2, 0.2, 0.2)|"
          f"{pad}|det_queries|pad_boxes|normalize('clip')")


def _recipe(name: str) -> dict:
  if name == "seeds":
    return param_groups.owl_vit_seeds()
  if name == "scenic":
    return param_groups.owl_vit_scenic()
  if name == "heads":
    return param_groups.owl_vit_heads()
  if name == "lora":
    return param_groups.owl_vit_lora()
  if name == "new_tokens":
    return param_groups.owl_vit_seeds(text="new_tokens")
  raise ValueError(f"Unknown OWL-ViT recipe {name!r}: expected one of {', '.join(RECIPES)}.")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg` is 'MODEL,TRAIN_JSON[,RECIPE]', e.g. 'b32,~/data/train.json,heads'."""
  parts = [p.strip() for p in (arg or DEFAULT).split(",")]
  if len(parts) not in (2, 3) or not parts[1]:
    raise ValueError(f"Config argument {arg!r}: expected 'MODEL,TRAIN_JSON[,RECIPE]' such as "
                     "'b32,~/data/train.json,seeds'.")
  model_name, train_json = parts[0], os.path.expanduser(parts[1])
  recipe = parts[2] if len(parts) == 3 else "seeds"
  c = common.get_base_config()
  add_detection_keys(c)
  c.model = models.get_owl_vit_config(model_name)
  c.context_length = c.model.text.context_length  # 16, OWL-ViT's
  c.dataset = "coco_json"
  c.detection.train_json = train_json
  val_json = os.path.join(os.path.dirname(train_json), "val.json")
  if os.path.exists(val_json):
    c.detection.val_json = val_json
  size = c.model.image_size
  # The square padding's value is in the pp strings (pad_to_square's pad_value).
  c.pp.train = _pp(size, PAD_VALUE, True)
  c.pp.test = _pp(size, PAD_VALUE, False)
  c.update(_recipe(recipe))
  # Fine-tuning defaults (a few thousand steps from a public checkpoint, batch 16 as the seeds'
  # 8 x 2 accumulation); the CPU demo below trains from scratch.
  c.batch, c.batch_eval = 16, 16
  c.total_steps = 3000
  c.shuffle_buffer = 1000
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 50, 500, 500
  c.loss = "sigmoid_xent"  # unused by this task; kept so shared keys stay valid
  if model_name.lower().startswith("mu"):
    _cpu_demo(c)
  c.lock()
  return c


def _cpu_demo(c: ml_collections.ConfigDict) -> None:
  """The offline demo (vit_jax/demos/tuxpaint_detection.py): a small OWL-ViT from scratch."""
  c.batch, c.batch_eval = 16, 50
  c.total_steps, c.warmup_steps = 2000, 100
  c.base_lr, c.weight_decay = 1e-3, 0.01
  # From scratch, every part learns at the same rate (the seeds' per-part LRs assume pretrained
  # towers).
  c.param_groups = None
  c.detection.max_queries = c.detection.num_negatives = 8
  c.detection.max_boxes = 8
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 50, 250, 250
