"""Vision Transformer in Flax linen, with the upstream vision_transformer param names.

The param tree is exactly the one stored in the upstream/AugReg `.npz` files (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`, `pre_logits`,
`head`), so those files map on with no renaming. Attention kernels keep the `[width, heads,
head_dim]` layout on disk but are concatenated into one `[width, 3 * heads * head_dim]` GEMM at
trace time, which is what makes the step fast on CPU and GPU alike.
"""
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jnp.ndarray]


def _pair(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(x, int):
    return (x, x)
  x = tuple(int(v) for v in x)
  if len(x) != 2:
    raise ValueError(f"Expected an int or a pair (height, width), found {x!r}.")
  return x


def _gelu(approximate: bool) -> Callable[[jnp.ndarray], jnp.ndarray]:
  # Upstream trained with the tanh approximation (flax's default); HF/timm use the exact erf form.
  return lambda x: nn.gelu(x, approximate=approximate)


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
  """Transformer MLP: Dense_0 -> gelu -> dropout -> Dense_1 -> dropout."""
  mlp_dim: int
  dropout_rate: float = 0.0
  approximate_gelu: bool = True
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
    x = _gelu(self.approximate_gelu)(x)
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
  the causal text tower of CLIP uses it.
  """
  num_heads: int
  dropout_rate: float = 0.0
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
    x = x.astype(self.dtype)
    qkv = x @ qkv_kernel.astype(self.dtype) + qkv_bias.astype(self.dtype)
    qkv = qkv.reshape(batch, tokens, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]

    q = q * jnp.asarray(head_dim ** -0.5, self.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    # Softmax in fp32 even under bf16 compute: the row sums are where bf16 loses accuracy.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0.0:
      weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=False)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, heads * head_dim)
    return out @ ok.reshape(heads * head_dim, width).astype(self.dtype) + ob.astype(self.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block. x: [batch, tokens, width] -> [batch, tokens, width]."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = True
  layernorm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, deterministic: bool, mask: Optional[jnp.ndarray] = None):
    ln = lambda name: nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    x = ln("LayerNorm_0")(inputs)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, name="MultiHeadDotProductAttention_1")(
            x, deterministic=deterministic, mask=mask)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = DropPath(self.stochastic_depth, name="DropPath_0")(x, deterministic) + inputs
    y = ln("LayerNorm_2")(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="MlpBlock_3")(y, deterministic=deterministic)
    return x + DropPath(self.stochastic_depth, name="DropPath_1")(y, deterministic)


class Encoder(nn.Module):
  """Position embedding + N blocks + final LayerNorm. [batch, tokens, width] -> same shape."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = True
  layernorm_epsilon: float = 1e-6
  add_position_embedding: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, mask: Optional[jnp.ndarray] = None):
    if self.add_position_embedding:
      x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
      x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = x.astype(self.dtype)
    block_cls = Encoder1DBlock
    if self.remat:
      # Recompute activations in the backward pass: trades ~30% compute for O(1)-in-depth memory.
      block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,))
    for lyr in range(self.num_layers):
      # Stochastic depth grows linearly with depth, as in DeiT/AugReg.
      sd = self.stochastic_depth * lyr / max(self.num_layers - 1, 1)
      x = block_cls(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, stochastic_depth=sd,
          approximate_gelu=self.approximate_gelu, layernorm_epsilon=self.layernorm_epsilon,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"encoderblock_{lyr}")(
              x, not train, mask)
    return nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="encoder_norm")(x)


class AddPositionEmbs(nn.Module):
  """Learned position embedding `pos_embedding` [1, tokens, width], added to the input."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (1, x.shape[1], x.shape[2])
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    return x + pe.astype(x.dtype)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe attends over the tokens.

  x: [batch, tokens, width] -> [batch, width].
  """
  num_heads: int
  mlp_dim: int
  approximate_gelu: bool = True
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
    x = x + MlpBlock(self.mlp_dim, approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                     param_dtype=self.param_dtype)(y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier. images: [batch, height, width, 3] -> logits [batch, num_classes].

  With `num_classes=None` it is a feature extractor returning the pooled `[batch, width]`
  (pre-logits) representation; `classifier='unpooled'` returns all tokens
  `[batch, tokens, width]`.
  """
  num_classes: Optional[int]
  patches: Any  # ConfigDict/dict with `size`, as upstream: patches.size = (16, 16)
  transformer: Any  # num_layers, mlp_dim, num_heads, dropout_rate, attention_dropout_rate, ...
  hidden_size: int
  representation_size: Optional[int] = None
  classifier: str = "token"  # token | gap | map | unpooled
  head_bias_init: float = 0.0
  approximate_gelu: bool = True
  layernorm_epsilon: float = 1e-6
  remat: bool = False
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
    x = nn.Conv(self.hidden_size, patch, strides=patch, padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding")(images.astype(self.dtype))
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
        layernorm_epsilon=self.layernorm_epsilon, remat=self.remat, dtype=self.dtype,
        param_dtype=self.param_dtype, name="Transformer")(x, train=train)

    if self.classifier == "token":
      x = x[:, 0]
    elif self.classifier == "gap":
      x = jnp.mean(x, axis=1)
    elif self.classifier == "map":
      x = MAPHead(num_heads=t["num_heads"], mlp_dim=t["mlp_dim"],
                  approximate_gelu=self.approximate_gelu,
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
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros,
                      bias_init=nn.initializers.constant(self.head_bias_init), name="head")(x)
    # Loss and metrics always see fp32 logits, whatever the compute dtype.
    return logits.astype(jnp.float32)


def posemb_grid(model_config, image_size) -> Tuple[int, int]:
  """The (rows, cols) patch grid a model config gives at `image_size` (int or (h, w))."""
  h, w = _pair(image_size)
  ph, pw = _pair(model_config.patches.size)
  return h // ph, w // pw
