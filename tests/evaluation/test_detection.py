"""Detection evaluation: top-k and NMS against brute force, COCO mAP through pycocotools on
hand-built cases with AP computed by hand (101-point interpolation), per-query counts, PNGs, and
the evaluator end to end."""
import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.evaluation import detection

pytest.importorskip("pycocotools")

# --- A hand-built COCO split -------------------------------------------------------------------
# Image 10 is 640 wide x 480 high (padded square side 640), image 20 is 300 x 500 (side 500), so a
# conversion that scaled x by the width and y by the height would move the boxes. Image 30 lies
# outside the evaluated slice. Category ids are not contiguous on purpose.
CATEGORY_IDS = [1, 3, 7]
CAT_BOX_10 = [100, 100, 200, 100]  # pixel xywh
DOG_BOX_10 = [300, 200, 150, 120]
CAT_BOX_20 = [50, 300, 100, 150]
ZEBRA_BOX_20 = [10, 10, 200, 200]
CROWD_BOX_10 = [400, 300, 100, 100]
SIZES = {10: (480, 640), 20: (500, 300), 30: (100, 100)}  # (height, width)


def _gt():
  def ann(i, image_id, cat, box, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(box),
            "area": float(box[2] * box[3]), "iscrowd": crowd}
  return {
      "images": [{"id": i, "height": h, "width": w, "file_name": f"im{i}.png"}
                 for i, (h, w) in SIZES.items()],
      "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"},
                     {"id": 7, "name": "zebra"}],
      "annotations": [ann(1, 10, 1, CAT_BOX_10), ann(2, 10, 3, DOG_BOX_10),
                      ann(3, 20, 1, CAT_BOX_20), ann(4, 20, 7, ZEBRA_BOX_20),
                      ann(5, 10, 7, CROWD_BOX_10, crowd=1), ann(6, 30, 1, [0, 0, 50, 50])],
  }


def _normalised(box_xywh, image_id):
  """Pixel xywh -> cxcywh in [0, 1] of the bottom/right-padded square, by hand."""
  side = max(SIZES[image_id])
  x, y, w, h = box_xywh
  return [(x + w / 2) / side, (y + h / 2) / side, w / side, h / side]


def _ap_hand(precisions_at_recall):
  """COCO's 101-point interpolated AP from [(recall, precision)] in rank order."""
  rec = np.asarray([r for r, _ in precisions_at_recall])
  prec = np.asarray([p for _, p in precisions_at_recall])
  total = 0.0
  for t in np.linspace(0, 1, 101):
    ok = rec >= t - 1e-12
    total += prec[ok].max() if ok.any() else 0.0
  return total / 101


# Cat: ranks TP (img 10), FP (img 20), TP (img 20); dog: one TP; zebra: no detection.
AP_CAT = (51 + 50 * 2 / 3) / 101
AP_CAT_WITH_IMAGE_30 = (34 + 33 * 2 / 3) / 101  # image 30's cat box becomes a miss


def _hand_dets():
  """Batched top-k style detections: image 10, image 20; class indices into CATEGORY_IDS."""
  far = _normalised([150, 0, 100, 100], 20)  # no overlap with image 20's cat
  # A dog box reaching into image 20's padding (x 250..350 on a 300-wide image): clipped to 300.
  padding = _normalised([250, 400, 100, 50], 20)
  return {
      "scores": np.asarray([[0.9, 0.6, 0.0], [0.8, 0.7, 0.05]], np.float32),
      "classes": np.asarray([[0, 1, 2], [0, 0, 1]], np.int32),
      "boxes": np.asarray([[_normalised(CAT_BOX_10, 10), _normalised(DOG_BOX_10, 10), [.5] * 4],
                           [far, _normalised(CAT_BOX_20, 20), padding]], np.float32),
  }


def _hand_results():
  dets = detection.postprocess(_hand_dets(), score_threshold=0.01)
  return detection.to_coco_results(dets, [10, 20], [SIZES[10], SIZES[20]], CATEGORY_IDS)


# --- COCO mAP ----------------------------------------------------------------------------------


def test_hand_interpolation_matches_closed_form():
  assert _ap_hand([(0.5, 1.0), (0.5, 0.5), (1.0, 2 / 3)]) == pytest.approx(AP_CAT)
  assert _ap_hand([(1 / 3, 1.0), (1 / 3, 0.5), (2 / 3, 2 / 3)]) == pytest.approx(
      AP_CAT_WITH_IMAGE_30)


def test_to_coco_results_pixels():
  results = _hand_results()
  assert len(results) == 5  # the 0-score padding entry is gone
  json.dumps(results)  # plain python types
  by_score = {round(r["score"], 2): r for r in results}
  np.testing.assert_allclose(by_score[0.9]["bbox"], CAT_BOX_10, atol=1e-3)
  np.testing.assert_allclose(by_score[0.7]["bbox"], CAT_BOX_20, atol=1e-3)
  np.testing.assert_allclose(by_score[0.05]["bbox"], [250, 400, 50, 50], atol=1e-3)  # clipped
  assert [(r["image_id"], r["category_id"]) for r in results] == [
      (10, 1), (10, 3), (20, 1), (20, 1), (20, 3)]


def test_coco_metrics_hand_case():
  m = detection.coco_metrics(_gt(), _hand_results(), image_ids=[10, 20])
  ap = (AP_CAT + 1.0 + 0.0) / 3  # cat, dog (perfect), zebra (missed)
  # Every match is exact and every miss has IoU 0, so all IoU thresholds agree.
  for k in ("AP", "AP50", "AP75", "AP_large"):
    assert m[k] == pytest.approx(ap, abs=1e-6), k
  assert m["AP_small"] == m["AP_medium"] == -1.0  # no small/medium gt: undefined
  assert m["AR1"] == pytest.approx((0.5 + 1 + 0) / 3)  # image 20 keeps only its FP cat
  assert m["AR10"] == m["AR100"] == pytest.approx(2 / 3)
  # The whole json: image 30's cat box is a miss.
  m = detection.coco_metrics(_gt(), _hand_results())
  assert m["AP"] == pytest.approx((AP_CAT_WITH_IMAGE_30 + 1.0) / 3, abs=1e-6)


def test_coco_metrics_perfect_empty_and_iou_thresholds(tmp_path):
  gt = _gt()
  perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]
  path = tmp_path / "gt.json"
  path.write_text(json.dumps(gt))
  m = detection.coco_metrics(str(path), perfect)
  assert m["AP"] == m["AP50"] == m["AR1"] == m["AR100"] == pytest.approx(1.0)
  assert perfect[0].keys() == {"image_id", "category_id", "bbox", "score"}  # not mutated

  m = detection.coco_metrics(gt, [], image_ids=[10, 20])
  assert m["AP"] == m["AP50"] == m["AR100"] == 0.0 and m["AP_small"] == -1.0

  # One dog box at IoU 0.62: a hit at IoU thresholds 0.5, 0.55, 0.6 only.
  x, y, w, h = DOG_BOX_10
  m = detection.coco_metrics(gt, [{"image_id": 10, "category_id": 3, "bbox": [x, y, 0.62 * w, h],
                                   "score": 0.5}], image_ids=[10], category_ids=[3])
  assert (m["AP50"], m["AP75"]) == (pytest.approx(1.0), pytest.approx(0.0))
  assert m["AP"] == pytest.approx(0.3)


def test_coco_metrics_errors():
  with pytest.raises(ValueError, match=r"outside the evaluated ids.*\[30\]"):
    detection.coco_metrics(_gt(), [{"image_id": 30, "category_id": 1, "bbox": [0, 0, 1, 1],
                                     "score": 1.0}], image_ids=[10])
  with pytest.raises(ValueError, match=r"not in the ground truth json.*\[99\]"):
    detection.coco_metrics(_gt(), [], image_ids=[10, 99])
  bad = _gt()
  del bad["annotations"][2]["area"]
  with pytest.raises(ValueError, match=r"annotations\[2\] lacks \['area'\]"):
    detection.coco_metrics(bad, [])


# --- Device side: top-k ------------------------------------------------------------------------


def test_top_k_detections_brute_force():
  rng = np.random.RandomState(0)
  logits = rng.randn(3, 7, 5).astype(np.float32)
  boxes = rng.uniform(size=(3, 7, 4)).astype(np.float32)
  out = jax.jit(detection.top_k_detections, static_argnums=2)(jnp.asarray(logits),
                                                              jnp.asarray(boxes), 6)
  for i in range(3):
    pairs = sorted(((logits[i, p, c], p, c) for p in range(7) for c in range(5)), reverse=True)[:6]
    np.testing.assert_allclose(out["scores"][i], [1 / (1 + math.exp(-l)) for l, _, _ in pairs],
                               rtol=1e-6)
    np.testing.assert_array_equal(out["classes"][i], [c for _, _, c in pairs])
    np.testing.assert_array_equal(out["boxes"][i], boxes[i, [p for _, p, _ in pairs]])
  assert out["classes"].dtype == jnp.int32
  shapes = jax.eval_shape(lambda a, b: detection.top_k_detections(a, b, 100),
                          jax.ShapeDtypeStruct((2, 576, 80), jnp.bfloat16),
                          jax.ShapeDtypeStruct((2, 576, 4), jnp.float32))
  assert {k: v.shape for k, v in shapes.items()} == {"scores": (2, 100), "classes": (2, 100),
                                                     "boxes": (2, 100, 4)}
  assert detection.top_k_detections(logits, boxes, 36)["scores"].shape == (3, 35)  # capped
  with pytest.raises(ValueError, match="k=0"):
    detection.top_k_detections(logits, boxes, 0)


# --- NMS ---------------------------------------------------------------------------------------


def _iou_scalar(a, b):
  ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
  bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
  iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
  inter = iw * ih
  return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _nms_reference(boxes, scores, classes, thr):
  """Textbook NMS: take the best remaining box, drop its same-class overlaps, repeat."""
  remaining = list(range(len(scores)))
  keep = []
  while remaining:
    best = max(remaining, key=lambda i: (scores[i], -i))
    keep.append(best)
    remaining = [i for i in remaining if i != best and not (
        classes[i] == classes[best] and _iou_scalar(boxes[i], boxes[best]) > thr)]
  return keep


def test_nms_brute_force():
  rng = np.random.RandomState(1)
  for trial in range(5):
    k = 40
    centres = rng.uniform(0.4, 0.6, size=(k, 2))  # crowded, so suppression happens
    boxes = np.concatenate([centres, rng.uniform(0.1, 0.3, size=(k, 2))], -1).astype(np.float32)
    scores = rng.uniform(size=k).astype(np.float32)
    classes = rng.randint(0, 2, size=k)
    for thr in (0.3, 0.6):
      ref = _nms_reference(boxes.astype(np.float64), scores, classes, thr)
      got = detection.nms(boxes, scores, classes, thr)
      assert list(got) == ref, (trial, thr)
      assert 0 < len(ref) < k
  # postprocess: threshold, NMS and the cap, per batch row.
  dets = {"scores": np.stack([scores, scores[::-1]]), "classes": np.stack([classes, classes[::-1]]),
          "boxes": np.stack([boxes, boxes[::-1]])}
  out = detection.postprocess(dets, score_threshold=0.2, nms_iou=0.5, max_detections=5)
  for row, d in enumerate(out):
    s, c, b = (dets[k][row] for k in ("scores", "classes", "boxes"))
    idx = np.flatnonzero(s >= 0.2)
    ref = idx[_nms_reference(b[idx].astype(np.float64), s[idx], c[idx], 0.5)][:5]
    np.testing.assert_array_equal(d["scores"], s[ref])
    np.testing.assert_array_equal(d["classes"], c[ref])
    np.testing.assert_array_equal(d["boxes"], b[ref])
  assert len(detection.nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5)) == 0


# --- Per-query report --------------------------------------------------------------------------


def _r(image_id, cat, box, score):
  return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


def test_per_query_report_counts(tmp_path):
  x, y, w, h = DOG_BOX_10
  results = [
      _r(10, 1, CAT_BOX_10, 0.9),  # TP
      _r(20, 1, [150, 0, 100, 100], 0.8),  # FP: no overlap
      _r(20, 1, CAT_BOX_20, 0.7),  # TP
      _r(20, 1, CAT_BOX_20, 0.65),  # FP: its gt box is taken
      _r(20, 1, [0, 0, 5, 5], 0.4),  # below the threshold
      _r(10, 3, [x, y, 0.8 * w, h], 0.6),  # TP at IoU 0.8
      _r(10, 7, CROWD_BOX_10, 0.9),  # on a crowd region: ignored
  ]
  rows, summary = detection.per_query_report(_gt(), results, ["Cat", "Dog", "Zebra"],
                                             score_threshold=0.5, image_ids=[10, 20])
  got = {r["name"]: (r["num_gt"], r["num_det"], r["tp"], r["fp"], r["fn"]) for r in rows}
  assert got == {"Cat": (2, 4, 2, 2, 0), "Dog": (1, 1, 1, 0, 0), "Zebra": (1, 0, 0, 0, 1)}
  cat, dog, zebra = rows
  assert (cat["precision"], cat["recall"], cat["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
  assert (dog["precision"], dog["recall"], dog["f1"]) == (1.0, 1.0, 1.0)
  assert math.isnan(zebra["precision"]) and zebra["recall"] == 0.0 and zebra["f1"] == 0.0
  assert summary["precision"] == pytest.approx(0.75)  # over categories with detections
  assert summary["recall"] == pytest.approx(2 / 3)
  assert summary["f1"] == pytest.approx(5 / 9)
  assert (summary["tp"], summary["fp"], summary["fn"]) == (3, 2, 1)
  assert summary["precision_micro"] == pytest.approx(0.6)
  assert summary["recall_micro"] == pytest.approx(0.75)
  # At IoU 0.85 the dog box misses; a {id: name} mapping reports only those categories.
  rows, _ = detection.per_query_report(_gt(), results, {3: "dog"}, score_threshold=0.5,
                                       iou_threshold=0.85, image_ids=[10, 20])
  assert [(r["name"], r["tp"], r["fp"], r["fn"]) for r in rows] == [("dog", 0, 1, 1)]
  with pytest.raises(ValueError, match="2 names for the json's 3 categories"):
    detection.per_query_report(_gt(), results, ["a", "b"], score_threshold=0.5)

  rows, _ = detection.per_query_report(_gt(), results, None, score_threshold=0.5,
                                       image_ids=[10, 20])
  text = detection.format_report(rows)
  assert text.splitlines()[0].split() == list(detection._REPORT_COLUMNS)
  assert "zebra" in text and " - " in text  # undefined precision
  path = tmp_path / "r" / "per_query.csv"
  detection.write_csv(rows, str(path))
  with open(path) as f:
    read = list(csv.DictReader(f))
  assert [r["name"] for r in read] == ["cat", "dog", "zebra"]
  assert read[2]["precision"] == "" and float(read[0]["f1"]) == pytest.approx(2 / 3)


# --- PNGs --------------------------------------------------------------------------------------


def test_draw_detections(tmp_path):
  from PIL import Image
  image = np.zeros((120, 200, 3), np.uint8)
  path = detection.draw_detections(image, [[20, 30, 100, 60]], ["cat"], [0.87],
                                   str(tmp_path / "a" / "x.png"), gt_boxes=[[10, 10, 50, 50]])
  assert os.path.getsize(path) > 0
  with Image.open(path) as im:
    assert im.size == (200, 120) and im.format == "PNG"
    pixels = np.asarray(im.convert("RGB"))
  assert tuple(pixels[60, 120]) == detection.PRED_COLOR  # right edge of the prediction
  assert tuple(pixels[10, 11]) == detection.GT_COLOR  # first dash of the gt box's top edge
  assert tuple(pixels[100, 190]) == (0, 0, 0)
  with pytest.raises(ValueError, match="1 boxes, 2 labels"):
    detection.draw_detections(image, [[0, 0, 1, 1]], ["a", "b"], [1.0], str(tmp_path / "y.png"))


# --- The evaluator end to end ------------------------------------------------------------------


def _write_images(root):
  from PIL import Image
  for image_id, (h, w) in SIZES.items():
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(os.path.join(root, f"im{image_id}.png"))


def test_evaluator_end_to_end(tmp_path):
  n, c = 6, 3  # patches, classes
  # Per example (looked up by the image's first pixel): the exact gt boxes score high.
  logits = np.full((2, n, c), -8.0, np.float32)
  boxes = np.full((2, n, 4), 0.1, np.float32)
  logits[0, 0, 0], boxes[0, 0] = 4.0, _normalised(CAT_BOX_10, 10)
  logits[0, 1, 1], boxes[0, 1] = 3.0, _normalised(DOG_BOX_10, 10)
  logits[1, 2, 0], boxes[1, 2] = 2.0, _normalised(CAT_BOX_20, 20)
  logits[1, 3, 2], boxes[1, 3] = 1.0, _normalised(ZEBRA_BOX_20, 20)
  params = {"logits": jnp.asarray(logits), "boxes": jnp.asarray(boxes)}

  def predict_fn(params, aux, images):
    del aux
    row = images[:, 0, 0, 0].astype(jnp.int32)
    return params["logits"][row], params["boxes"][row]

  root = tmp_path / "images"
  root.mkdir()
  _write_images(str(root))
  ev = detection.make_coco_evaluator(
      predict_fn, gt_json=_gt(), image_root=str(root), category_ids=CATEGORY_IDS,
      category_names=["cat", "dog", "zebra"], top_k=5, score_threshold=0.0, nms_iou=0.7,
      report_threshold=0.5, num_images=2)
  assert ev.reduce == "gather"

  def batch(rows, ids, mask):
    images = np.zeros((len(rows), 8, 8, 3), np.float32)
    images[:, 0, 0, 0] = rows
    return {"image": jnp.asarray(images), "image_id": jnp.asarray(ids, jnp.int32),
            "orig_size": jnp.asarray([SIZES.get(i, (1, 1)) for i in ids], jnp.int32),
            "boxes": jnp.zeros((len(rows), 4, 4)), "box_classes": -jnp.ones((len(rows), 4)),
            "_mask": jnp.asarray(mask)}

  step = jax.jit(ev.step)
  outs = [jax.device_get(step(params, None, b))
          for b in (batch([0, 1], [10, 20], [True, True]), batch([1, 0], [20, 0], [False, False]))]
  outputs = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
  assert outputs["scores"].shape == (4, 5) and outputs["boxes"].shape == (4, 5, 4)
  metrics = ev.finalize(outputs)
  assert metrics["num_examples"] == 2
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
  # Above 0.5: cat 0.98, dog 0.95, cat 0.88, zebra 0.73 (sigmoid of 4, 3, 2, 1); all correct.
  assert metrics["precision@0.5"] == metrics["recall@0.5"] == metrics["f1@0.5"] == 1.0

  paths = ev.write(outputs, 7, str(tmp_path / "work"))
  out_dir = tmp_path / "work" / "eval_detection" / "step_7"
  assert sorted(os.listdir(out_dir)) == ["10.png", "20.png", "per_query.csv", "per_query.txt"]
  assert len(paths) == 4
  from PIL import Image
  with Image.open(out_dir / "20.png") as im:
    assert im.size == (300, 500)
