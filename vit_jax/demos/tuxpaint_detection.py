r"""Builds the offline OWL-ViT demo: a COCO-format detection set with exact boxes, from real images
that ship in packages. Nothing here is vendored: the images come from the machine.

  apt-get install tuxpaint-stamps-default     # ~800 photo cut-outs with alpha masks (GPL)
  pip install scikit-image                    # ~20 bundled photos, used as backgrounds
  python -m vit_jax.demos.tuxpaint_detection --out ~/owl_demo [--clip-steps 1000]
  -> ~/owl_demo/{train,val,val_novel}.json, ~/owl_demo/images/*.jpg
     [~/owl_demo/clip_mu16.npz: CLIP towers pre-trained on the training boxes' crops]

Each image is a crop of a background photo (scikit-image's astronaut, coffee, rocket, ...) with 1-4
Tux Paint stamps pasted on it at random sizes and places. A stamp's box is the bounding box of its
alpha mask AFTER scaling and pasting, so every box is exact to the pixel; a stamp is never pasted
where it would hide more than `max_occlusion` of an earlier one. The categories are Tux Paint's own
stamp folders (animals/birds -> "bird", food/fruit -> "fruit", ...). Two held-out splits:
- `val.json`: new images (new compositions, sizes, places, background crops) of the training
  stamps: held-out images, the usual fine-tuning check;
- `val_novel.json`: images of stamps never seen in training (a fixed 20% of each category's
  stamps is held out), which measures recognising a category from other examples of it, not
  finding a known cut-out: much harder for a model trained from scratch on a few hundred images.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"
# category name -> Tux Paint stamp folder (relative to the stamps dir). Folders with >= 11 photos.
CATEGORIES: Dict[str, str] = {
    "mammal": "animals/mammals",
    "bird": "animals/birds",
    "insect": "animals/insects",
    "fish": "animals/fish",
    "fruit": "food/fruit",
    "vegetable": "food/vegetables",
    "flower": "plants/flowers",
    "house": "town/houses",
}
# scikit-image's bundled colour photos (in the wheel, no download); grey ones are tiled to RGB.
BACKGROUNDS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
               "hubble_deep_field", "retina", "immunohistochemistry", "camera", "brick", "grass",
               "gravel", "moon", "page", "text", "clock", "horse", "coins")


def load_backgrounds(names: Sequence[str] = BACKGROUNDS) -> List[np.ndarray]:
  """uint8 [h, w, 3] photos from scikit-image's bundled data (no download)."""
  try:
    from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The demo's backgrounds are scikit-image's bundled photos: "
                      "`pip install scikit-image`.") from e
  out = []
  for name in names:
    fn = getattr(skdata, name, None)
    if fn is None:
      continue
    try:
      img = np.asarray(fn())
    except Exception:  # pylint: disable=broad-except  # a photo that needs a download: skip it
      continue
    if img.dtype == bool:
      img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
      img = (255 * (img.astype(np.float64) / max(img.max(), 1e-9))).astype(np.uint8)
    if img.ndim == 2:
      img = np.stack([img] * 3, -1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4) or min(img.shape[:2]) < 128:
      continue
    out.append(np.ascontiguousarray(img[..., :3]))
  if not out:
    raise RuntimeError("No scikit-image background photo could be loaded.")
  return out


def list_stamps(stamps_dir: str, categories: Dict[str, str]) -> Dict[str, List[str]]:
  """{category: sorted RGBA .png stamp paths}; a missing folder is an error naming it."""
  if not os.path.isdir(stamps_dir):
    raise FileNotFoundError(f"{stamps_dir}: no Tux Paint stamps here; `apt-get install "
                            "tuxpaint-stamps-default`, or pass --stamps DIR.")
  out = {}
  for name, folder in categories.items():
    path = os.path.join(stamps_dir, folder)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path}: stamp folder of category {name!r} not found.")
    files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs
                   if f.endswith(".png") and "_mirror" not in f)
    if len(files) < 2:
      raise ValueError(f"{path}: category {name!r} needs >= 2 stamps (train and val), "
                       f"found {len(files)}.")
    out[name] = files
  return out


def split_stamps(stamps: Dict[str, List[str]], val_fraction: float, seed: int):
  """Per category, a fixed random val_fraction of the stamps (at least one) is held out."""
  rng = np.random.default_rng(seed)
  train, val = {}, {}
  for name, files in stamps.items():
    order = rng.permutation(len(files))
    k = max(1, int(round(val_fraction * len(files))))
    val[name] = [files[i] for i in sorted(order[:k])]
    train[name] = [files[i] for i in sorted(order[k:])]
  return train, val


def _load_stamp(path: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    im = im.convert("RGBA")
    alpha = np.asarray(im)[..., 3]
    ys, xs = np.nonzero(alpha > 0)
    if not len(ys):
      raise ValueError(f"{path}: the stamp's alpha mask is empty.")
    return im.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def _overlap_fraction(mask: np.ndarray, box) -> float:
  """Fraction of the pixels of an existing object's mask that a new box [x0, y0, x1, y1] covers."""
  total = mask.sum()
  if total == 0:
    return 1.0
  x0, y0, x1, y1 = box
  return float(mask[y0:y1, x0:x1].sum() / total)


def compose(background: np.ndarray, stamp_paths: Sequence[Tuple[str, int]], rng, *,
            canvas: Tuple[int, int], scale_range=(0.18, 0.5), max_occlusion: float = 0.3,
            tries: int = 20):
  """Pastes stamps on a random crop of `background` resized to `canvas` (h, w).

  Returns (uint8 [h, w, 3] image, [(category_index, [x, y, w, h] pixels, visible area)]).
  Boxes are the bounding boxes of the pasted alpha > 0 pixels still visible, so they are exact.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = canvas
  bh, bw = background.shape[:2]
  # A random crop of the background with the canvas's aspect ratio, then resized.
  crop_scale = rng.uniform(0.5, 1.0)
  ch = int(min(bh, bw * h / w) * crop_scale)
  cw = int(ch * w / h)
  y = int(rng.integers(0, bh - ch + 1))
  x = int(rng.integers(0, bw - cw + 1))
  img = Image.fromarray(background[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  owner = np.full((h, w), -1, np.int32)  # which pasted object owns each pixel
  placed = []
  for category, path in stamp_paths:
    stamp = _load_stamp(path)
    if rng.random() < 0.5:
      stamp = stamp.transpose(Image.FLIP_LEFT_RIGHT)
    for _ in range(tries):
      side = rng.uniform(*scale_range) * min(h, w)
      s = side / max(stamp.size)
      sw, sh = max(4, int(round(stamp.size[0] * s))), max(4, int(round(stamp.size[1] * s)))
      if sw >= w or sh >= h:
        continue
      x0, y0 = int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))
      if all(_overlap_fraction(owner == i, (x0, y0, x0 + sw, y0 + sh)) <= max_occlusion
             for i in range(len(placed))):
        break
    else:
      continue  # no room for this stamp
    piece = stamp.resize((sw, sh), Image.LANCZOS)
    alpha = np.asarray(piece)[..., 3] > 127
    img.paste(piece, (x0, y0), piece)
    region = owner[y0:y0 + sh, x0:x0 + sw]
    region[alpha] = len(placed)
    placed.append(category)
  objects = []
  for i, category in enumerate(placed):
    ys, xs = np.nonzero(owner == i)
    if len(ys) < 16:
      continue  # covered by later stamps
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    objects.append((category, [x0, y0, x1 - x0, y1 - y0], int(len(ys))))
  return np.asarray(img.convert("RGB")), objects


def build_split(out_dir: str, split: str, num_images: int, stamps: Dict[str, List[str]],
                backgrounds: List[np.ndarray], categories: Sequence[str], rng, *,
                max_objects: int = 4, sizes=((384, 384), (288, 384), (384, 288), (320, 448)),
                first_image_id: int = 1, first_ann_id: int = 1) -> dict:
  """Writes `num_images` JPEGs under out_dir/images and returns the split's COCO dict."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  images, annotations = [], []
  ann_id = first_ann_id
  for k in range(num_images):
    n = int(rng.integers(1, max_objects + 1))
    chosen = []
    for _ in range(n):
      c = int(rng.integers(len(categories)))
      files = stamps[categories[c]]
      chosen.append((c, files[int(rng.integers(len(files)))]))
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    h, w = sizes[int(rng.integers(len(sizes)))]
    pixels, objects = compose(bg, chosen, rng, canvas=(h, w))
    image_id = first_image_id + k
    file_name = f"images/{split}_{k:05d}.jpg"
    Image.fromarray(pixels).save(os.path.join(out_dir, file_name), quality=92)
    images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    for c, box, visible in objects:
      annotations.append({"id": ann_id, "image_id": image_id, "category_id": c + 1,
                          "bbox": [float(v) for v in box], "area": float(visible),
                          "iscrowd": 0})
      ann_id += 1
  return {"info": {"description": f"Tux Paint stamps on scikit-image photos ({split})"},
          "images": images, "annotations": annotations,
          "categories": [{"id": i + 1, "name": name, "supercategory": "object"}
                         for i, name in enumerate(categories)]}


def build(out_dir: str, *, stamps_dir: str = TUXPAINT_DIR, num_train: int = 800,
          num_val: int = 150, val_fraction: float = 0.2, seed: int = 0,
          categories: Dict[str, str] = CATEGORIES) -> Dict[str, str]:
  """Builds {train,val,val_novel}.json + images in `out_dir`; returns {split: json path}."""
  out_dir = os.path.expanduser(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  stamps = list_stamps(stamps_dir, categories)
  train_stamps, val_stamps = split_stamps(stamps, val_fraction, seed)
  backgrounds = load_backgrounds()
  names = list(categories)
  rng = np.random.default_rng(seed)
  paths = {}
  first_image, first_ann = 1, 1
  for split, n, st in (("train", num_train, train_stamps), ("val", num_val, train_stamps),
                       ("val_novel", num_val, val_stamps)):
    coco = build_split(out_dir, split, n, st, backgrounds, names, rng,
                       first_image_id=first_image, first_ann_id=first_ann)
    first_image += n
    first_ann += len(coco["annotations"])
    paths[split] = os.path.join(out_dir, f"{split}.json")
    with open(paths[split], "w") as f:
      json.dump(coco, f)
    counts = np.bincount([a["category_id"] - 1 for a in coco["annotations"]],
                         minlength=len(names))
    print(f"{split}: {n} images, {len(coco['annotations'])} boxes "
          f"({', '.join(f'{c} {k}' for c, k in zip(names, counts))}) -> {paths[split]}")
  return paths


# Captions of the crops for the optional CLIP pre-training: the category through these templates.
CROP_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a photo of the {}.")


def write_crops(out_dir: str, split: str, templates=CROP_TEMPLATES, margin: float = 0.1) -> str:
  """Crops every box of `out_dir/{split}.json` (with a `margin` around it) into
  `out_dir/crops/`, and writes `out_dir/crops/{split}.jsonl` of {"path", "captions"}: the
  category's name through `templates`, for configs/clip.py's `caption_jsonl` source."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, f"{split}.json")) as f:
    coco = json.load(f)
  names = {c["id"]: c["name"] for c in coco["categories"]}
  files = {im["id"]: im["file_name"] for im in coco["images"]}
  crops = os.path.join(out_dir, "crops")
  os.makedirs(crops, exist_ok=True)
  lines = []
  for a in coco["annotations"]:
    x, y, w, h = a["bbox"]
    with Image.open(os.path.join(out_dir, files[a["image_id"]])) as im:
      box = (max(0, int(x - margin * w)), max(0, int(y - margin * h)),
             min(im.width, int(x + w + margin * w + 1)), min(im.height, int(y + h + margin * h + 1)))
      name = f"{split}_{a['id']:06d}.jpg"
      im.convert("RGB").crop(box).save(os.path.join(crops, name), quality=92)
    lines.append(json.dumps({"path": name,
                             "captions": [t.format(names[a["category_id"]]) for t in templates]}))
  path = os.path.join(crops, f"{split}.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def clip_pretrain_config(out_dir: str, steps: int):
  """configs/clip.py's CPU model (mu16: patch 16, 64 px) on the training crops, context 16 (as
  OWL-ViT's text tower), evaluated by retrieval on the val crops."""
  from vit_jax.configs import clip as clip_configs  # pylint: disable=g-import-not-at-top
  c = clip_configs.get_config("mu16,captions")
  c.unlock()
  c.data_dir = os.path.join(out_dir, "crops")
  c.max_captions_eval = len(CROP_TEMPLATES)
  c.context_length = c.model.text.context_length = 16
  c.batch, c.batch_eval = 128, 250
  c.total_steps, c.warmup_steps = steps, max(1, steps // 10)
  c.base_lr, c.weight_decay = 1e-3, 0.1
  c.log_every_steps, c.eval_every_steps = 100, steps
  c.checkpoint_every_steps = steps
  c.shuffle_buffer = 5000
  return c


def pretrain_clip(out_dir: str, steps: int) -> str:
  """Trains the CLIP towers on the training crops (through the one training loop) and writes
  them as `out_dir/clip_mu16.npz`, which OWL-ViT's `pretrained_path` loads as its backbone
  (heads fresh, position embeddings resampled to the detector's size): the offline stand-in for
  starting from a public CLIP checkpoint."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints_convert import clip as clip_convert  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import wise_ft  # pylint: disable=g-import-not-at-top
  for split in ("train", "val"):
    write_crops(out_dir, split)
  config = clip_pretrain_config(out_dir, steps)
  logging.set_verbosity(logging.INFO)  # the training loop's progress lines, as under vit_jax.main
  workdir = os.path.join(out_dir, "clip_run")
  result = train.train_and_evaluate(config, workdir)
  print("CLIP on the crops:", {k: round(float(v), 4) for k, v in result.items()})
  params = wise_ft.load_params(config, workdir)[1]
  path = os.path.join(out_dir, "clip_mu16.npz")
  clip_convert.export_npz(params, config.model, path)
  print(f"CLIP towers -> {path}")
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (json files and images/)")
  p.add_argument("--stamps", default=TUXPAINT_DIR, help="Tux Paint stamps directory")
  p.add_argument("--num-train", type=int, default=800)
  p.add_argument("--num-val", type=int, default=150, help="images in each of val, val_novel")
  p.add_argument("--val-fraction", type=float, default=0.2,
                 help="fraction of each category's stamps held out for val_novel")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--clip-steps", type=int, default=0,
                 help="> 0: also pre-train CLIP towers on the training boxes' crops for this "
                 "many steps and write OUT/clip_mu16.npz (OWL-ViT's --config.pretrained_path)")
  args = p.parse_args(argv)
  out = os.path.expanduser(args.out)
  if os.path.exists(os.path.join(out, "train.json")):
    print(f"{out}/train.json exists: the set is not rebuilt (remove it to rebuild).")
  else:
    build(out, stamps_dir=args.stamps, num_train=args.num_train, num_val=args.num_val,
          val_fraction=args.val_fraction, seed=args.seed)
  if args.clip_steps:
    pretrain_clip(out, args.clip_steps)
  return 0


if __name__ == "__main__":
  sys.exit(main())
