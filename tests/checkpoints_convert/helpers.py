"""Shared by the checkpoint tests: random HF ViTs, running our ViT, reference state dicts.

The reference layouts (timm, upstream npz, big_vision npz) are built here from an HF model's
state dict by following the published conversion code (transformers' convert_vit_timm_to_pytorch
`create_rename_keys`/`read_in_q_k_v`, timm's `_load_weights`), not by calling the converter under
test.
"""
import numpy as np

from vit_jax.configs import models as model_configs
from vit_jax.models import vit

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            patch_size=4, image_size=16, num_labels=5, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def hf_model(seed=0, cls="ViTForImageClassification", **overrides):
  """A random HF ViT in eval mode. Every parameter is perturbed (HF initialises biases to 0 and
  LayerNorm scales to 1, which would hide transposed or swapped weights)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  config = transformers.ViTConfig(**{**TINY, **overrides})
  model = getattr(transformers, cls)(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  return model


def hf_logits(model, x_nhwc, **kwargs):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))), **kwargs)
  return (out.logits if hasattr(out, "logits") else out).numpy()


def images(height, width, batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def apply(params, model_config, x_nhwc, num_classes=-1):
  """Our ViT's output for NHWC images."""
  if num_classes == -1:
    num_classes = params["head"]["kernel"].shape[-1] if "head" in params else None
  model = vit.VisionTransformer(num_classes=num_classes, **model_configs.model_kwargs(model_config))
  return np.asarray(model.apply({"params": params}, x_nhwc))


def model_config(hf_config, **overrides):
  """Our model config for an HF ViTConfig (erf gelu, its LayerNorm epsilon)."""
  c = model_configs.get_model_config("b16")
  c.patches.size = (hf_config.patch_size,) * 2
  c.hidden_size = hf_config.hidden_size
  c.transformer.num_layers = hf_config.num_hidden_layers
  c.transformer.num_heads = hf_config.num_attention_heads
  c.transformer.mlp_dim = hf_config.intermediate_size
  c.approximate_gelu = hf_config.hidden_act != "gelu"
  c.layernorm_epsilon = hf_config.layer_norm_eps
  for k, v in overrides.items():
    c[k] = v
  return c


def hf_state_dict(model):
  """The state dict under the names HF checkpoints carry on disk (what save_pretrained writes)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    return load_file(f"{d}/model.safetensors")


def timm_state_dict(model):
  """timm `vit_*` state dict of an HF ViTForImageClassification: the inverse of transformers'
  convert_vit_timm_to_pytorch (rename_keys reversed; q, k, v concatenated into attn.qkv)."""
  sd = hf_state_dict(model)
  out = {
      "cls_token": sd["vit.embeddings.cls_token"],
      "pos_embed": sd["vit.embeddings.position_embeddings"],
      "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
      "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
      "norm.weight": sd["vit.layernorm.weight"],
      "norm.bias": sd["vit.layernorm.bias"],
      "head.weight": sd["classifier.weight"],
      "head.bias": sd["classifier.bias"],
  }
  for i in range(model.config.num_hidden_layers):
    h = f"vit.encoder.layer.{i}."
    t = f"blocks.{i}."
    for timm_name, hf_name in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                               ("attn.proj", "attention.output.dense"),
                               ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
      out[t + timm_name + ".weight"] = sd[h + hf_name + ".weight"]
      out[t + timm_name + ".bias"] = sd[h + hf_name + ".bias"]
    for kind in ("weight", "bias"):
      out[t + "attn.qkv." + kind] = np.concatenate(
          [sd[h + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
  return out


def upstream_npz_arrays(model, big_vision=False):
  """Upstream (or big_vision) `.npz` arrays of an HF ViTForImageClassification, following timm's
  `_load_weights` in reverse: it reads kernel [D, heads, hd] as `.flatten(1).T`, out kernel
  [heads, hd, D] through `transpose([2, 0, 1]).flatten(1)`, conv HWIO through
  `transpose([3, 2, 0, 1])`, and big_vision's block children as MHA_0 / LayerNorm_1 /
  MlpBlock_0."""
  sd = {k: v.astype(np.float32) for k, v in timm_state_dict(model).items()}
  heads = model.config.num_attention_heads
  width = model.config.hidden_size
  mha, ln1, mlp = ("0", "1", "0") if big_vision else ("1", "2", "3")
  w = {
      "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
      "embedding/bias": sd["patch_embed.proj.bias"],
      "cls": sd["cls_token"],
      "Transformer/encoder_norm/scale": sd["norm.weight"],
      "Transformer/encoder_norm/bias": sd["norm.bias"],
      "head/kernel": sd["head.weight"].T,
      "head/bias": sd["head.bias"],
  }
  w["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
  for i in range(model.config.num_hidden_layers):
    t, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    a = b + f"MultiHeadDotProductAttention_{mha}/"
    w[b + "LayerNorm_0/scale"] = sd[t + "norm1.weight"]
    w[b + "LayerNorm_0/bias"] = sd[t + "norm1.bias"]
    w[b + f"LayerNorm_{ln1}/scale"] = sd[t + "norm2.weight"]
    w[b + f"LayerNorm_{ln1}/bias"] = sd[t + "norm2.bias"]
    qkv_w, qkv_b = np.split(sd[t + "attn.qkv.weight"], 3), np.split(sd[t + "attn.qkv.bias"], 3)
    for n, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
      w[a + n + "/kernel"] = wt.T.reshape(width, heads, -1)
      w[a + n + "/bias"] = bs.reshape(heads, -1)
    w[a + "out/kernel"] = sd[t + "attn.proj.weight"].reshape(width, heads, -1).transpose(1, 2, 0)
    w[a + "out/bias"] = sd[t + "attn.proj.bias"]
    for r, name in enumerate(("mlp.fc1", "mlp.fc2")):
      w[b + f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[t + name + ".weight"].T
      w[b + f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[t + name + ".bias"]
  return w


def max_diff(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))
