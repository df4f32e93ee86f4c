"""Vision Transformer in Flax linen, with the upstream vision_transformer param names.

The param tree is exactly the one stored in the upstream/AugReg `.npz` files (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`, `pre_logits`,
`head`), so those files map on with no renaming (CLIP's image tower adds `Transformer/pre_norm`).
Attention kernels keep the `[width, heads, head_dim]` layout on disk but are concatenated into one
`[width, 3 * heads * head_dim]` GEMM at trace time, which is what makes the step fast on CPU and
GPU alike. The blocks (`Encoder`) are shared with CLIP's causal text tower (models/text.py).
"""
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention

Dtype = Any
Initializer = Callable[..., jnp.ndarray]


def _pair(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(x, int):
    return (x, x)
  x = tuple(int(v) for v in x)
  if len(x) != 2:
    raise ValueError(f"Expected an int or a pair (height, width), found {x!r}.")
  return x


ACTIVATIONS = ("gelu", "quick_gelu")


def _activation(name: str, approximate_gelu: bool) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The MLP nonlinearity: "gelu" (tanh form if `approximate_gelu`, else exact erf) or
  "quick_gelu" (x * sigmoid(1.702 x), what OpenAI CLIP was trained with)."""
  if name == "gelu":
    # Upstream trained with the tanh approximation (flax's default); HF/timm use the exact erf form.
    return lambda x: nn.gelu(x, approximate=approximate_gelu)
  if name == "quick_gelu":
    return lambda x: x * nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)
  raise ValueError(f"Unknown MLP activation {name!r}: expected one of {ACTIVATIONS}.")


def head_kernel_initializer(name: str) -> Initializer:
  """"zeros" (upstream: a fine-tuning head starts at zero logits) or "normal" (N(0, 1/fan_in),
  CLIP's projections: a zero projection would make every embedding zero)."""
  if name == "zeros":
    return nn.initializers.zeros
  if name == "normal":
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal")
  raise ValueError(f"Unknown head_kernel_init {name!r}: expected 'zeros' or 'normal'.")


def _dense_general_init(init: Initializer, in_axes: int, out_axes: int) -> Initializer:
  """Initialises a multi-axis kernel as flax's DenseGeneral does: on the flattened 2-D shape."""

  def wrapped(key, shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:in_axes])), int(np.prod(shape[in_axes:in_axes + out_axes])))
    return jnp.reshape(init(key, flat, dtype), shape)

  return wrapped


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example. [batch, ...] -> same."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class MlpBlock(nn.Module):
  """Transformer MLP: Dense_0 -> activation -> dropout -> Dense_1 -> dropout."""
  mlp_dim: int
  dropout_rate: float = 0.0
  approximate_gelu: bool = True
  activation: str = "gelu"  # gelu | quick_gelu
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    out_dim = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    x = dense(self.mlp_dim, "Dense_0")(x)
    x = _activation(self.activation, self.approximate_gelu)(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, "Dense_1")(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class _Projection(nn.Module):
  """Holds one DenseGeneral-shaped projection's params (`kernel`, `bias`) without applying them.

  The attention module reads them to build one fused GEMM; the names and shapes stay upstream's.
  """
  kernel_shape: Tuple[int, ...]
  bias_shape: Tuple[int, ...]
  in_axes: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    out_axes = len(self.kernel_shape) - self.in_axes
    kernel = self.param(
        "kernel", _dense_general_init(nn.initializers.xavier_uniform(), self.in_axes, out_axes),
        self.kernel_shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, self.bias_shape, self.param_dtype)
    return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with upstream param names: query/key/value `[width, heads, head_dim]`, out
  `[heads, head_dim, width]`. x: [batch, tokens, width] -> [batch, tokens, width].

  `mask`, when given, is a boolean [batch or 1, 1 or heads, q_tokens, kv_tokens] (True = attend);
  `is_causal` lets each token attend only to itself and earlier ones (CLIP's text tower), which
  the attention kernels apply without a materialised mask.
  """
  num_heads: int
  dropout_rate: float = 0.0
  is_causal: bool = False
  attention_impl: Optional[str] = None  # None: per platform (models/attention.py)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool, mask: Optional[jnp.ndarray] = None):
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"Width {width} is not divisible by num_heads {self.num_heads}.")
    heads, head_dim = self.num_heads, width // self.num_heads
    proj = lambda name: _Projection((width, heads, head_dim), (heads, head_dim), 1,
                                    self.param_dtype, name=name)()
    (qk, qb), (kk, kb), (vk, vb) = proj("query"), proj("key"), proj("value")
    ok, ob = _Projection((heads, head_dim, width), (width,), 2, self.param_dtype, name="out")()

    # One [width, 3*heads*head_dim] GEMM instead of three DenseGeneral einsums.
    qkv_kernel = jnp.concatenate([k.reshape(width, heads * head_dim) for k in (qk, kk, vk)], axis=1)
    qkv_bias = jnp.concatenate([b.reshape(heads * head_dim) for b in (qb, kb, vb)])
    # GEMMs on [batch * tokens, width] rows: the same XLA program (the reshapes are bitcasts),
    # and ONNX exporters then emit MatMul, which int8 quantizers handle (not Einsum).
    x = x.astype(self.dtype).reshape(batch * tokens, width)
    qkv = x @ qkv_kernel.astype(self.dtype) + qkv_bias.astype(self.dtype)
    qkv = qkv.reshape(batch, tokens, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]

    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    out = attention.dot_product_attention(
        q, k, v, mask=mask, is_causal=self.is_causal, dropout_rate=self.dropout_rate,
        dropout_rng=dropout_rng,
        deterministic=deterministic, implementation=self.attention_impl)
    out = out.reshape(batch * tokens, heads * head_dim)
    out = out @ ok.reshape(heads * head_dim, width).astype(self.dtype) + ob.astype(self.dtype)
    return out.reshape(batch, tokens, width)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block. x: [batch, tokens, width] -> [batch, tokens, width]."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = True
  mlp_activation: str = "gelu"
  layernorm_epsilon: float = 1e-6
  is_causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, deterministic: bool, mask: Optional[jnp.ndarray] = None):
    ln = lambda name: nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    x = ln("LayerNorm_0")(inputs)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        is_causal=self.is_causal, dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_1")(
            x, deterministic=deterministic, mask=mask)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = DropPath(self.stochastic_depth, name="DropPath_0")(x, deterministic) + inputs
    y = ln("LayerNorm_2")(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 approximate_gelu=self.approximate_gelu, activation=self.mlp_activation,
                 dtype=self.dtype,
                 param_dtype=self.param_dtype, name="MlpBlock_3")(y, deterministic=deterministic)
    return x + DropPath(self.stochastic_depth, name="DropPath_1")(y, deterministic)


def checkpoint_policy(name: Optional[str]):
  """`jax.checkpoint_policies.<name>` (e.g. 'dots_with_no_batch_dims_saveable'); None -> None."""
  if name is None:
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy) or name.startswith("_"):
    known = sorted(n for n in dir(jax.checkpoint_policies) if n.endswith("saveable")
                   or n.startswith("checkpoint_dots"))
    raise ValueError(f"remat_policy={name!r} is not a jax.checkpoint_policies policy: expected "
                     f"one of {known}.")
  # Some entries are factories (save_only_these_names, ...), not policies: those need arguments.
  if name.startswith(("save_", "offload")):
    raise ValueError(f"remat_policy={name!r} needs arguments; pick a plain policy such as "
                     "'nothing_saveable' or 'dots_with_no_batch_dims_saveable'.")
  return policy


class Encoder(nn.Module):
  """Position embedding [+ LayerNorm `pre_norm`] + N blocks + final LayerNorm `encoder_norm`.

  x: [batch, tokens, width] -> same shape. `pre_norm` is CLIP's `ln_pre` (image tower), applied
  after the position embedding is added. `is_causal` makes every block causal (CLIP's text
  tower). `posemb_length`: the position embedding has this many rows and the first `tokens` are
  used (the text tower's context length); None: exactly `tokens` rows (ViT).
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = True
  mlp_activation: str = "gelu"
  layernorm_epsilon: float = 1e-6
  add_position_embedding: bool = True
  posemb_length: Optional[int] = None
  pre_norm: bool = False
  is_causal: bool = False
  remat: bool = False
  remat_policy: Optional[str] = None  # a jax.checkpoint_policies name; None: save nothing
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, mask: Optional[jnp.ndarray] = None):
    if self.add_position_embedding:
      x = AddPositionEmbs(num_positions=self.posemb_length, param_dtype=self.param_dtype,
                          name="posembed_input")(x)
      x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="pre_norm")(x)
    x = x.astype(self.dtype)
    block_cls = Encoder1DBlock
    if self.remat:
      # Recompute activations in the backward pass: trades ~30% compute for O(1)-in-depth memory.
      block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,),
                           policy=checkpoint_policy(self.remat_policy))
    for lyr in range(self.num_layers):
      # Stochastic depth grows linearly with depth, as in DeiT/AugReg.
      sd = self.stochastic_depth * lyr / max(self.num_layers - 1, 1)
      # Activations stay split by example between blocks; a no-op unless the trainer binds the
      # logical axis "batch" to mesh axes (parallel.py, pjit).
      x = nn.with_logical_constraint(x, ("batch", None, None))
      x = block_cls(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, stochastic_depth=sd,
          approximate_gelu=self.approximate_gelu, mlp_activation=self.mlp_activation,
          layernorm_epsilon=self.layernorm_epsilon, is_causal=self.is_causal, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"encoderblock_{lyr}")(
              x, not train, mask)
    x = nn.with_logical_constraint(x, ("batch", None, None))
    return nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="encoder_norm")(x)


class PatchEmbedding(nn.Module):
  """Non-overlapping patches -> linear embedding, as a stride-`patch` conv with conv params
  (`kernel` [ph, pw, channels, width], `bias` [width]), computed as one GEMM over the patches.

  images: [batch, height, width, channels] -> [batch, height / ph, width / pw, width].
  A patch-sized, patch-strided convolution is exactly this matrix product; as a GEMM it runs
  several times faster on CPU (XLA's convolution, and above all its weight gradient, are slow for
  16x16 windows), and the same on accelerators.
  """
  features: int
  patch: Tuple[int, int]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    n, height, width, channels = images.shape
    (ph, pw), gh, gw = self.patch, height // self.patch[0], width // self.patch[1]
    fan_in = ph * pw * channels
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (ph, pw, channels, self.features), self.param_dtype)
    x = images.astype(self.dtype).reshape(n, gh, ph, gw, pw, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(n, gh, gw, fan_in)
    x = x @ kernel.reshape(fan_in, self.features).astype(self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      x = x + bias.astype(self.dtype)
    return x


class AddPositionEmbs(nn.Module):
  """Learned position embedding `pos_embedding` [1, positions, width], added to the input.

  x: [batch, tokens, width]. positions = `num_positions` (the first `tokens` rows are added;
  a text tower's context length) or, when None, exactly `tokens`.
  """
  num_positions: Optional[int] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    tokens = x.shape[1]
    positions = tokens if self.num_positions is None else self.num_positions
    if tokens > positions:
      raise ValueError(f"Input has {tokens} tokens but the position embedding only "
                       f"{positions} positions ([1, {positions}, {x.shape[2]}]).")
    shape = (1, positions, x.shape[2])
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    return x + pe[:, :tokens].astype(x.dtype)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe attends over the tokens.

  x: [batch, tokens, width] -> [batch, width].
  """
  num_heads: int
  mlp_dim: int
  approximate_gelu: bool = True
  mlp_activation: str = "gelu"
  layernorm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, _, width = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), self.param_dtype)
    probe = jnp.tile(probe.astype(self.dtype), [batch, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform())(probe, x)
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    x = x + MlpBlock(self.mlp_dim, approximate_gelu=self.approximate_gelu,
                     activation=self.mlp_activation, dtype=self.dtype,
                     param_dtype=self.param_dtype)(y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier. images: [batch, height, width, 3] -> logits [batch, num_classes].

  With `num_classes=None` it is a feature extractor returning the pooled `[batch, width]`
  (pre-logits) representation; `classifier='unpooled'` returns all tokens
  `[batch, tokens, width]`.

  CLIP's image tower is this model with `pre_norm=True` (`ln_pre`, at
  `Transformer/pre_norm`), `mlp_activation="quick_gelu"`, `layernorm_epsilon=1e-5`,
  `patch_embedding_bias=False`, `classifier="token"` (the class token after the final LayerNorm)
  and `num_classes=embed_dim` with `head_bias=False, head_kernel_init="normal"` as the projection.
  """
  num_classes: Optional[int]
  patches: Any  # ConfigDict/dict with `size`, as upstream: patches.size = (16, 16)
  transformer: Any  # num_layers, mlp_dim, num_heads, dropout_rate, attention_dropout_rate, ...
  hidden_size: int
  representation_size: Optional[int] = None
  patch_embedding_bias: bool = True  # CLIP's patch embedding has none
  classifier: str = "token"  # token | gap | map | unpooled
  head_bias_init: float = 0.0
  head_bias: bool = True  # CLIP's projection has none
  head_kernel_init: str = "zeros"  # zeros | normal (see head_kernel_initializer)
  pre_norm: bool = False  # CLIP's ln_pre: LayerNorm after the position embedding
  approximate_gelu: bool = True
  mlp_activation: str = "gelu"  # gelu | quick_gelu
  layernorm_epsilon: float = 1e-6
  remat: bool = False
  remat_policy: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if self.classifier not in ("token", "gap", "map", "unpooled", "token_unpooled"):
      raise ValueError(f"Unknown classifier {self.classifier!r}: expected token, gap, map or "
                       "unpooled.")
    patch = _pair(self.patches["size"])
    height, width = images.shape[1:3]
    if height % patch[0] or width % patch[1]:
      raise ValueError(f"Image size {(height, width)} is not divisible by patch size {patch}.")
    x = PatchEmbedding(self.hidden_size, patch, use_bias=self.patch_embedding_bias,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(images)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    if self.classifier in ("token", "token_unpooled"):
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)

    t = dict(self.transformer)
    x = Encoder(
        num_layers=t["num_layers"], mlp_dim=t["mlp_dim"], num_heads=t["num_heads"],
        dropout_rate=t.get("dropout_rate", 0.0),
        attention_dropout_rate=t.get("attention_dropout_rate", 0.0),
        stochastic_depth=t.get("stochastic_depth", 0.0), approximate_gelu=self.approximate_gelu,
        mlp_activation=self.mlp_activation, layernorm_epsilon=self.layernorm_epsilon,
        pre_norm=self.pre_norm, remat=self.remat, remat_policy=self.remat_policy, dtype=self.dtype,
        param_dtype=self.param_dtype, name="Transformer")(x, train=train)

    if self.classifier == "token":
      x = x[:, 0]
    elif self.classifier == "gap":
      x = jnp.mean(x, axis=1)
    elif self.classifier == "map":
      x = MAPHead(num_heads=t["num_heads"], mlp_dim=t["mlp_dim"],
                  approximate_gelu=self.approximate_gelu, mlp_activation=self.mlp_activation,
                  layernorm_epsilon=self.layernorm_epsilon, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="MAPHead_0")(x)
    else:  # unpooled: every token, for dense heads (OWL-ViT).
      return x

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="pre_logits")(x)
      x = jnp.tanh(x)
    if self.num_classes is None:
      return x
    logits = nn.Dense(self.num_classes, use_bias=self.head_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=head_kernel_initializer(self.head_kernel_init),
                      bias_init=nn.initializers.constant(self.head_bias_init), name="head")(x)
    # Loss and metrics always see fp32 logits, whatever the compute dtype.
    return logits.astype(jnp.float32)


def posemb_grid(model_config, image_size) -> Tuple[int, int]:
  """The (rows, cols) patch grid a model config gives at `image_size` (int or (h, w))."""
  h, w = _pair(image_size)
  ph, pw = _pair(model_config.patches.size)
  return h // ph, w // pw


def input_shape(params, model_config) -> Tuple[int, int, int]:
  """(height, width, channels) of the images a ViT's params were made for: the channels from the
  patch embedding, the size from the position embeddings (a square grid; a non-square model's
  size is not recoverable from its params, so callers let the user give it)."""
  ph, pw = _pair(model_config.patches.size)
  channels = int(params["embedding"]["kernel"].shape[2])
  tokens = int(params["Transformer"]["posembed_input"]["pos_embedding"].shape[1])
  tokens -= 1 if "cls" in params else 0
  side = int(round(tokens ** 0.5))
  if side * side != tokens:
    raise ValueError(f"The position embeddings hold {tokens} patch tokens, not a square grid: "
                     "give the image size explicitly.")
  return side * ph, side * pw, channels
