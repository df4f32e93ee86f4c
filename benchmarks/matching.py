"""Per-step cost of OWL-ViT's Hungarian matching, both methods of `losses.hungarian_matching`.

    python benchmarks/matching.py                      # the full grid, 3 repeats
    python benchmarks/matching.py --batch 8 --preds 576 --boxes 50 --repeats 5

For each (batch b, predictions n, real boxes m) it times, compiled and after a warm-up call:
`cost`, the matching cost alone (`detection_cost`), `match`, the matching alone on that cost
(`hungarian_matching`), `cost+match`, both in one compiled function, and
`loss+grad`, the gradient of `detection_loss` w.r.t. the model's outputs (cost, matching, focal
loss over b x n x queries, box losses, backward).
A real train step adds the backbone's forward and backward, so the share of a whole step is
smaller. Targets are padded to --pad-to instances (configs' num_instances), m of them real.
--inputs random: predictions uniform over the image (an untrained head: few conflicts);
--inputs trained: every prediction is a jittered copy of a real box with a confident logit for
its label (a trained head: many predictions compete for each box, the matcher's harder case).
`share` is match / loss+grad. The last column, `gap`, is the summed matched cost of the method
minus that of the first method (both optimal: ~0).
"""
import argparse
import time

import jax
import numpy as np

from vit_jax import losses


def make_batch(rng, b, n, m, pad_to, q, inputs):
  """Numpy outputs and targets dicts: b images, n predictions, m real boxes of pad_to slots."""
  def boxes(shape):
    return np.concatenate([rng.uniform(0.1, 0.9, shape + (2,)),
                           rng.uniform(0.02, 0.3, shape + (2,))], -1).astype(np.float32)

  tgt = boxes((b, pad_to))
  box_mask = np.arange(pad_to)[None] < m
  tgt *= box_mask[..., None]
  labels = np.zeros((b, pad_to, q), np.float32)
  labels[np.arange(b)[:, None], np.arange(pad_to)[None], rng.integers(0, q, (b, pad_to))] = 1.0
  labels *= box_mask[..., None]
  logits = rng.normal(-4.6, 1.0, (b, n, q)).astype(np.float32)  # prior 0.01, as at init
  pred = boxes((b, n))
  if inputs == "trained":
    owner = rng.integers(0, m, (b, n))  # the real box each prediction sits on
    pred = np.take_along_axis(tgt, owner[..., None], 1)
    pred = (pred + rng.normal(0, 0.02, pred.shape)).clip(0.01, 0.99).astype(np.float32)
    logits += 6.0 * np.take_along_axis(labels, owner[..., None], 1)
  outputs = {"pred_logits": logits, "pred_boxes": pred}
  targets = {"boxes": tgt, "labels": labels, "box_mask": np.broadcast_to(box_mask, (b, pad_to)),
             "query_mask": np.ones((b, q), bool)}
  return outputs, targets


def timeit(fn, args, repeats):
  """Best wall time (ms) of a compiled call, after one warm-up (compile) call: the minimum, as
  the least disturbed by other processes on a shared machine."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
  ap.add_argument("--preds", type=int, nargs="+", default=[144, 576, 2304])
  ap.add_argument("--boxes", type=int, nargs="+", default=[10, 50, 100])
  ap.add_argument("--pad-to", type=int, default=100)
  ap.add_argument("--queries", type=int, default=100)
  ap.add_argument("--methods", nargs="+", default=list(losses.MATCHERS))
  ap.add_argument("--inputs", choices=["random", "trained"], default="random")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-grad", action="store_true", help="time the matching alone")
  args = ap.parse_args()
  kw = dict(focal_alpha=0.3, focal_gamma=2.0)
  print(f"backend {jax.default_backend()}, {args.inputs} inputs, {args.queries} queries, "
        f"targets padded to {args.pad_to}; best of {args.repeats}, ms")
  print(f"{'b':>4}{'n':>6}{'m':>5}  {'method':<7}{'cost':>8}{'match':>8}{'cost+match':>12}"
        f"{'loss+grad':>11}{'share':>7}{'gap':>10}")
  rng = np.random.default_rng(0)
  for b in args.batch:
    for n in args.preds:
      for m in args.boxes:
        outputs, targets = make_batch(rng, b, n, m, max(args.pad_to, m), args.queries,
                                      args.inputs)
        @jax.jit
        def cost_fn(o, t):
          return losses.detection_cost(o["pred_logits"], o["pred_boxes"], t["labels"], t["boxes"],
                                       t["box_mask"], class_weight=1.0, bbox_weight=1.0,
                                       giou_weight=1.0, **kw)

        t_cost = timeit(cost_fn, (outputs, targets), args.repeats)
        cost32 = cost_fn(outputs, targets)
        cost = np.asarray(cost32, np.float64)
        first_total = None
        for method in args.methods:
          @jax.jit
          def match(o, t, method=method):
            return losses.hungarian_matching(cost_fn(o, t), t["box_mask"], method=method)

          grad = jax.jit(jax.grad(
              lambda o, t, method=method: losses.detection_loss(o, t, matcher=method, **kw)[0]))
          match_only = jax.jit(lambda c, k, method=method: losses.hungarian_matching(
              c, k, method=method))
          t_only = timeit(match_only, (cost32, targets["box_mask"]), args.repeats)
          t_match = timeit(match, (outputs, targets), args.repeats)
          index = np.asarray(match(outputs, targets))
          real = targets["box_mask"]
          total = np.take_along_axis(cost, np.maximum(index, 0)[:, :, None], 1)[..., 0][real].sum()
          first_total = total if first_total is None else first_total
          line = f"{b:>4}{n:>6}{m:>5}  {method:<7}{t_cost:>8.2f}{t_only:>8.2f}{t_match:>12.2f}"
          if args.no_grad:
            line += f"{'-':>11}{'-':>7}"
          else:
            t_grad = timeit(grad, (outputs, targets), args.repeats)
            line += f"{t_grad:>11.2f}{t_only / t_grad:>7.0%}"
          print(line + f"{total - first_total:>10.1e}", flush=True)


if __name__ == "__main__":
  main()
