"""Predict for every task: on PNG files of real Fashion-MNIST test images a trained run predicts
exactly what its own evaluation counted (example by example), unreadable files are listed and
skipped, the CLIs work, int8 ONNX costs a bounded accuracy; CLIP zero-shot / retrieval and OWL-ViT
boxes equal closed-form computations from the model's own towers."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import TEST_XLA_FLAGS
from tests.input_pipeline import util
from vit_jax import predict
from vit_jax import train
from vit_jax.configs import clip as clip_config
from vit_jax.configs import owl_vit as owl_config
from vit_jax.configs import vit as vit_config
from vit_jax.demos import fashion_mnist_png
from vit_jax.input_pipeline import sources

N_TEST = 200
FMNIST = sources.DEFAULT_IDX_DIRS["fashion_mnist"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A nano ViT trained briefly on real Fashion-MNIST, evaluated on the first N_TEST test images;
  those images as PNG files in label folders, plus two unreadable files."""
  root = tmp_path_factory.mktemp("fmnist")
  c = vit_config.get_config("nano4,fashion_mnist")
  c.unlock()
  c.batch, c.batch_eval = 64, 40
  c.total_steps, c.warmup_steps, c.checkpoint_every_steps = 30, 5, 30
  c.log_every_steps, c.eval_split = 30, f"test[:{N_TEST}]"
  c.cache_train, c.shuffle_buffer, c.prefetch = False, 1000, 1
  c.lock()
  workdir = str(root / "run")
  metrics = train.train_and_evaluate(c, workdir)
  png = root / "png"
  fashion_mnist_png.write_pngs(str(png), "test", N_TEST)
  (png / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  (png / "5" / "notes.png").write_text("not an image")
  return workdir, str(png), metrics


def test_files_predict_what_the_evaluation_counted(run):
  workdir, png, metrics = run
  p = predict.Predictor.from_workdir(workdir, batch_size=48)  # 48: batches straddle the folders
  result = p.predict_files(predict.expand_images(os.path.join(png, "*", "*.png")),
                           progress=False)
  assert sorted(os.path.basename(f) for f, _ in result.skipped) == ["broken.png", "notes.png"]
  assert all(why for _, why in result.skipped)
  assert len(result.records) == N_TEST
  correct, counted = predict.folder_accuracy(result.records, p.task.class_names())
  assert counted == N_TEST
  assert correct == round(metrics["eval/accuracy"] * N_TEST)  # the run's own evaluation
  # Example by example, the files give what the eval pipeline's records give.
  data = p.predict_data(progress=False)
  by_file = {int(os.path.basename(r["file"])[:5]): r for r in result.records}
  assert [r["index"] for r in data.records] == list(range(N_TEST))
  for r in data.records:
    assert by_file[r["index"]]["class"] == r["class"], r["index"]
    np.testing.assert_allclose([t["score"] for t in by_file[r["index"]]["top_k"]],
                               [t["score"] for t in r["top_k"]], atol=1e-6)
  assert sum(r["class"] == r["label_true"] for r in data.records) == correct
  rec = result.records[0]
  assert rec["label"] == p.task.class_names()[rec["class"]]
  assert len(rec["top_k"]) == 5 and rec["top_k"][0]["index"] == rec["class"]
  scores = [t["score"] for t in rec["top_k"]]
  assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
  # Any checkpoint checkpoints_convert reads (here the run's own folder) gives the same model.
  q = predict.Predictor(p.config, checkpoint_path=os.path.join(workdir, "checkpoints"))
  again = q.predict_files([r["file"] for r in result.records[:7]], progress=False)
  assert [r["class"] for r in again.records] == [r["class"] for r in result.records[:7]]


def test_cli_predict_and_export_int8_accuracy(run, tmp_path):
  workdir, png, metrics = run
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, TF_CPP_MIN_LOG_LEVEL="3")  # compile-bound
  out = tmp_path / "preds.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "vit_jax.predict", f"--workdir={workdir}",
       f"--images={png}/*/*.png", f"--out={out}", "--top-k=3", "--noprogress"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(lines) == N_TEST and len(lines[0]["top_k"]) == 3
  correct = round(metrics["eval/accuracy"] * N_TEST)
  assert f"top-1 against the class folders: {correct / N_TEST:.2%}" in proc.stdout, proc.stdout
  assert "Skipped 2 unreadable file(s):" in proc.stdout and "broken.png" in proc.stdout
  assert "images/s" in proc.stdout
  # Export through the CLI, then the int8 model's accuracy on the same images.
  proc = subprocess.run(
      [sys.executable, "-m", "vit_jax.export", f"--workdir={workdir}", "--format=onnx",
       "--quantize=int8", f"--out={tmp_path / 'onnx'}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import onnxruntime as ort
  images, labels = sources.load_idx_split(FMNIST, "test")
  x = (images[:N_TEST].astype(np.float32) / 127.5 - 1.0)  # pp.test: value_range(-1, 1)
  acc = {}
  for name in ("classify", "classify.int8"):
    sess = ort.InferenceSession(str(tmp_path / "onnx" / f"{name}.onnx"))
    logits = sess.run(["logits"], {"images": x})[0]
    acc[name] = float(np.mean(np.argmax(logits, -1) == labels[:N_TEST]))
  assert acc["classify"] == pytest.approx(metrics["eval/accuracy"], abs=1e-9)
  assert abs(acc["classify.int8"] - acc["classify"]) <= 0.02, acc  # at most 4 of 200 images


def _rgb_files(root, n, size, seed=0):
  from PIL import Image
  rng = np.random.RandomState(seed)
  paths = []
  for i in range(n):
    h, w = size if i % 2 == 0 else (size[1], size[0])
    path = os.path.join(root, f"im{i}.png")
    Image.fromarray(rng.randint(0, 255, (h, w, 3), np.uint8)).save(path)
    paths.append(path)
  return paths


def _random_params(task, size):
  params = task.init_params(jax.random.PRNGKey(0), {"image": np.zeros((1, size, size, 3))})
  rng = np.random.RandomState(1)
  return jax.tree.map(lambda a: np.asarray(np.asarray(a) + 0.05 * rng.randn(*np.shape(a)),
                                           np.float32), params)


def test_clip_zero_shot_and_retrieval(tmp_path):
  c = clip_config.get_config("nano,fashion_mnist")
  c.unlock()
  c.model.image_size = 8
  c.model.image.patches.size = (4, 4)
  c.context_length = c.model.text.context_length = 16
  c.pp.test = "decode|resize(8)|value_range(-1,1)|onehot(10)"
  task = train.get_task(c)
  params = _random_params(task, 8)
  files = _rgb_files(str(tmp_path), 5, (8, 8))
  labels, templates = ["cat", "dog", "bus"], ("a photo of a {}.", "a {}.")
  p = predict.Predictor(c, params, labels=labels, templates=templates, top_k=2)
  out = p.predict_files(files, progress=False)
  # Closed form from the towers: prompt-ensembled class embeddings, CLIP's scaled softmax.
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  from vit_jax.input_pipeline import pipeline  # the same preprocessed pixels
  batch = next(pipeline.make_file_dataset(c, files, 8).as_numpy_iterator())
  img = unit(np.asarray(task.encode_image(params, batch["image"])))
  txt = np.stack([unit(unit(np.asarray(task.encode_text(
      params, task.tokenizer.encode([t.format(l) for t in templates])))).mean(0))
                  for l in labels])
  probs = jax.nn.softmax(task.logit_scale(params) * img @ txt.T, axis=-1)
  for rec, row in zip(out.records, np.asarray(probs)):
    assert rec["class"] == int(np.argmax(row)) and rec["label"] == labels[rec["class"]]
    np.testing.assert_allclose([t["score"] for t in rec["top_k"]], np.sort(row)[::-1][:2],
                               atol=1e-5)
  texts = ["a red bus", "a small dog", "a cat on a mat", "shoes"]
  r = predict.Predictor(c, params, texts=texts, top_k=4).predict_files(files, progress=False)
  sims = img @ unit(np.asarray(task.encode_text(params, task.tokenizer.encode(texts)))).T
  for rec, row in zip(r.records, sims):
    assert [t["label"] for t in rec["top_k"]] == [texts[i] for i in np.argsort(-row)]
    np.testing.assert_allclose([t["score"] for t in rec["top_k"]], np.sort(row)[::-1], atol=1e-5)
  # No labels: the run's own zero-shot classes (Fashion-MNIST's); labels and texts: refused.
  default = predict.Predictor(c, params, templates=templates).predict_files(files[:1],
                                                                            progress=False)
  assert len(default.records[0]["top_k"]) == 5 and default.records[0]["label"] in (
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
      "Ankle boot")
  with pytest.raises(ValueError, match="either labels"):
    predict.Predictor(c, params, labels=labels, texts=texts).predict_files(files[:1],
                                                                           progress=False)


def test_owl_vit_text_and_image_queries(tmp_path):
  train_json = util.write_coco(tmp_path, [(1, 32, 24)], [(1, 1, 3, [1.0, 2.0, 10.0, 8.0])],
                               categories=((3, "cat"),), name="train.json")
  c = owl_config.get_config(f"nano,{train_json}")
  task = train.get_task(c)
  size = c.model.image_size
  params = _random_params(task, size)
  files = _rgb_files(str(tmp_path), 3, (size + 8, size - 4))  # non-square: padded, resized
  queries = ["a cat", "a bus"]
  p = predict.Predictor(c, params, queries=queries, threshold=0.0, top_k=5)
  out = p.predict_files(files, draw_dir=str(tmp_path / "png"), progress=False)
  # Closed form: the model on the same pixels, sigmoid of the best (patch, query) logits, boxes
  # scaled by the longer side of each file (pad bottom/right to a square, then resize).
  from vit_jax.input_pipeline import pipeline
  batch = next(pipeline.make_file_dataset(c, files, 8).as_numpy_iterator())
  emb = jax.numpy.asarray(task.query_embeddings(params, queries)[0])
  logits, boxes = (np.asarray(a) for a in task.predict(params, emb, batch["image"]))
  for rec, lg, bx, (h, w) in zip(out.records, logits, boxes, batch["orig_size"]):
    flat = lg.reshape(-1)
    best = np.argsort(-flat, kind="stable")[:5]
    dets = rec["detections"]
    assert len(dets) == 5
    np.testing.assert_allclose([d["score"] for d in dets], 1 / (1 + np.exp(-flat[best])),
                               atol=1e-5)
    assert [d["label"] for d in dets] == [queries[i % 2] for i in best]
    cx, cy, bw, bh = bx[best // 2].T * max(h, w)
    x0, y0 = np.clip(cx - bw / 2, 0, w), np.clip(cy - bh / 2, 0, h)
    x1, y1 = np.clip(cx + bw / 2, 0, w), np.clip(cy + bh / 2, 0, h)
    np.testing.assert_allclose([d["box"] for d in dets], np.stack([x0, y0, x1 - x0, y1 - y0], 1),
                               atol=0.02)
    assert os.path.getsize(rec["png"]) > 0
  # Our own OWL-ViT tree as a checkpoint file (as a run's checkpoints/ folder reads): same boxes.
  from vit_jax.checkpoints_convert import common
  np.savez(tmp_path / "ours.npz", **common.flatten(params))
  again = predict.Predictor(c, checkpoint_path=str(tmp_path / "ours.npz"), queries=queries,
                            threshold=0.0, top_k=5).predict_files(files[:1], progress=False)
  assert again.records[0]["detections"] == out.records[0]["detections"]
  # One-shot: a query image and a box in its pixels.
  one = predict.Predictor(c, params, query_image=files[0], query_box=[2, 3, 8, 10],
                          threshold=0.0, top_k=3).predict_files(files, progress=False)
  assert all(len(r["detections"]) == 3 and r["detections"][0]["label"] == "query"
             for r in one.records)
  with pytest.raises(ValueError, match="inside the"):
    predict.Predictor(c, params, query_image=files[0], query_box=[0, 0, 500, 5]).predict_files(
        files[:1], progress=False)


def test_class_names_from_folders_and_listings(tmp_path):
  for name in ("zebra", "apple", "mango"):
    (tmp_path / "folder" / "train" / name).mkdir(parents=True)
  (tmp_path / "folder" / "val" / "kiwi").mkdir(parents=True)
  folder = util.make_config(str(tmp_path / "folder"), data_source="folder")
  assert sources.class_names(folder) == ["apple", "kiwi", "mango", "zebra"]  # class ids' order
  (tmp_path / "csv").mkdir()
  (tmp_path / "csv" / "train.csv").write_text("path,label\na.png,dog\nb.png,cat\n")
  (tmp_path / "csv" / "test.csv").write_text("path,label\nc.png,bird\n")
  assert sources.class_names(util.make_config(str(tmp_path / "csv"), data_source="csv")) == [
      "bird", "cat", "dog"]
  (tmp_path / "ids").mkdir()
  (tmp_path / "ids" / "train.csv").write_text("path,label\na.png,0\nb.png,1\n")
  assert sources.class_names(util.make_config(str(tmp_path / "ids"), data_source="csv")) is None
  fmnist = util.make_config(None, dataset="fashion_mnist")
  assert sources.class_names(fmnist)[7] == "Sneaker"
