"""int8 vs fp32: size, CPU latency, images/s and accuracy of a trained run's ONNX export.

    python benchmarks/quantize.py --workdir ~/fmnist_qs                 # ViT: top-1 on pp.test
    python benchmarks/quantize.py --workdir ~/clip_fmnist               # CLIP: zero-shot top-1
    python benchmarks/quantize.py --workdir DIR --limit 2000 --batch 64 --repeats 20

Exports the run's latest checkpoint with `vit_jax.export` (ONNX through jax2onnx, and
onnxruntime's dynamic int8 quantization of it), then on this machine's CPU, in this process:
  - size of each .onnx file;
  - latency of one image (median of --repeats calls) and images/s at --batch, for onnxruntime
    fp32, onnxruntime int8 and, as the reference, the JAX model (jitted, XLA:CPU);
  - accuracy on the run's eval split (config.eval_split, through the eval pipeline): top-1 of
    the classifier, or CLIP's zero-shot top-1 over config.zeroshot's class names and templates
    (class embeddings from the same model's text encoder: fp32 with fp32, int8 with int8).
Nothing here is a test; the README's int8 table is this script's output.
"""
import argparse
import os
import tempfile
import time

import numpy as np


def _timed(fn, repeats):
  fn()  # warm-up (and compile, for JAX)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _eval_images(config, limit):
  from vit_jax import input_pipeline
  data = input_pipeline.make_eval_data(config)
  images, labels = [], []
  for batch in data:
    mask = batch["_mask"]
    images.append(batch["image"][mask])
    labels.append(np.argmax(batch["labels"][mask], -1) if "labels" in batch
                  else batch["label"][mask])
    if limit and sum(len(i) for i in images) >= limit:
      break
  images, labels = np.concatenate(images), np.concatenate(labels)
  return (images[:limit], labels[:limit]) if limit else (images, labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None, help="Export folder (default: a temporary one).")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--limit", type=int, default=0, help="Eval images (0: the whole split).")
  parser.add_argument("--ort-threads", type=int, default=0,
                      help="onnxruntime intra-op threads (0: its default, one per core).")
  args = parser.parse_args()

  import jax
  import onnxruntime as ort
  from vit_jax import configs
  from vit_jax import export
  from vit_jax import predict
  from vit_jax import train

  workdir = os.path.expanduser(args.workdir)
  config = configs.load_run_config(workdir)
  params = predict.restore_params(workdir)
  task = train.get_task(config)
  out = args.out or tempfile.mkdtemp(prefix="quantize_")
  files = export.export(config, params, "onnx", out, quantize="int8")
  fns = task.export_functions(jax.tree.map(np.asarray, params))
  image_fn = "classify" if "classify" in fns else "encode_image"
  images, labels = _eval_images(config, args.limit)
  print(f"{config.task}, {len(images)} eval images {images.shape[1:]}, batch {args.batch}, "
        f"{jax.device_count()} XLA device(s), onnxruntime {ort.__version__} "
        f"({args.ort_threads or 'default'} threads)")

  jax_image = jax.jit(fns[image_fn].fn)
  options = ort.SessionOptions()
  options.intra_op_num_threads = args.ort_threads
  session = lambda path: ort.InferenceSession(path, options)
  sessions = {kind: session(files[image_fn + suffix])
              for kind, suffix in (("fp32", ""), ("int8", ".int8"))}
  out_key = "logits" if image_fn == "classify" else "embeddings"
  runners = {"jax fp32": lambda x: np.asarray(jax_image(x)[out_key])}
  for kind, sess in sessions.items():
    runners[f"onnx {kind}"] = (lambda s: lambda x: s.run([out_key], {"images": x})[0])(sess)

  text_runners = {}
  if image_fn == "encode_image":  # CLIP: zero-shot class embeddings from the text encoder
    from vit_jax.evaluation import prompts
    names, templates = task.classnames(), prompts.get_templates(config.zeroshot.templates)
    tokens = task.tokenizer.encode([t.format(n) for n in names for t in templates])
    jax_text = jax.jit(fns["encode_text"].fn)
    text_runners["jax fp32"] = lambda t: np.asarray(jax_text(t)["embeddings"])
    for kind in ("fp32", "int8"):
      s = session(files["encode_text" + ("" if kind == "fp32" else ".int8")])
      text_runners[f"onnx {kind}"] = (lambda s: lambda t: s.run(["embeddings"],
                                                                 {"tokens": t})[0])(s)

  rows = []
  for name, run in runners.items():
    outs = np.concatenate([run(images[i:i + args.batch])
                           for i in range(0, len(images), args.batch)])
    if text_runners:
      z = text_runners[name](tokens).reshape(len(names), len(templates), -1)
      z = z / np.linalg.norm(z, axis=-1, keepdims=True)
      classes = z.mean(1)
      classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
      outs = outs @ classes.T
    acc = float(np.mean(np.argmax(outs, -1) == labels))
    one = _timed(lambda: run(images[:1]), args.repeats)
    full = images[:args.batch] if len(images) >= args.batch else np.resize(
        images, (args.batch,) + images.shape[1:])
    batch_s = _timed(lambda: run(full), max(3, args.repeats // 4))
    size = None
    if name.startswith("onnx"):
      suffix = "" if name.endswith("fp32") else ".int8"
      size = sum(os.path.getsize(files[f + suffix]) for f in fns)
    rows.append((name, size, one * 1e3, args.batch / batch_s, acc))

  base = {r[0]: r for r in rows}["onnx fp32"]
  print(f"{'model':<10} {'size MiB':>9} {'x fp32':>7} {'1 image ms':>11} {'images/s':>9} "
        f"{'speed x fp32':>13} {'top-1':>8} {'change':>8}")
  for name, size, ms, ips, acc in rows:
    size_s = f"{size / 2**20:9.2f} {size / base[1]:7.2f}" if size else f"{'-':>9} {'-':>7}"
    print(f"{name:<10} {size_s} {ms:11.2f} {ips:9.1f} {ips / base[3]:13.2f} {acc:8.2%} "
          f"{(acc - base[4]) * 100:+7.2f}pt")
  print(f"exports in {out}")


if __name__ == "__main__":
  main()
