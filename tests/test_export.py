"""Exports of every task, each loaded back by its own runtime: onnxruntime (fp32 and int8),
`tf.saved_model.load`, `jax.export.deserialize`, transformers; outputs equal the JAX model's
within 1e-4 on batch sizes the export never saw (the batch, and OWL-ViT's queries, are dynamic)."""
import os

import jax
import numpy as np
import pytest

from tests.input_pipeline import util
from vit_jax import export
from vit_jax import train
from vit_jax.configs import clip as clip_config
from vit_jax.configs import owl_vit as owl_config
from vit_jax.configs import vit as vit_config

TOL = 1e-4


def _params(task, image_shape, seed=0):
  """Random params, perturbed away from the zero / identity inits (a zero head would hide a
  wrong export)."""
  params = task.init_params(jax.random.PRNGKey(seed), {"image": np.zeros((1,) + image_shape,
                                                                         np.float32)})
  rng = np.random.RandomState(seed + 1)
  return jax.tree.map(lambda a: np.asarray(np.asarray(a) + 0.05 * rng.randn(*np.shape(a)),
                                           np.float32), params)


def _inputs(fn, batch, queries=3, tokens=None, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for _, shape, dtype in fn.inputs:
    shape = tuple(batch if d == "batch" else queries if d == "queries" else d for d in shape)
    if np.dtype(dtype) == np.float32:
      out.append(rng.uniform(-1, 1, shape).astype(np.float32))
    else:
      out.append(tokens[:shape[0]] if tokens is not None else
                 rng.randint(1, 400, shape).astype(np.int32))
  return out


def _check_formats(config, params, tmp_path, *, batches=(3, 1), tokens=None):
  """Exports onnx (+int8), savedmodel and stablehlo; runs each with its runtime; returns the
  JAX outputs {function: {output: array}} of the first batch size, and the int8 outputs."""
  import onnxruntime as ort
  import tensorflow as tf
  task = train.get_task(config)
  fns = task.export_functions(jax.tree.map(np.asarray, params))
  onnx_files = export.export(config, params, "onnx", str(tmp_path / "onnx"), quantize="int8")
  saved = export.export(config, params, "savedmodel", str(tmp_path / "sm"))["savedmodel"]
  hlo = export.export(config, params, "stablehlo", str(tmp_path / "hlo"))
  loaded = tf.saved_model.load(saved)
  refs, int8 = {}, {}
  for name, fn in fns.items():
    assert os.path.getsize(os.path.join(tmp_path, "onnx", f"{name}.txt")) > 0  # the input doc
    for b in batches:
      xs = _inputs(fn, b, queries=b + 1, tokens=tokens, seed=b)
      ref = {k: np.asarray(v) for k, v in jax.jit(fn.fn)(*xs).items()}
      refs.setdefault(name, ref)
      sess = ort.InferenceSession(onnx_files[name])
      feed = {i.name: x for i, x in zip(sess.get_inputs(), xs)}
      got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
      tf_got = loaded.signatures[name](**{n: tf.constant(x) for (n, _, _), x in
                                          zip(fn.inputs, xs)})
      hlo_got = jax.export.deserialize(open(hlo[name], "rb").read()).call(*xs)
      for k, v in ref.items():
        for what, out in (("onnx", got[k]), ("savedmodel", tf_got[k].numpy()),
                          ("stablehlo", hlo_got[k])):
          assert np.asarray(out).shape == v.shape, (name, k, what, b)
          np.testing.assert_allclose(out, v, atol=TOL, rtol=0, err_msg=f"{name}/{k} {what} b={b}")
      q = ort.InferenceSession(onnx_files[f"{name}.int8"])
      int8.setdefault(name, dict(zip([o.name for o in q.get_outputs()], q.run(None, feed))))
  # int8: MatMul / Gather weights quantized, the file smaller.
  for name in fns:
    assert (os.path.getsize(onnx_files[f"{name}.int8"]) < os.path.getsize(onnx_files[name]))
  return fns, refs, int8


def test_classification_exports(tmp_path):
  import torch
  import transformers
  c = vit_config.get_config("nano4,fashion_mnist")
  task = train.get_task(c)
  params = _params(task, (28, 28, 1))
  fns, refs, int8 = _check_formats(c, params, tmp_path)
  # int8 keeps the float model's decisions on random inputs of a random model (a loose check;
  # the accuracy cost on real data is bounded in tests/test_predict.py).
  np.testing.assert_allclose(int8["classify"]["probabilities"], refs["classify"]["probabilities"],
                             atol=0.05)
  # hf: transformers' ViTForImageClassification from the export gives our logits.
  hf_dir = export.export(c, params, "hf", str(tmp_path / "hf"))["hf"]
  model = transformers.ViTForImageClassification.from_pretrained(hf_dir).eval()
  assert model.config.id2label[7] == "Sneaker"  # the dataset's class names
  x = np.random.RandomState(5).uniform(-1, 1, (2, 28, 28, 1)).astype(np.float32)
  with torch.no_grad():
    hf_logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  np.testing.assert_allclose(hf_logits, np.asarray(fns["classify"].fn(x)["logits"]), atol=TOL)
  # npz: upstream names, read back by checkpoints_convert into the same params.
  from vit_jax import checkpoints_convert
  npz = export.export(c, params, "npz", str(tmp_path / "npz"))["npz"]
  back = checkpoints_convert.load(npz, c.model, image_size=28)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _clip_config():
  c = clip_config.get_config("nano,fashion_mnist")
  c.unlock()
  c.model.image_size = 8
  c.model.image.patches.size = (4, 4)
  c.context_length = c.model.text.context_length = 16
  return c


def test_clip_exports(tmp_path):
  import torch
  import transformers
  c = _clip_config()
  task = train.get_task(c)
  params = _params(task, (8, 8, 3))
  tokens = task.tokenizer.encode(["a photo of a cat.", "a dog", "a red bus on a street", "shoe"])
  fns, refs, int8 = _check_formats(c, params, tmp_path, tokens=tokens)
  for name in fns:  # unit embeddings
    np.testing.assert_allclose(np.linalg.norm(refs[name]["embeddings"], axis=-1), 1, atol=1e-5)
    cos = np.sum(int8[name]["embeddings"] * refs[name]["embeddings"], -1)
    assert cos.min() > 0.95, cos
  hf_dir = export.export(c, params, "hf", str(tmp_path / "hf"))["hf"]
  model = transformers.CLIPModel.from_pretrained(hf_dir).eval()
  x = np.random.RandomState(5).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    txt = model.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)))
  unit = lambda t: (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True))(
      np.asarray(getattr(t, "pooler_output", t)))
  np.testing.assert_allclose(unit(img), fns["encode_image"].fn(x)["embeddings"], atol=TOL)
  np.testing.assert_allclose(unit(txt), fns["encode_text"].fn(tokens)["embeddings"], atol=TOL)


def test_owl_vit_exports(tmp_path):
  import torch
  import transformers
  train_json = util.write_coco(tmp_path, [(1, 32, 24), (2, 24, 32)],
                               [(1, 1, 3, [1.0, 2.0, 10.0, 8.0]), (2, 2, 7, [3.0, 3.0, 9.0, 9.0])],
                               categories=((3, "cat"), (7, "dog")), name="train.json")
  c = owl_config.get_config(f"nano,{train_json}")
  task = train.get_task(c)
  size = c.model.image_size
  params = _params(task, (size, size, 3))
  tokens = task.tokenizer.encode(["a cat", "a dog", "a bus", "a photo of a shoe"])
  tokens[-1] = 0  # a padding query: logit -1e6 in every runtime
  fns, refs, _ = _check_formats(c, params, tmp_path, batches=(2, 1), tokens=tokens)
  assert refs["detect"]["logits"].shape[-1] == 3  # batch 2 -> 3 queries (see _check_formats)
  hf_dir = export.export(c, params, "hf", str(tmp_path / "hf"))["hf"]
  model = transformers.OwlViTForObjectDetection.from_pretrained(hf_dir).eval()
  x = np.random.RandomState(5).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  ours = fns["detect"].fn(x, tokens[:2])
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                input_ids=torch.from_numpy(tokens[:2].astype(np.int64)))
  np.testing.assert_allclose(out.logits.numpy(), ours["logits"], atol=TOL)
  np.testing.assert_allclose(out.pred_boxes.numpy(), ours["boxes"], atol=TOL)


def test_bad_requests_are_clear(tmp_path):
  c = vit_config.get_config("nano4,fashion_mnist")
  with pytest.raises(ValueError, match="expected one of onnx, savedmodel"):
    export.export(c, {}, "tflite", str(tmp_path))
  with pytest.raises(ValueError, match="applies to --format=onnx"):
    export.export(c, {}, "stablehlo", str(tmp_path), quantize="int8")
