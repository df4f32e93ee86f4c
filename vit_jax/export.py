r"""Exports a trained model for serving: ONNX, TF SavedModel, StableHLO, HF, npz; int8 ONNX.

    python -m vit_jax.export --workdir=DIR --format=onnx [--out=DIR/export] [--quantize=int8]
    python -m vit_jax.export --config=vit_jax/configs/clip.py:b32 --checkpoint=clip.npz \
        --format=savedmodel --out=~/clip_savedmodel

What is exported is the task's inference functions (`task.export_functions`, tasks/__init__.py):
classification `classify(images) -> logits, probabilities`; CLIP `encode_image(images)` and
`encode_text(tokens)`; OWL-ViT `detect(images, query_tokens) -> logits, boxes`. The params are
constants inside each export, the batch dimension (and OWL-ViT's number of queries) is dynamic,
and each export has a `<name>.txt` beside it saying what the inputs hold and how to preprocess
them (the config's pp.test, without its label ops).

  onnx        `<name>.onnx` through jax2onnx (the JAX graph -> ONNX ops); runs in onnxruntime.
              `--quantize=int8` adds `<name>.int8.onnx`: onnxruntime's dynamic quantization (int8
              weights of MatMul/Gemm, activations quantized per batch at run time).
  savedmodel  `<name>/` TF SavedModel through jax2tf (the StableHLO inside an XlaCallModule op):
              `tf.saved_model.load` and TF Serving load it (signature `serving_default`).
  stablehlo   `<name>.stablehlo`: `jax.export` serialized StableHLO, for
              `jax.export.deserialize(...).call(...)` (CPU; `--platforms=cpu,cuda,tpu` for more).
  hf          a transformers directory (ViTForImageClassification, CLIPModel, OwlViT/Owlv2
              ForObjectDetection) through checkpoints_convert.
  npz         our param names as an `.npz` (upstream's for ViT) through checkpoints_convert.
"""
import os
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import configs
from vit_jax import tasks
from vit_jax import train

FORMATS = ("onnx", "savedmodel", "stablehlo", "hf", "npz")
ONNX_OPSET = 17  # onnxruntime >= 1.12 runs it; int8 dynamic quantization supports it


def _symbolic_shapes(fn: tasks.ExportFunction):
  """ShapeDtypeStructs of `fn`'s inputs, string dimensions made jax.export symbols (one scope)."""
  names = sorted({d for _, shape, _ in fn.inputs for d in shape if isinstance(d, str)})
  symbols = dict(zip(names, jax.export.symbolic_shape(", ".join(names)))) if names else {}
  return [jax.ShapeDtypeStruct(tuple(symbols.get(d, d) for d in shape), jnp.dtype(dtype))
          for _, shape, dtype in fn.inputs]


def _write_doc(fn: tasks.ExportFunction, path: str, fmt: str) -> None:
  inputs = ", ".join(f"{n} {np.dtype(t).name} {list(s)}" for n, s, t in fn.inputs)
  with open(path, "w") as f:
    f.write(f"format: {fmt}\ninputs: {inputs}\n{fn.doc}\n")


def export_onnx(fn: tasks.ExportFunction, path: str) -> str:
  """Writes `fn` as ONNX (jax2onnx) to `path`; dynamic dimensions keep their names."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  # jax2onnx logs a traceback for each of its example plugins whose library (equinox, dm_pix) is
  # not installed, and onnx_ir warns once per shape-only value: noise for a correct export.
  std_logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(std_logging.ERROR)
  std_logging.getLogger("onnx_ir.serde").setLevel(std_logging.ERROR)
  try:
    from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The onnx export needs jax2onnx and onnxruntime: pip install -e '.[export]' "
                      "&& pip install --no-deps jax2onnx==0.17.1 (see the README: its metadata "
                      "pins an old orbax that the converter never imports).") from e
  # jax2onnx makes each named (string) dimension one symbol shared by all inputs.
  inputs = [jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for _, shape, dtype in fn.inputs]
  symbolic = _symbolic_shapes(fn)
  names = [n for n, _, _ in fn.inputs]
  out_names = sorted(jax.eval_shape(fn.fn, *symbolic))
  ordered = lambda *xs: tuple(fn.fn(*xs)[k] for k in out_names)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Native LayerNormalization (opset 17) rather than its decomposition: one fused kernel.
  kwargs = dict(model_name=os.path.splitext(os.path.basename(path))[0], opset=ONNX_OPSET,
                normalization_mode="prefer_native",
                return_mode="file", output_path=path, input_names=names, output_names=out_names)
  try:  # one self-contained file ("web" mode), as long as protobuf's 2 GB limit allows
    to_onnx(ordered, inputs, export_mode="web", **kwargs)
  except ValueError as e:
    if "2GB" not in str(e) and "2 GB" not in str(e) and "too large" not in str(e):
      raise
    to_onnx(ordered, inputs, **kwargs)  # weights beside it, in <name>.onnx.data
  return path


def _gemm_to_matmul(model):
  """Rewrites each Gemm with a constant weight as MatMul (+ Add of its bias), in place.

  jax2onnx writes dense layers as Gemm; onnxruntime's dynamic quantizer turns MatMul into
  MatMulInteger but leaves Gemm in float. Same arithmetic: alpha = beta = 1, no transposed A.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  inits = {i.name: i for i in model.graph.initializer}
  nodes = []
  for node in model.graph.node:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
        or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) not in (0.0, 1.0)):
      nodes.append(node)
      continue
    a, b = node.input[0], node.input[1]
    if attrs.get("transB", 0):
      w = numpy_helper.to_array(inits[b]).T
      b = b + "_t"
      model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), b))
    out = node.output[0]
    has_bias = len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) == 1.0
    mm_out = out + "_matmul" if has_bias else out
    nodes.append(onnx.helper.make_node("MatMul", [a, b], [mm_out], name=node.name + "_matmul"))
    if has_bias:
      nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [out],
                                         name=node.name + "_bias"))
  del model.graph.node[:]
  model.graph.node.extend(nodes)
  return model


def quantize_onnx(src: str, dst: str) -> str:
  """onnxruntime's dynamic int8 quantization of an ONNX file: int8 weights for the dense layers
  (per output channel), their input activations quantized per batch at run time (MatMulInteger);
  attention's activation-by-activation products, LayerNorms and softmax stay float32."""
  from onnxruntime.quantization import QuantType  # pylint: disable=g-import-not-at-top
  from onnxruntime.quantization import quantize_dynamic  # pylint: disable=g-import-not-at-top
  from onnxruntime.quantization.shape_inference import quant_pre_process  # pylint: disable=g-import-not-at-top
  # onnxruntime's recommended pre-pass: shape inference and graph optimisation, which folds the
  # constant subgraphs (the fused q/k/v kernel is a concatenation of three) into initializers
  # that the quantizer can then turn into int8 weights.
  import onnx  # pylint: disable=g-import-not-at-top
  if os.path.exists(src + ".data"):
    raise ValueError(f"{src}: weights stored outside the file (a model over 2 GB): onnxruntime's "
                     "quantization pre-pass cannot read them; quantize a smaller model, or run "
                     "onnxruntime.quantization on a machine-local copy by hand.")
  prepared = dst + ".pre.onnx"
  try:
    # ONNX shape inference only: onnxruntime's symbolic pass gives up on some of jax2onnx's
    # dynamic-shape arithmetic (CLIP's text tower).
    quant_pre_process(src, prepared, skip_symbolic_shape=True)
    model = _gemm_to_matmul(onnx.load(prepared))
    quantize_dynamic(model, dst, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm", "Gather"])
  finally:
    if os.path.exists(prepared):
      os.remove(prepared)
  return dst


def export_savedmodel(fns: Dict[str, tasks.ExportFunction], path: str) -> str:
  """One SavedModel holding every function (signature `serving_default` = the first one, and
  one signature per name); jax2tf with polymorphic batch / query dimensions."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  module = tf.Module()
  signatures = {}
  for name, fn in fns.items():
    poly = ["(" + ", ".join(str(d) for d in shape) + ")" for _, shape, _ in fn.inputs]
    converted = jax2tf.convert(fn.fn, polymorphic_shapes=poly, with_gradient=False)
    specs = [tf.TensorSpec([None if isinstance(d, str) else d for d in shape],
                           tf.as_dtype(np.dtype(dtype)), name=n) for n, shape, dtype in fn.inputs]
    tf_fn = tf.function(converted, autograph=False, input_signature=specs)
    setattr(module, name, tf_fn)
    signatures[name] = tf_fn.get_concrete_function()
  signatures["serving_default"] = signatures[next(iter(fns))]
  tf.saved_model.save(module, path, signatures=signatures)
  return path


def export_stablehlo(fn: tasks.ExportFunction, path: str,
                     platforms: Sequence[str] = ("cpu",)) -> str:
  """`jax.export` of `fn` (symbolic batch / query dimensions), serialized to `path`."""
  exported = jax.export.export(jax.jit(fn.fn), platforms=tuple(platforms))(*_symbolic_shapes(fn))
  with open(path, "wb") as f:
    f.write(exported.serialize())
  return path


def export(config, params, fmt: str, out: str, *, image_shape=None, quantize: Optional[str] = None,
           platforms: Sequence[str] = ("cpu",)) -> Dict[str, str]:
  """Writes `params` of `config`'s task in format `fmt` under the folder `out`; returns
  {what: path}."""
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}.")
  if quantize not in (None, "", "int8"):
    raise ValueError(f"--quantize={quantize!r}: expected int8 (or nothing).")
  if quantize and fmt != "onnx":
    raise ValueError("--quantize=int8 applies to --format=onnx (onnxruntime's dynamic "
                     "quantization).")
  task = train.get_task(config)
  os.makedirs(out, exist_ok=True)
  if fmt in ("hf", "npz"):
    path = task.write_checkpoint(params, fmt, out)
    return {fmt: path}
  params = jax.tree.map(jnp.asarray, params)
  fns = task.export_functions(params, image_shape)
  written = {}
  if fmt == "savedmodel":
    path = export_savedmodel(fns, os.path.join(out, "savedmodel"))
    for name, fn in fns.items():
      _write_doc(fn, os.path.join(out, f"savedmodel.{name}.txt"), fmt)
    return {"savedmodel": path}
  for name, fn in fns.items():
    if fmt == "onnx":
      written[name] = export_onnx(fn, os.path.join(out, f"{name}.onnx"))
      if quantize:
        written[f"{name}.int8"] = quantize_onnx(written[name],
                                                os.path.join(out, f"{name}.int8.onnx"))
    else:
      written[name] = export_stablehlo(fn, os.path.join(out, f"{name}.stablehlo"), platforms)
    _write_doc(fn, os.path.join(out, f"{name}.txt"), fmt)
  return written


def load_for_export(workdir: Optional[str], config=None, checkpoint: Optional[str] = None,
                    image_shape=None):
  """(config, params): a run's (workdir, checkpoint latest / best / step), or `config` with any
  checkpoint file `checkpoints_convert` reads."""
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  if workdir:
    config = config if config is not None else configs.load_run_config(workdir)
    return config, predict.restore_params(workdir, checkpoint or "latest")
  if config is None or not checkpoint:
    raise ValueError("Give --workdir (a run), or --config with --checkpoint (a file).")
  task = train.get_task(config)
  shape = tuple(image_shape) if image_shape else None
  if shape is None:  # the config's own size where it has one (CLIP, OWL-ViT)
    size = config.model.get("image_size")
    if size is None:
      raise ValueError("--image-size H,W[,C] is needed with --checkpoint for a ViT classifier "
                       "(its config does not fix the input size).")
    shape = (int(size), int(size), 3)
  p = predict.Predictor(config, checkpoint_path=checkpoint)
  return config, p._params_for(shape)  # pylint: disable=protected-access


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  predict.define_model_flags()
  flags.DEFINE_enum("format", None, FORMATS, "What to write.")
  flags.DEFINE_string("out", None, "Output folder (default: <workdir>/export/<format>).")
  flags.DEFINE_string("quantize", None, "int8: also write onnxruntime's dynamic int8 model.")
  flags.DEFINE_string("image-size", None, "H,W[,C] of the exported input (default: the model's).")
  flags.DEFINE_list("platforms", ["cpu"], "stablehlo: platforms to lower for (cpu, cuda, tpu).")
  flags.mark_flag_as_required("format")
  return flags.FLAGS


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  train._quiet_library_logs()  # pylint: disable=protected-access
  train._hide_accelerators_from_tf()  # pylint: disable=protected-access
  size = f["image-size"].value
  shape = tuple(int(v) for v in size.split(",")) if size else None
  if shape is not None and len(shape) == 2:
    shape = shape + (3,)
  workdir = os.path.expanduser(f.workdir) if f.workdir else None
  checkpoint = f.checkpoint
  if checkpoint and not workdir:
    checkpoint = os.path.expanduser(checkpoint)
  config, params = load_for_export(workdir, f.config, checkpoint, shape)
  out = f.out or os.path.join(workdir or ".", "export", f.format)
  written = export(config, params, f.format, os.path.expanduser(out), image_shape=shape,
                   quantize=f.quantize, platforms=f.platforms)
  for what, path in written.items():
    size_mb = _size(path) / 2**20
    print(f"{what}: {path} ({size_mb:.1f} MiB)")


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
