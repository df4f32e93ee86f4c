"""ViT model presets: upstream widths/depths/heads/MLP sizes, plus small presets for a CPU demo.

Each preset returns the `config.model` ConfigDict that `VisionTransformer(**config.model)` takes,
with upstream's field names (`patches.size`, `hidden_size`, `transformer.*`, `classifier`,
`representation_size`).
"""
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


def _parse(name: str):
  """'b16' | 'B/16' | 'ViT-B_16' | 'B_16' -> ('B', 16)."""
  s = name.strip()
  for prefix in ("ViT-", "vit-", "vit_", "ViT_"):
    if s.startswith(prefix):
      s = s[len(prefix):]
  s = s.replace("/", "_")
  if "_" in s:
    width, patch = s.split("_", 1)
  else:
    i = len(s.rstrip("0123456789"))
    width, patch = s[:i], s[i:]
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
