"""Detection evaluation: top-k decoding, NMS, COCO mAP (pycocotools), per-query P/R/F1, PNGs.

Device side (jittable): `top_k_detections` turns the model's [batch, patches, classes] logits and
[batch, patches, 4] boxes into a fixed-size set of detections per image. Host side (numpy):
`postprocess` (threshold, class-wise NMS, cap), `to_coco_results` (the one place where model boxes
become COCO pixel boxes), `coco_metrics`, `per_query_report`, `draw_detections` /
`write_visualizations`, and `make_coco_evaluator`, which ties them into an `Evaluator`.

Box conventions (models/box_ops.py): the model predicts cxcywh in [0, 1] of the square input,
made by padding the image bottom/right to a square, so x and y are both scaled by max(h, w) to
reach pixels. COCO boxes are pixel (x, y, w, h) and appear only in results and ground truth.
"""
import contextlib
import csv
import io
import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import evaluation
from vit_jax.models import box_ops

COCO_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")

Detections = Dict[str, np.ndarray]  # {"scores" [k], "classes" int32 [k], "boxes" [k, 4] cxcywh}


# --- Device side -------------------------------------------------------------------------------


def top_k_detections(pred_logits, pred_boxes, k: int) -> Dict[str, jnp.ndarray]:
  """The k highest-scoring (patch, class) pairs of each image.

  A patch may appear several times with different classes: detectors scored by COCO AP are
  evaluated multi-label (each box keeps every class it scores well on), as OWL-ViT and DETR-style
  sigmoid detectors are. The score is OWL-ViT's class probability sigmoid(logit) alone; an OWLv2
  objectness logit is deliberately not multiplied in (OWL-ViT's published evaluation ranks by the
  class score; objectness is only used to pick query embeddings).

  pred_logits: [batch, patches, classes] (padding queries at -1e6 score ~0 and sink).
  pred_boxes: [batch, patches, 4] cxcywh in [0, 1].
  Returns {"scores" [batch, k] float32 in [0, 1], descending; "classes" int32 [batch, k];
  "boxes" [batch, k, 4] cxcywh, the box of the pair's patch}; k is capped at patches * classes
  (a small model at a small size may have fewer pairs than COCO's 100 detections).
  """
  b, n, c = pred_logits.shape
  k = min(k, n * c)
  if pred_boxes.shape != (b, n, 4):
    raise ValueError(f"top_k_detections: pred_boxes expected shape {(b, n, 4)} to match "
                     f"pred_logits {pred_logits.shape}; found {pred_boxes.shape}.")
  if k < 1:
    raise ValueError(f"top_k_detections: k={k}; expected k >= 1.")
  logits, index = jax.lax.top_k(pred_logits.astype(jnp.float32).reshape(b, n * c), k)
  patch, cls = index // c, index % c
  boxes = jnp.take_along_axis(pred_boxes.astype(jnp.float32), patch[..., None], axis=1)
  return {"scores": jax.nn.sigmoid(logits), "classes": cls.astype(jnp.int32), "boxes": boxes}


# --- Host-side geometry ------------------------------------------------------------------------
# box_ops is jnp: run eagerly, every new array shape compiles each primitive anew (~1 s per shape
# here), and host post-processing sees a different number of boxes per image. So box_ops runs
# jitted, on rows padded to a power of two: a handful of compilations per evaluation.

_JITTED = {f: jax.jit(f) for f in (box_ops.cxcywh_to_xyxy, box_ops.xywh_to_xyxy,
                                   box_ops.xyxy_to_xywh, box_ops.iou)}


def _bucket(n: int) -> int:
  return max(8, 1 << max(n - 1, 0).bit_length())


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


def _convert(fn, boxes) -> np.ndarray:
  """A box_ops format conversion on host boxes [..., 4] -> numpy float32 [..., 4]."""
  boxes = np.asarray(boxes, np.float32)
  flat = boxes.reshape(-1, 4)
  out = np.asarray(_JITTED[fn](_pad_rows(flat, _bucket(len(flat)))))[:len(flat)]
  return out.reshape(boxes.shape)


def _pairwise_iou(a_xyxy, b_xyxy) -> np.ndarray:
  """box_ops.iou of host boxes a [n, 4], b [m, 4] xyxy -> numpy [n, m]."""
  a = np.asarray(a_xyxy, np.float32).reshape(-1, 4)
  b = np.asarray(b_xyxy, np.float32).reshape(-1, 4)
  out = _JITTED[box_ops.iou](_pad_rows(a, _bucket(len(a))), _pad_rows(b, _bucket(len(b))))
  return np.asarray(out)[:len(a), :len(b)]


# --- Host side: post-processing and the COCO results format -----------------------------------


def _check_dets(dets: Mapping[str, Any], where: str) -> Tuple[np.ndarray, ...]:
  scores = np.asarray(dets["scores"], np.float32)
  classes = np.asarray(dets["classes"])
  boxes = np.asarray(dets["boxes"], np.float32)
  if classes.shape != scores.shape or boxes.shape != scores.shape + (4,):
    raise ValueError(f"{where}: expected scores [..., k], classes [..., k], boxes [..., k, 4]; "
                     f"found {scores.shape}, {classes.shape}, {boxes.shape}.")
  return scores, classes.astype(np.int64), boxes


def nms(boxes_cxcywh: np.ndarray, scores: np.ndarray, classes: np.ndarray,
        iou_threshold: float) -> np.ndarray:
  """Greedy class-wise non-maximum suppression of one image's detections.

  Visits detections by descending score (ties: lower index first); a detection is kept unless a
  kept detection of the SAME class overlaps it with IoU > iou_threshold.
  boxes_cxcywh [k, 4], scores [k], classes [k] -> int64 indices of the kept ones, by score.
  """
  order = np.argsort(-np.asarray(scores), kind="stable")
  if order.size == 0:
    return order.astype(np.int64)
  xyxy = _convert(box_ops.cxcywh_to_xyxy, boxes_cxcywh)
  overlap = _pairwise_iou(xyxy, xyxy) > iou_threshold  # [k, k]
  overlap &= np.asarray(classes)[:, None] == np.asarray(classes)[None, :]
  suppressed = np.zeros(order.size, bool)
  keep = []
  for i in order:
    if not suppressed[i]:
      keep.append(i)
      suppressed |= overlap[i]
  return np.asarray(keep, np.int64)


def postprocess(dets: Mapping[str, Any], *, score_threshold: float = 0.0,
                nms_iou: Optional[float] = None, max_detections: int = 100) -> List[Detections]:
  """Per image: drop scores < score_threshold, optional class-wise NMS, keep the best ones.

  dets: {"scores" [n, k], "classes" [n, k], "boxes" [n, k, 4]} (host arrays of
    `top_k_detections`, padding rows already dropped).
  nms_iou: None for no NMS (OWL-ViT's own evaluation uses none); else the IoU above which a
    lower-scored box of the same class is suppressed.
  max_detections: at most this many per image, by score (COCO's AP counts at most 100).
  Returns one {"scores" [m], "classes" int64 [m], "boxes" [m, 4] cxcywh} per image, by score.
  """
  scores, classes, boxes = _check_dets(dets, "postprocess")
  if scores.ndim != 2:
    raise ValueError(f"postprocess: expected scores [images, k]; found shape {scores.shape}.")
  out = []
  for s, c, b in zip(scores, classes, boxes):
    keep = np.flatnonzero(s >= score_threshold)
    if nms_iou is not None:
      keep = keep[nms(b[keep], s[keep], c[keep], nms_iou)]
    else:
      keep = keep[np.argsort(-s[keep], kind="stable")]
    keep = keep[:max_detections]
    out.append({"scores": s[keep], "classes": c[keep], "boxes": b[keep]})
  return out


def to_pixel_xywh(boxes_cxcywh: np.ndarray, height: int, width: int) -> np.ndarray:
  """[..., 4] cxcywh in [0, 1] of the bottom/right-padded square -> [..., 4] COCO pixel xywh,
  clipped to the image (a box reaching into the padding is cut at the image edge)."""
  xyxy = _convert(box_ops.cxcywh_to_xyxy, boxes_cxcywh).astype(np.float64) * max(height, width)
  xyxy = np.clip(xyxy, 0.0, [width, height, width, height])
  return _convert(box_ops.xyxy_to_xywh, xyxy).astype(np.float64)


def to_coco_results(dets: Union[Sequence[Detections], Mapping[str, Any]], image_ids,
                    orig_sizes, category_ids: Sequence[int]) -> List[Dict[str, Any]]:
  """Detections -> the COCO results format (json-serialisable python types).

  dets: `postprocess` output (one dict per image), or {"scores" [n, k], "classes", "boxes"}.
  image_ids: [n] COCO image ids; orig_sizes: [n, 2] (height, width) in pixels.
  category_ids: category index -> COCO category id.
  Returns [{"image_id", "category_id", "bbox": [x, y, w, h] pixels clipped to the image,
  "score"}]; a box entirely in the padding keeps a zero-size bbox and counts as a false positive.
  """
  if isinstance(dets, Mapping):
    scores, classes, boxes = _check_dets(dets, "to_coco_results")
    dets = [{"scores": s, "classes": c, "boxes": b} for s, c, b in zip(scores, classes, boxes)]
  image_ids = np.asarray(image_ids).reshape(-1)
  orig_sizes = np.asarray(orig_sizes)
  if len(dets) != image_ids.size or orig_sizes.shape != (image_ids.size, 2):
    raise ValueError(f"to_coco_results: {len(dets)} images of detections need image_ids "
                     f"[{len(dets)}] and orig_sizes [{len(dets)}, 2]; found {image_ids.shape}, "
                     f"{orig_sizes.shape}.")
  category_ids = [int(c) for c in category_ids]
  results = []
  for d, image_id, (h, w) in zip(dets, image_ids, orig_sizes):
    scores, classes, boxes = _check_dets(d, f"to_coco_results (image {int(image_id)})")
    if classes.size and (classes.min() < 0 or classes.max() >= len(category_ids)):
      raise ValueError(f"to_coco_results: image {int(image_id)} has class indices in "
                       f"[{classes.min()}, {classes.max()}]; category_ids has "
                       f"{len(category_ids)} entries.")
    xywh = to_pixel_xywh(boxes, int(h), int(w))
    for s, c, bb in zip(scores, classes, xywh):
      results.append({"image_id": int(image_id), "category_id": category_ids[int(c)],
                      "bbox": [float(v) for v in bb], "score": float(s)})
  return results


# --- Ground truth ------------------------------------------------------------------------------


def load_gt(gt):
  """A COCO json path, a COCO-format dict, or a pycocotools `COCO` -> an indexed `COCO`.

  Annotations need `image_id`, `category_id`, `bbox` (pixel xywh), `area` and `iscrowd`: COCO's
  small/medium/large split reads `area` (the segment's area, not the box's), so it is not guessed.
  """
  from pycocotools.coco import COCO  # lazy: only evaluation needs it
  if isinstance(gt, COCO):
    return gt
  where = "ground truth dict"
  if isinstance(gt, (str, os.PathLike)):
    where = os.fspath(gt)
    with open(gt) as f:
      gt = json.load(f)
  if not isinstance(gt, Mapping):
    raise TypeError(f"ground truth: expected a COCO json path, dict or pycocotools COCO; found "
                    f"{type(gt).__name__}.")
  for key in ("images", "annotations", "categories"):
    if key not in gt:
      raise ValueError(f"{where}: no {key!r} key (found {sorted(gt)}).")
  for i, ann in enumerate(gt["annotations"]):
    missing = [k for k in ("image_id", "category_id", "bbox", "area", "iscrowd") if k not in ann]
    if missing:
      raise ValueError(f"{where}: annotations[{i}] lacks {missing}.")
  coco = COCO()
  coco.dataset = dict(gt)
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _image_ids(coco, image_ids, results) -> List[int]:
  """The evaluated image ids (all of the json's when None), checked against the json/results."""
  known = set(coco.getImgIds())
  ids = sorted(known) if image_ids is None else [int(i) for i in np.asarray(image_ids).ravel()]
  if len(set(ids)) != len(ids):
    raise ValueError(f"image_ids: {len(ids) - len(set(ids))} duplicates among {len(ids)}.")
  unknown = sorted(set(ids) - known)
  if unknown:
    raise ValueError(f"image_ids: {len(unknown)} ids not in the ground truth json, e.g. "
                     f"{unknown[:5]}.")
  outside = sorted({int(r["image_id"]) for r in results} - set(ids))
  if outside:
    raise ValueError(f"results: detections for {len(outside)} images outside the evaluated ids, "
                     f"e.g. {outside[:5]}.")
  return ids


# --- COCO mAP ----------------------------------------------------------------------------------


def coco_metrics(gt, results: Sequence[Mapping[str, Any]], image_ids=None,
                 category_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
  """COCO box AP/AR through pycocotools' COCOeval, restricted to the evaluated images.

  gt: COCO json path, dict, or pycocotools COCO. results: `to_coco_results` output.
  image_ids: the evaluated images (a split may be a slice of the json); None: all of the json's.
  category_ids: the categories averaged over; None: all of the json's.
  Returns {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100"}
  in [0, 1]. A value is -1.0 where pycocotools finds it undefined: no ground-truth box in that
  area range (e.g. AP_small on a split without small objects). Categories without ground truth
  are left out of the means. No results at all gives 0 (not a crash) wherever ground truth exists.
  pycocotools' prints are swallowed so the training log stays readable.
  """
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  coco = load_gt(gt)
  ids = _image_ids(coco, image_ids, results)
  with contextlib.redirect_stdout(io.StringIO()):
    if results:
      for i, r in enumerate(results[:1]):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
        if missing:
          raise ValueError(f"results[{i}] lacks {missing}.")
      # loadRes writes area/id/segmentation into each dict: give it copies.
      dt = coco.loadRes([dict(r) for r in results])
    else:  # loadRes indexes results[0]; an empty results set is built directly
      dt = COCO()
      dt.dataset = {"images": list(coco.dataset["images"]), "annotations": [],
                    "categories": list(coco.dataset["categories"])}
      dt.createIndex()
    ev = COCOeval(coco, dt, iouType="bbox")
    ev.params.imgIds = ids
    if category_ids is not None:
      ev.params.catIds = sorted(int(c) for c in category_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {k: float(v) for k, v in zip(COCO_KEYS, ev.stats[:len(COCO_KEYS)])}


# --- Per-query precision / recall / F1 ----------------------------------------------------------


def _category_names(coco, category_names) -> Dict[int, str]:
  """{category_id: name} of the reported categories."""
  cats = sorted(coco.cats)
  if category_names is None:
    return {c: coco.cats[c].get("name", str(c)) for c in cats}
  if isinstance(category_names, Mapping):
    unknown = sorted(set(int(c) for c in category_names) - set(cats))
    if unknown:
      raise ValueError(f"category_names: ids {unknown} are not categories of the json.")
    return {int(c): str(n) for c, n in sorted(category_names.items())}
  names = list(category_names)
  if len(names) != len(cats):
    raise ValueError(f"category_names: {len(names)} names for the json's {len(cats)} categories "
                     f"(expected one per category, in id order, or a {{id: name}} mapping).")
  return dict(zip(cats, names))


def _safe_div(a: float, b: float) -> float:
  return a / b if b > 0 else float("nan")


def per_query_report(gt, results: Sequence[Mapping[str, Any]],
                     category_names: Union[None, Sequence[str], Mapping[int, str]], *,
                     score_threshold: float, iou_threshold: float = 0.5,
                     image_ids=None) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
  """Per category (= text query): TP / FP / FN, precision, recall, F1 at one score threshold.

  Detections with score >= score_threshold are matched per (image, category) greedily by
  descending score: each takes the unmatched non-crowd gt box of highest IoU, if that IoU >=
  iou_threshold (TP), one detection per gt box; unmatched gt boxes are FN. A detection left
  unmatched that overlaps a crowd box with IoU >= iou_threshold is ignored (neither TP nor FP),
  as COCO does (COCO measures crowd overlap as intersection / detection area; this uses plain IoU).

  gt, image_ids: as `coco_metrics`. category_names: names in the json's category-id order, or
    {category_id: name} (then only those categories are reported), or None (the json's names).
  Returns (rows, summary). rows: one dict per category: category_id, name, num_gt, num_det, tp,
  fp, fn, precision, recall, f1. Undefined values are NaN: precision without detections, recall
  without gt, F1 = 2tp / (2tp + fp + fn) without either. summary: the macro means "precision",
  "recall", "f1" (each over the categories where it is defined; NaN if none), the totals "tp",
  "fp", "fn", "num_categories", and the micro "precision_micro", "recall_micro", "f1_micro".
  """
  coco = load_gt(gt)
  names = _category_names(coco, category_names)
  ids = _image_ids(coco, image_ids, results)
  counts = {c: {"tp": 0, "fp": 0, "fn": 0, "num_gt": 0, "num_det": 0} for c in names}

  dets_by_image: Dict[int, List[Mapping[str, Any]]] = {i: [] for i in ids}
  for r in results:
    if int(r["category_id"]) in counts and float(r["score"]) >= score_threshold:
      dets_by_image[int(r["image_id"])].append(r)
  for image_id in ids:
    gts = [a for a in coco.imgToAnns.get(image_id, []) if int(a["category_id"]) in counts]
    dets = sorted(dets_by_image[image_id], key=lambda r: -float(r["score"]))  # stable
    if not gts and not dets:
      continue
    gt_xyxy = _convert(box_ops.xywh_to_xyxy, np.reshape([a["bbox"] for a in gts], (-1, 4)))
    dt_xyxy = _convert(box_ops.xywh_to_xyxy, np.reshape([r["bbox"] for r in dets], (-1, 4)))
    overlaps = _pairwise_iou(dt_xyxy, gt_xyxy)  # [dets, gts]
    gt_cat = np.asarray([int(a["category_id"]) for a in gts], np.int64)
    crowd = np.asarray([bool(a["iscrowd"]) for a in gts], bool)
    matched = np.zeros(len(gts), bool)
    for a in gts:
      if not a["iscrowd"]:
        counts[int(a["category_id"])]["num_gt"] += 1
    for d, r in enumerate(dets):
      c = counts[int(r["category_id"])]
      c["num_det"] += 1
      same = gt_cat == int(r["category_id"])
      ok = same & ~crowd & ~matched & (overlaps[d] >= iou_threshold)
      if ok.any():
        matched[np.flatnonzero(ok)[np.argmax(overlaps[d][ok])]] = True
        c["tp"] += 1
      elif (same & crowd & (overlaps[d] >= iou_threshold)).any():
        c["num_det"] -= 1  # on a crowd region: ignored
      else:
        c["fp"] += 1
  rows = []
  for cat, name in names.items():
    c = counts[cat]
    c["fn"] = c["num_gt"] - c["tp"]
    rows.append({"category_id": cat, "name": name, **c,
                 "precision": _safe_div(c["tp"], c["tp"] + c["fp"]),
                 "recall": _safe_div(c["tp"], c["num_gt"]),
                 "f1": _safe_div(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])})

  def macro(key):
    v = np.asarray([r[key] for r in rows], np.float64)
    return float(np.mean(v[~np.isnan(v)])) if np.any(~np.isnan(v)) else float("nan")

  tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
  summary = {"precision": macro("precision"), "recall": macro("recall"), "f1": macro("f1"),
             "tp": tp, "fp": fp, "fn": fn, "num_categories": len(rows),
             "precision_micro": _safe_div(tp, tp + fp), "recall_micro": _safe_div(tp, tp + fn),
             "f1_micro": _safe_div(2 * tp, 2 * tp + fp + fn)}
  return rows, summary


_REPORT_COLUMNS = ("category_id", "name", "num_gt", "num_det", "tp", "fp", "fn", "precision",
                   "recall", "f1")


def format_report(rows: Sequence[Mapping[str, Any]]) -> str:
  """A fixed-width text table of `per_query_report` rows (undefined values shown as '-')."""
  def cell(v):
    if isinstance(v, float):
      return "-" if math.isnan(v) else f"{v:.3f}"
    return str(v)
  table = [list(_REPORT_COLUMNS)] + [[cell(r[k]) for k in _REPORT_COLUMNS] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(_REPORT_COLUMNS))]
  lines = []
  for j, line in enumerate(table):
    # Names left-aligned, numbers right-aligned.
    lines.append("  ".join(v.ljust(w) if i == 1 else v.rjust(w)
                           for i, (v, w) in enumerate(zip(line, widths))))
    if j == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """`per_query_report` rows -> CSV with a header; undefined (NaN) values as empty cells."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(_REPORT_COLUMNS)
    for r in rows:
      writer.writerow(["" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]
                       for k in _REPORT_COLUMNS])


# --- Visualisation -----------------------------------------------------------------------------

PRED_COLOR = (255, 64, 32)
GT_COLOR = (32, 220, 64)


def _dashed_rectangle(draw, xyxy, color, width: int, dash: int):
  x0, y0, x1, y1 = xyxy
  for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True), (y0, y1, x0, False),
                                  (y0, y1, x1, False)):
    t = a
    while t < b:
      e = min(t + dash, b)
      draw.line([(t, fixed), (e, fixed)] if horizontal else [(fixed, t), (fixed, e)],
                fill=color, width=width)
      t += 2 * dash


def draw_detections(image: np.ndarray, boxes_xywh_pixels, labels: Sequence[str],
                    scores: Sequence[float], path: str, gt_boxes=None) -> str:
  """Writes a PNG of `image` with predicted boxes (solid, captioned "name 0.87") and optional
  ground-truth boxes (dashed, another colour).

  image: uint8 [height, width, 3]. boxes_xywh_pixels: [m, 4] COCO pixel boxes; labels, scores:
  [m]. gt_boxes: [g, 4] pixel xywh or None. Returns path.
  """
  from PIL import Image, ImageDraw  # lazy: only visualisation needs it
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"draw_detections: expected uint8 [height, width, 3]; found {image.dtype} "
                     f"{image.shape}.")
  boxes = np.asarray(boxes_xywh_pixels, np.float64).reshape(-1, 4)
  if not len(boxes) == len(labels) == len(scores):
    raise ValueError(f"draw_detections: {len(boxes)} boxes, {len(labels)} labels and "
                     f"{len(scores)} scores; expected one of each per box.")
  img = Image.fromarray(image)
  draw = ImageDraw.Draw(img)
  line = max(1, round(max(image.shape[:2]) / 300))
  if gt_boxes is not None:
    for b in _convert(box_ops.xywh_to_xyxy, np.reshape(gt_boxes, (-1, 4))):
      _dashed_rectangle(draw, [float(v) for v in b], GT_COLOR, line, dash=4 * line)
  xyxy = _convert(box_ops.xywh_to_xyxy, boxes)
  for b, label, score in zip(xyxy, labels, scores):
    x0, y0, x1, y1 = (float(v) for v in b)
    draw.rectangle([x0, y0, x1, y1], outline=PRED_COLOR, width=line)
    caption = f"{label} {float(score):.2f}"
    l, t, r, btm = draw.textbbox((0, 0), caption)
    ty = y0 - (btm - t) - 2 if y0 - (btm - t) - 2 >= 0 else y0  # above the box if it fits
    draw.rectangle([x0, ty, x0 + (r - l) + 2, ty + (btm - t) + 2], fill=PRED_COLOR)
    draw.text((x0 + 1 - l, ty + 1 - t), caption, fill=(255, 255, 255))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path, format="PNG")
  return path


def write_visualizations(results: Sequence[Mapping[str, Any]], gt, image_root: str, out_dir: str,
                         step: int, num_images: int = 4, score_threshold: float = 0.3, *,
                         image_ids=None,
                         category_names: Optional[Mapping[int, str]] = None) -> List[str]:
  """PNGs of the first `num_images` evaluated images: `out_dir/step_{step}/{image_id}.png`.

  Images are read from `image_root/<file_name from the gt json>`; detections with score >=
  score_threshold are drawn with their category names ({category_id: name}, default the json's),
  ground-truth boxes dashed. image_ids: the evaluated ids in split order (default: the json's
  image order). Returns the written paths.
  """
  from PIL import Image
  coco = load_gt(gt)
  ids = ([int(i) for i in np.asarray(image_ids).ravel()] if image_ids is not None
         else [int(im["id"]) for im in coco.dataset["images"]])[:num_images]
  names = dict(category_names or {c: v.get("name", str(c)) for c, v in coco.cats.items()})
  by_image: Dict[int, List[Mapping[str, Any]]] = {i: [] for i in ids}
  for r in results:
    if int(r["image_id"]) in by_image and float(r["score"]) >= score_threshold:
      by_image[int(r["image_id"])].append(r)
  paths = []
  for image_id in ids:
    if image_id not in coco.imgs:
      raise ValueError(f"write_visualizations: image id {image_id} is not in the gt json.")
    file = os.path.join(image_root, coco.imgs[image_id]["file_name"])
    if not os.path.exists(file):
      raise FileNotFoundError(f"write_visualizations: image {image_id}: {file} does not exist "
                              f"(image_root={image_root!r}).")
    with Image.open(file) as im:
      pixels = np.asarray(im.convert("RGB"))
    dets = sorted(by_image[image_id], key=lambda r: -float(r["score"]))
    gts = [a["bbox"] for a in coco.imgToAnns.get(image_id, [])]
    paths.append(draw_detections(
        pixels, [r["bbox"] for r in dets],
        [names.get(int(r["category_id"]), str(r["category_id"])) for r in dets],
        [r["score"] for r in dets], os.path.join(out_dir, f"step_{step}", f"{image_id}.png"),
        gt_boxes=gts))
  return paths


# --- The evaluator ------------------------------------------------------------------------------


def make_coco_evaluator(predict_fn: Callable, *, gt_json, image_root: Optional[str],
                        category_ids: Sequence[int], category_names: Sequence[str],
                        top_k: int = 100, score_threshold: float = 0.0,
                        nms_iou: Optional[float] = None, report_threshold: float = 0.3,
                        max_detections: int = 100, num_images: int = 4,
                        vis_threshold: Optional[float] = None) -> evaluation.Evaluator:
  """COCO box mAP and per-query P/R/F1 over an eval split, as a `reduce="gather"` Evaluator.

  predict_fn(params, aux, images [b, S, S, 3]) -> (pred_logits [b, n, C], pred_boxes [b, n, 4]
    cxcywh), C = len(category_ids), columns in category_ids' order.
  gt_json: the split's COCO json (path, dict or COCO); read once, at the first finalize.
  category_names: [C], the names used in the report and the PNGs.
  top_k: detections kept per image on device; score_threshold, nms_iou, max_detections: as
    `postprocess`; report_threshold: the score threshold of the per-query report.
  finalize(outputs) -> {"AP", ..., "AR100" (coco_metrics), "precision@t", "recall@t", "f1@t"
    (macro means at t = report_threshold), "num_examples": images evaluated}.
  The returned Evaluator's `write(outputs, step, workdir)` (train.evaluate calls it on process
  0) writes `workdir/eval_detection/step_{step}/{image_id}.png` for the first `num_images`
  images (needs image_root) and `.../step_{step}/per_query.csv` / `per_query.txt`; call it on one
  process only.
  """
  category_ids = [int(c) for c in category_ids]
  category_names = [str(n) for n in category_names]
  if len(category_ids) != len(category_names):
    raise ValueError(f"make_coco_evaluator: {len(category_ids)} category_ids but "
                     f"{len(category_names)} category_names.")
  names = dict(zip(category_ids, category_names))
  tag = f"{report_threshold:g}"
  cache = {}

  def coco():
    if "gt" not in cache:
      cache["gt"] = load_gt(gt_json)
      unknown = sorted(set(category_ids) - set(cache["gt"].cats))
      if unknown:
        raise ValueError(f"make_coco_evaluator: category_ids {unknown[:5]} are not categories "
                         f"of {gt_json if isinstance(gt_json, str) else 'the gt json'}.")
    return cache["gt"]

  def step(params, aux, batch):
    logits, boxes = predict_fn(params, aux, batch["image"])
    if logits.shape[-1] != len(category_ids):
      raise ValueError(f"predict_fn gave {logits.shape[-1]} classes; expected "
                       f"len(category_ids) = {len(category_ids)}.")
    return {**top_k_detections(logits, boxes, top_k), "image_id": batch["image_id"],
            "orig_size": batch["orig_size"], "_mask": batch["_mask"]}

  def results_of(outputs):
    """Gathered outputs -> (COCO results, evaluated image ids in split order)."""
    real = np.asarray(outputs["_mask"]).astype(bool)
    dets = postprocess({k: np.asarray(outputs[k])[real] for k in ("scores", "classes", "boxes")},
                       score_threshold=score_threshold, nms_iou=nms_iou,
                       max_detections=max_detections)
    ids = np.asarray(outputs["image_id"])[real].astype(np.int64)
    return to_coco_results(dets, ids, np.asarray(outputs["orig_size"])[real], category_ids), ids

  def report(outputs):
    """(results, ids, per-query rows, summary) of `outputs`; the last one is kept, so `write`
    after `finalize` on the same outputs (train.evaluate's order) does not redo them."""
    last = cache.get("last")
    if last is None or last[0] is not outputs:
      results, ids = results_of(outputs)
      rows, summary = per_query_report(coco(), results, names, score_threshold=report_threshold,
                                       image_ids=ids)
      cache["last"] = last = (outputs, results, ids, rows, summary)
    return last[1:]

  def finalize(outputs):
    results, ids, _, summary = report(outputs)
    metrics = coco_metrics(coco(), results, image_ids=ids, category_ids=category_ids)
    metrics.update({f"precision@{tag}": summary["precision"], f"recall@{tag}": summary["recall"],
                    f"f1@{tag}": summary["f1"], "num_examples": int(ids.size)})
    return metrics

  def write_artifacts(outputs, step_: int, workdir: str) -> List[str]:
    results, ids, rows, _ = report(outputs)
    out_dir = os.path.join(workdir, "eval_detection")
    csv_path = os.path.join(out_dir, f"step_{step_}", "per_query.csv")
    write_csv(rows, csv_path)
    txt_path = os.path.join(out_dir, f"step_{step_}", "per_query.txt")
    with open(txt_path, "w") as f:
      f.write(f"score >= {report_threshold:g}, IoU >= 0.5\n{format_report(rows)}\n")
    paths = [csv_path, txt_path]
    if image_root and num_images > 0:
      paths += write_visualizations(
          results, coco(), image_root, out_dir, step_, num_images=num_images,
          score_threshold=report_threshold if vis_threshold is None else vis_threshold,
          image_ids=ids, category_names=names)
    return paths

  ev = evaluation.Evaluator(step=step, finalize=finalize, reduce="gather", write=write_artifacts)
  return ev
