"""Detection losses and the Hungarian matcher (vit_jax/losses.py) against independent references:
scipy's linear_sum_assignment, closed-form focal/GIoU values, and a numpy brute-force loss."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from vit_jax import losses


# --- references -------------------------------------------------------------------------------

def _scipy_total(cost_nm, mask):
  """Optimal total cost over the real boxes of one [n, m] matrix, in float64."""
  real = np.flatnonzero(mask)
  c = cost_nm[:, real].astype(np.float64)
  rows, cols = scipy.optimize.linear_sum_assignment(c.T)
  return c.T[rows, cols].sum()


def _check_matching(cost, mask, pred_index):
  """pred_index is a valid matching of every real box whose cost is scipy's optimum."""
  cost, mask, pred_index = np.asarray(cost), np.asarray(mask), np.asarray(pred_index)
  assert pred_index.shape == mask.shape and pred_index.dtype == np.int32
  for k in range(cost.shape[0]):
    real = np.flatnonzero(mask[k])
    assert np.all(pred_index[k][~mask[k]] == -1)
    chosen = pred_index[k][real]
    assert np.all((chosen >= 0) & (chosen < cost.shape[1]))
    assert len(set(chosen.tolist())) == len(chosen), "a prediction matched twice"
    total = cost[k][chosen, real].astype(np.float64).sum()
    np.testing.assert_allclose(total, _scipy_total(cost[k], mask[k]), rtol=1e-5, atol=1e-4)


def _random_costs(rng, batch, n, m):
  """A batch of [n, m] costs: gaussian, integer ties, all equal, and random box masks."""
  cost = rng.normal(size=(batch, n, m)).astype(np.float32)
  cost[batch // 4: batch // 2] = rng.integers(0, 3, size=(batch // 4, n, m))  # many ties
  cost[batch // 2] = 1.0  # all tied
  mask = np.ones((batch, m), bool)
  # Second half padded: random real boxes, including none and one.
  mask[batch // 2:] = rng.random((batch - batch // 2, m)) < rng.random((batch - batch // 2, 1))
  mask[-1], mask[-2] = False, np.eye(m, dtype=bool)[0]
  return cost, mask


def _np_focal(x, y, alpha, gamma):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  p = 1 / (1 + np.exp(-x))
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  p_t = y * p + (1 - y) * (1 - p)
  return bce * (1 - p_t) ** gamma * (alpha * y + (1 - alpha) * (1 - y))


def _np_giou(a, b):
  """GIoU of two cxcywh boxes, from its definition."""
  a = np.array([a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2])
  b = np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])
  inter = (max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1])))
  area = lambda z: (z[2] - z[0]) * (z[3] - z[1])
  union = area(a) + area(b) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull, inter / union


# --- matcher ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", losses.MATCHERS)
def test_matching_equals_scipy_optimum(method):
  rng = np.random.default_rng(0)
  match = jax.jit(lambda c, k: losses.hungarian_matching(c, k, method=method))
  # 160 square (10 x 10) and 160 rectangular (16 predictions x 8 boxes) matrices, half padded.
  for n, m in ((10, 10), (16, 8)):
    cost, mask = _random_costs(rng, 160, n, m)
    _check_matching(cost, mask, match(cost, mask))


def test_matching_sharded_jit_survives_nan():
  # As under the pjit backend: the batch sharded over a 2-device mesh ("data").
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:2]), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(1)
  cost, mask = _random_costs(rng, 16, 16, 8)
  cost[0, 3, 2] = np.nan
  cost[1, :, 0] = np.inf
  args = jax.device_put((cost, mask), sharded)
  for method in losses.MATCHERS:
    idx = np.asarray(jax.jit(lambda c, k, m=method: losses.hungarian_matching(c, k, method=m),
                             out_shardings=sharded)(*args))
    # Non-finite entries act as a cost above every finite one; the rest is optimal as usual.
    _check_matching(np.nan_to_num(cost, nan=1e3, posinf=1e3), mask, idx)


def test_matching_under_pmap():
  devices = jax.local_devices()[:2]
  rng = np.random.default_rng(2)
  cost, mask = _random_costs(rng, 8 * len(devices), 16, 8)
  for method in losses.MATCHERS:
    match = jax.pmap(lambda c, k, method=method: losses.hungarian_matching(c, k, method=method),
                     devices=devices)
    out = match(cost.reshape(len(devices), 8, 16, 8), mask.reshape(len(devices), 8, 8))
    _check_matching(cost, mask, np.asarray(out).reshape(-1, 8))


def test_matching_rejects_bad_shapes():
  with pytest.raises(ValueError, match="more boxes"):
    losses.hungarian_matching(jnp.zeros((1, 3, 4)), jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match="box_mask"):
    losses.hungarian_matching(jnp.zeros((1, 4, 3)), jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match="method"):
    losses.hungarian_matching(jnp.zeros((1, 4, 3)), jnp.ones((1, 3), bool), method="greedy")


# --- focal loss and cost ----------------------------------------------------------------------

def test_sigmoid_focal_loss_closed_form():
  x = jnp.array([0.0, math.log(3.0), 2.0, -1e6, -1e6])
  y = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0])
  got = np.asarray(jax.jit(losses.sigmoid_focal_loss)(x, y))  # alpha 0.25, gamma 2
  # p = 1/2, y = 1: log 2 * (1/2)^2 * 0.25;  p = 3/4, y = 0: log 4 * (3/4)^2 * 0.75;
  # p = sigmoid(2), y = 1: log(1 + e^-2) * (1 - sigmoid 2)^2 * 0.25; p = 0, y = 0: 0;
  # p = 0, y = 1: BCE = 1e6, modulator 1, alpha 0.25.
  s2 = 1 / (1 + math.exp(-2))
  want = [math.log(2) / 16, math.log(4) * 0.5625 * 0.75,
          math.log1p(math.exp(-2)) * (1 - s2) ** 2 * 0.25, 0.0, 0.25e6]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  bce = np.asarray(jax.jit(lambda x, y: losses.sigmoid_focal_loss(x, y, alpha=None, gamma=0.0))(
      x[:3], y[:3]))
  np.testing.assert_allclose(bce, [math.log(2), math.log(4), math.log1p(math.exp(-2))],
                             rtol=1e-6)
  grads = jax.jit(jax.grad(lambda x: losses.sigmoid_focal_loss(x, y).sum()))(x)
  assert np.all(np.isfinite(grads))


def test_cost_giou_closed_form():
  # Pairs in xyxy: identical, disjoint, nested, touching, overlapping -> known GIoU.
  pairs = [([0, 0, 1, 1], [0, 0, 1, 1], 1.0),
           ([0, 0, 1, 1], [2, 0, 3, 1], -1 / 3),  # hull 3, union 2
           ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),  # hull = outer box
           ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # hull = union
           ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7 - 2 / 9)]
  to_cxcywh = lambda b: [(b[0] + b[2]) / 8, (b[1] + b[3]) / 8, (b[2] - b[0]) / 4,
                         (b[3] - b[1]) / 4]  # scaled by 1/4 into [0, 1]; GIoU is scale-free
  pred = jnp.array([[to_cxcywh(a) for a, _, _ in pairs]])
  tgt = jnp.array([[to_cxcywh(b) for _, b, _ in pairs]])
  k = len(pairs)
  cost = jax.jit(lambda p, t: losses.detection_cost(
      jnp.zeros((1, k, 1)), p, jnp.zeros((1, k, 1)), t, jnp.ones((1, k), bool),
      class_weight=0.0, bbox_weight=0.0, giou_weight=1.0, focal_alpha=0.25,
      focal_gamma=2.0))(pred, tgt)
  np.testing.assert_allclose(-np.diag(np.asarray(cost[0])), [g for _, _, g in pairs], atol=1e-6)


def test_cost_matches_numpy_and_fills_padding():
  rng = np.random.default_rng(3)
  n, m, q = 5, 3, 4
  logits = rng.normal(size=(1, n, q)).astype(np.float32) * 3
  pred = np.concatenate([rng.uniform(0.3, 0.7, (1, n, 2)), rng.uniform(0.1, 0.4, (1, n, 2))], -1)
  tgt = np.concatenate([rng.uniform(0.3, 0.7, (1, m, 2)), rng.uniform(0.1, 0.4, (1, m, 2))], -1)
  labels = (rng.random((1, m, q)) < 0.5).astype(np.float32)
  mask = np.array([[True, True, False]])
  kw = dict(class_weight=2.0, bbox_weight=5.0, giou_weight=3.0, focal_alpha=0.3, focal_gamma=2.0)
  cost = np.asarray(jax.jit(lambda *a: losses.detection_cost(*a, **kw))(logits, pred, labels,
                                                                       tgt, mask))
  for i in range(n):
    for j in range(2):
      # pos - neg: the focal cost of calling each labelled query present rather than absent.
      cls = sum(_np_focal(logits[0, i, k], 1.0, 0.3, 2.0) - _np_focal(logits[0, i, k], 0.0, 0.3,
                                                                       2.0)
                for k in range(q) if labels[0, j, k])
      want = (2 * cls + 5 * np.abs(pred[0, i] - tgt[0, j]).sum()
              - 3 * _np_giou(pred[0, i], tgt[0, j])[0])
      np.testing.assert_allclose(cost[0, i, j], want, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(cost)) and np.all(cost[0, :, 2] > cost[0, :, :2].max())


# --- detection loss ---------------------------------------------------------------------------

def _example(rng, b, n, m, q, real_boxes, real_queries):
  """A random batch; image i has real_boxes[i] boxes and real_queries[i] queries."""
  box_mask = np.arange(m)[None] < np.array(real_boxes)[:, None]
  query_mask = np.arange(q)[None] < np.array(real_queries)[:, None]
  labels = (rng.random((b, m, q)) < 0.4).astype(np.float32)
  labels[:, :, 0] = 1.0  # every box answers query 0 at least
  labels *= box_mask[:, :, None] * query_mask[:, None, :]
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, m, 2)), rng.uniform(0.05, 0.3, (b, m, 2))],
                         -1) * box_mask[:, :, None]
  pred_boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, n, 2)),
                               rng.uniform(0.05, 0.3, (b, n, 2))], -1)
  logits = np.where(query_mask[:, None, :], rng.normal(size=(b, n, q)) * 2, -1e6)
  outputs = {"pred_logits": logits.astype(np.float32), "pred_boxes": pred_boxes.astype(np.float32)}
  targets = {"boxes": boxes.astype(np.float32), "labels": labels, "box_mask": box_mask,
             "query_mask": query_mask}
  return outputs, targets


def _np_loss(outputs, targets, alpha=0.3, gamma=2.0):
  """numpy reference of one image: brute-force optimal matching, then the loss terms (sums)."""
  logits, pred = outputs["pred_logits"][0].astype(np.float64), outputs["pred_boxes"][0]
  real = np.flatnonzero(targets["box_mask"][0])
  queries = np.flatnonzero(targets["query_mask"][0])
  labels, boxes = targets["labels"][0], targets["boxes"][0]

  def pair_cost(i, j):
    cls = sum(_np_focal(logits[i, k], 1, alpha, gamma) - _np_focal(logits[i, k], 0, alpha, gamma)
              for k in queries if labels[j, k])
    return cls + np.abs(pred[i] - boxes[j]).sum() - _np_giou(pred[i], boxes[j])[0]

  best = min(itertools.permutations(range(len(pred)), len(real)),
             key=lambda perm: sum(pair_cost(i, j) for i, j in zip(perm, real)))
  targets_cls = np.zeros((len(pred), len(queries)))
  for i, j in zip(best, real):
    targets_cls[i] = labels[j, queries]
  cls = _np_focal(logits[:, queries], targets_cls, alpha, gamma).sum()
  l1 = sum(np.abs(pred[i] - boxes[j]).sum() for i, j in zip(best, real))
  giou = sum(1 - _np_giou(pred[i], boxes[j])[0] for i, j in zip(best, real))
  iou = [_np_giou(pred[i], boxes[j])[1] for i, j in zip(best, real)]
  return dict(cls=cls, l1=l1, giou=giou, iou=iou, best=best)


def test_detection_loss_hand_case():
  # 5 predictions, 3 box slots (2 real), 3 query slots (2 real): the matched pairs are chosen by
  # brute force over all 60 assignments in numpy.
  rng = np.random.default_rng(4)
  outputs, targets = _example(rng, 1, 5, 3, 3, [2], [2])
  ref = _np_loss(outputs, targets)
  for matcher in losses.MATCHERS:
    loss, metrics = jax.jit(lambda o, t, matcher=matcher: losses.detection_loss(
        o, t, matcher=matcher, class_weight=2.0, bbox_weight=5.0, giou_weight=3.0,
        cost_class_weight=1.0, cost_bbox_weight=1.0, cost_giou_weight=1.0))(outputs, targets)
    np.testing.assert_allclose(metrics["loss_class"], ref["cls"] / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_bbox"], ref["l1"] / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_giou"], ref["giou"] / 2, rtol=1e-5)
    np.testing.assert_allclose(loss, (2 * ref["cls"] + 5 * ref["l1"] + 3 * ref["giou"]) / 2,
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["matched_iou"], np.mean(ref["iou"]), rtol=1e-5)
    assert float(metrics["num_boxes"]) == 2.0


def test_detection_loss_gradients_finite_and_blind_to_matching():
  rng = np.random.default_rng(5)
  outputs, targets = _example(rng, 3, 6, 4, 3, [4, 1, 0], [3, 2, 1])
  kw = dict(focal_alpha=0.3, focal_gamma=2.0)
  cost = jax.jit(lambda *a: losses.detection_cost(
      *a, class_weight=1.0, bbox_weight=1.0, giou_weight=1.0, **kw))(
          outputs["pred_logits"], outputs["pred_boxes"], targets["labels"], targets["boxes"],
          targets["box_mask"])
  fixed = np.asarray(jax.jit(losses.hungarian_matching, static_argnames="method")(
      cost, targets["box_mask"], method="scipy"))

  def grads(matcher):
    fn = lambda o: losses.detection_loss(o, targets, matcher=matcher, **kw)[0]
    return jax.jit(jax.grad(fn))(outputs)

  live, frozen = grads("jax"), grads(lambda c, k: fixed)
  for key in outputs:
    assert np.all(np.isfinite(live[key])), key
    # A matching held constant gives the same gradient: none flows through the matcher (the two
    # are different compiled programs: equal up to float32 rounding).
    np.testing.assert_allclose(live[key], frozen[key], rtol=1e-5, atol=1e-7)
  # Padding queries (-1e6 logits) get no gradient; the empty image still gets negatives.
  padding_query = np.broadcast_to(~targets["query_mask"][:, None, :], (3, 6, 3))
  assert np.all(np.asarray(live["pred_logits"])[padding_query] == 0)
  assert np.any(np.asarray(live["pred_logits"])[2] != 0)


def test_normalization_per_example_and_global():
  rng = np.random.default_rng(6)
  outputs, targets = _example(rng, 4, 6, 4, 3, [1, 3, 0, 4], [3, 3, 2, 1])
  # Each image alone, per_example: its sum / max(its boxes, 1).
  alone = jax.jit(lambda o, t: losses.detection_loss(o, t, matcher="scipy")[0])
  one = lambda d, i: {k: v[i:i + 1] for k, v in d.items()}
  per_image = np.array([alone(one(outputs, i), one(targets, i)) for i in range(4)], np.float64)
  counts = np.array([1, 3, 0, 4])
  both = jax.jit(lambda o, t: [losses.detection_loss(o, t, matcher="scipy", normalization=norm)[0]
                               for norm in losses.NORMALIZATIONS])
  per_example, global_ = both(outputs, targets)
  run = {"per_example": float(per_example), "global": float(global_)}.get
  np.testing.assert_allclose(run("per_example"), per_image.mean(), rtol=1e-5)
  sums = per_image * np.maximum(counts, 1)
  np.testing.assert_allclose(run("global"), sums.sum() / counts.sum(), rtol=1e-5)

  # Under pmap, global: the mean over devices of the per-device losses is the one-device value.
  pm = jax.pmap(lambda o, t: losses.detection_loss(o, t, matcher="scipy", normalization="global",
                                                   axis_name="batch")[0],
                axis_name="batch", devices=jax.local_devices()[:2])
  split = lambda d: {k: v.reshape((2, 2) + v.shape[1:]) for k, v in d.items()}
  np.testing.assert_allclose(np.mean(pm(split(outputs), split(targets))), run("global"),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="normalization"):
    losses.detection_loss(outputs, targets, normalization="per_box")


def test_detection_loss_rejects_bad_inputs():
  rng = np.random.default_rng(7)
  outputs, targets = _example(rng, 1, 4, 2, 2, [1], [2])
  with pytest.raises(KeyError, match="query_mask"):
    losses.detection_loss(outputs, {k: v for k, v in targets.items() if k != "query_mask"})
  bad = dict(targets, labels=targets["labels"][:, :, :1])
  with pytest.raises(ValueError, match=r"labels \(1, 2, 1\)"):
    losses.detection_loss(outputs, bad)
