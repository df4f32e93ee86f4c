"""Model presets: ViT (upstream widths/depths/heads/MLP sizes) and CLIP (OpenAI's), plus small
presets for a CPU demo and for tests.

`get_model_config` returns the `config.model` ConfigDict that
`VisionTransformer(**model_kwargs(config.model))` takes, with upstream's field names
(`patches.size`, `hidden_size`, `transformer.*`, `classifier`, `representation_size`).
`get_clip_config` returns the one `CLIP(**clip_kwargs(config.model))` takes (models/clip.py);
`get_owl_vit_config` the one `OwlViT(**owl_vit_kwargs(config.model))` takes (models/owl_vit.py).
"""
import math

import ml_collections

# name: (hidden_size, mlp_dim, num_heads, num_layers); the patch size comes from the name.
_WIDTHS = {
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
    # Small presets for a laptop CPU. `mu7` ("micro", patch 7: a 4x4 grid on 28x28 images) is
    # the bundled Fashion-MNIST demo model; on 2 cores it beat patch-4 models of equal wall time.
    "mu": (128, 256, 4, 6),
    "nano": (32, 64, 2, 2),  # tests: width <= 64, <= 2 layers
}

# Upstream names (ViT-B_16) and the short names used on the command line (b16).
MODEL_NAMES = ("ViT-Ti_16", "ViT-S_16", "ViT-S_32", "ViT-B_16", "ViT-B_32", "ViT-B_8",
               "ViT-L_16", "ViT-L_32", "ViT-H_14", "ViT-mu_7", "ViT-nano_4")


def _split_name(name: str, prefixes) -> tuple:
  """'B/16' | 'ViT-B_16' | 'b16' -> ('B' or 'b', '16'); the patch is '' when the name has none."""
  s = name.strip()
  for prefix in prefixes:
    if s.startswith(prefix):
      s = s[len(prefix):]
  s = s.replace("/", "_")
  if "_" in s:
    return tuple(s.split("_", 1))
  i = len(s.rstrip("0123456789"))
  return s[:i], s[i:]


def _parse(name: str):
  """'b16' | 'B/16' | 'ViT-B_16' | 'B_16' -> ('B', 16)."""
  width, patch = _split_name(name, ("ViT-", "vit-", "vit_", "ViT_"))
  canon = {k.lower(): k for k in _WIDTHS}
  if width.lower() not in canon or not patch.isdigit():
    raise ValueError(f"Unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)} "
                     "(or short forms like ti16, s32, b16, l16, h14, mu7).")
  return canon[width.lower()], int(patch)


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """Model config for `name` (e.g. 'b16', 'ViT-B_16', 'B/16')."""
  width_name, patch = _parse(name)
  hidden, mlp, heads, layers = _WIDTHS[width_name]
  config = ml_collections.ConfigDict()
  config.name = f"ViT-{width_name}_{patch}"
  config.patches = ml_collections.ConfigDict({"size": (patch, patch)})
  config.hidden_size = hidden
  config.transformer = ml_collections.ConfigDict(dict(
      mlp_dim=mlp, num_heads=heads, num_layers=layers, attention_dropout_rate=0.0,
      dropout_rate=0.0, stochastic_depth=0.0))
  config.classifier = "token"
  config.representation_size = None
  config.approximate_gelu = True
  config.layernorm_epsilon = 1e-6
  return config


def model_kwargs(model_config) -> dict:
  """Keyword arguments for `VisionTransformer` from a model config (drops the `name` field)."""
  kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  kwargs["model_name"] = kwargs.pop("name", None)
  return kwargs


# ----------------------------------------------------------------------------------------------
# CLIP presets. OpenAI widths (scenic's clip CONFIGS, HF's openai/clip-vit-*); every tower uses
# quick_gelu, LayerNorm eps 1e-5, a bias-free patch embedding and projections, and ln_pre.

# name: (patch, image_size, vision (width, layers, heads), text (width, layers, heads), embed_dim)
_CLIP = {
    "B": ((32, 16), 224, (768, 12, 12), (512, 12, 8), 512),
    "L": ((14,), 224, (1024, 24, 16), (768, 12, 12), 768),
    # CPU demo: patch 7 at 28 px (a 4x4 grid, as the ViT mu7), patch 16/32 at 64/128 px.
    "mu": ((7, 16, 32), None, (128, 4, 4), (128, 4, 4), 128),
    "nano": ((4,), 16, (32, 2, 2), (32, 2, 2), 32),  # tests: width <= 64, <= 2 layers
}
_CLIP_DEFAULT_PATCH = {"mu": 7, "nano": 4}
CLIP_MODEL_NAMES = ("CLIP-B_32", "CLIP-B_16", "CLIP-L_14", "CLIP-mu_7", "CLIP-mu_16",
                    "CLIP-mu_32", "CLIP-nano_4")


def _parse_clip(name: str):
  """'b32' | 'B/32' | 'ViT-B/32' | 'CLIP-B_32' | 'mu' | 'nano' -> ('B', 32)."""
  width, patch = _split_name(name, ("CLIP-", "clip-", "clip_", "CLIP_", "ViT-", "vit-", "vit_",
                                    "ViT_"))
  canon = {k.lower(): k for k in _CLIP}
  width = canon.get(width.lower())
  if width is not None and not patch and width in _CLIP_DEFAULT_PATCH:
    patch = str(_CLIP_DEFAULT_PATCH[width])
  if width is None or not patch.isdigit() or int(patch) not in _CLIP[width][0]:
    raise ValueError(f"Unknown CLIP model {name!r}: expected one of {', '.join(CLIP_MODEL_NAMES)} "
                     "(or short forms b32, b16, l14, mu, mu16, mu32, nano).")
  return width, int(patch)


def clip_model_config(*, name: str, embed_dim: int, image_size: int, patch: int,
                      vision: tuple, text: tuple, vocab_size: int = 49408,
                      context_length: int = 77) -> ml_collections.ConfigDict:
  """A CLIP model config: vision/text = (width, layers, heads), MLPs 4x wide, OpenAI's choices.

  Layout: `name`, `embed_dim`, `image_size` (what the position embeddings are made for; not a
  module argument), `logit_scale_init`, `logit_bias_init` (None: no bias, SigLIP: -10), `image`
  (VisionTransformer arguments) and `text` (TextTransformer arguments).
  """
  (vw, vl, vh), (tw, tl, th) = vision, text
  c = ml_collections.ConfigDict()
  c.name = name
  c.embed_dim = embed_dim
  c.image_size = image_size
  c.logit_scale_init = math.log(1 / 0.07)  # CLIP's temperature 0.07 (SigLIP: log(10))
  c.logit_bias_init = None
  c.image = ml_collections.ConfigDict(dict(
      patches=ml_collections.ConfigDict({"size": (patch, patch)}),
      hidden_size=vw,
      transformer=ml_collections.ConfigDict(dict(
          mlp_dim=4 * vw, num_heads=vh, num_layers=vl, attention_dropout_rate=0.0,
          dropout_rate=0.0, stochastic_depth=0.0)),
      classifier="token",
      representation_size=None,
      pre_norm=True,
      patch_embedding_bias=False,
      head_bias=False,
      head_kernel_init="normal",
      mlp_activation="quick_gelu",
      approximate_gelu=False,
      layernorm_epsilon=1e-5,
  ))
  c.text = ml_collections.ConfigDict(dict(
      width=tw, num_layers=tl, num_heads=th, mlp_dim=4 * tw, vocab_size=vocab_size,
      context_length=context_length, mlp_activation="quick_gelu", approximate_gelu=False,
      layernorm_epsilon=1e-5, dropout_rate=0.0, attention_dropout_rate=0.0,
      stochastic_depth=0.0))
  return c


def get_clip_config(name: str) -> ml_collections.ConfigDict:
  """CLIP model config for `name`: b32, b16, l14 (OpenAI), mu / mu16 / mu32 (CPU demo), nano."""
  width_name, patch = _parse_clip(name)
  _, image_size, vision, text, embed_dim = _CLIP[width_name]
  if image_size is None:  # mu: a 4x4 patch grid
    image_size = 4 * patch
  return clip_model_config(name=f"CLIP-{width_name}_{patch}", embed_dim=embed_dim,
                           image_size=image_size, patch=patch, vision=vision, text=text)


def clip_kwargs(model_config) -> dict:
  """Keyword arguments for `models.clip.CLIP` from a CLIP model config (`name` -> `model_name`;
  `image_size` is the data's business, not the module's)."""
  kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  kwargs["model_name"] = kwargs.pop("name", None)
  kwargs.pop("image_size", None)
  return kwargs


# ----------------------------------------------------------------------------------------------
# OWL-ViT presets (models/owl_vit.py): CLIP's towers at detection resolution, text context 16.

# name: (CLIP preset, image_size, objectness). Sizes: scenic's configs (v1 B: 768, L/14: 840;
# v2 B/16: 960, L/14: 1008).
_OWL = {
    "b32": ("b32", 768, False),
    "b16": ("b16", 768, False),
    "l14": ("l14", 840, False),
    "v2_b16": ("b16", 960, True),
    "v2_l14": ("l14", 1008, True),
    # CPU demo: CLIP-mu towers (width 128, 4 layers), patch 16 at 160 px = a 10x10 grid, 100 boxes.
    "mu": ("mu16", 160, False),
    "nano": ("nano", 16, False),  # tests: width 32, 2 layers, patch 4: a 4x4 grid
}
OWL_VIT_MODEL_NAMES = tuple(f"OWL-ViT-{n}" for n in _OWL)
OWL_VIT_CONTEXT_LENGTH = 16


def get_owl_vit_config(name: str) -> ml_collections.ConfigDict:
  """OWL-ViT model config: b32, b16, l14 (v1), v2_b16, v2_l14 (OWLv2, objectness), mu, nano.

  The CLIP layout (clip_model_config) with text context_length 16, the image tower unpooled
  (`classifier='token_unpooled'`), and `objectness`, `box_bias`, `class_bias_prior`,
  `head_approximate_gelu` (the heads' gelu: erf as HF; scenic's flax heads used tanh).
  """
  key = name.strip()
  for prefix in ("OWL-ViT-", "owl-vit-", "owl_vit_", "owlvit-", "owlv2-"):
    if key.startswith(prefix):
      key = ("v2_" if prefix == "owlv2-" else "") + key[len(prefix):]
  key = key.lower().replace("/", "")
  if key not in _OWL:
    raise ValueError(f"Unknown OWL-ViT model {name!r}: expected one of {', '.join(_OWL)}.")
  clip_name, image_size, objectness = _OWL[key]
  c = get_clip_config(clip_name)
  c.name = f"OWL-ViT-{key}"
  c.image_size = image_size
  c.text.context_length = OWL_VIT_CONTEXT_LENGTH
  c.image.classifier = "token_unpooled"
  c.objectness = objectness
  c.box_bias = "both"
  c.class_bias_prior = 0.01
  c.head_approximate_gelu = False
  return c


# CLIP config fields that are not OwlViT module fields (the detector has no contrastive logits).
_OWL_NOT_MODULE_FIELDS = ("image_size", "logit_scale_init", "logit_bias_init", "max_logit_scale")


def owl_vit_kwargs(model_config) -> dict:
  """Keyword arguments for `models.owl_vit.OwlViT` from an OWL-ViT model config (`name` ->
  `model_name`; image size and the CLIP-only logit fields dropped)."""
  kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  kwargs["model_name"] = kwargs.pop("name", None)
  for k in _OWL_NOT_MODULE_FIELDS:
    kwargs.pop(k, None)
  return kwargs
