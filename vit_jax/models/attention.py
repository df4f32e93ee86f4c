"""The one attention function, used by every tower (ViT, CLIP text, OWL-ViT).

    dot_product_attention(q, k, v, mask=..., is_causal=..., ...) -> [batch, q_tokens, heads, head_dim]

q, k, v come as `[batch, tokens, heads, head_dim]` (the layout the fused QKV GEMM produces) and
the result has the same layout. The kernel is picked per platform:
- cuDNN flash attention on a GPU for bf16/fp16 inputs with a head_dim it supports;
- otherwise XLA, in the form that moves heads next to batch before the two dots (`[batch, heads,
  tokens, head_dim]`: each dot a plain batched GEMM). In the whole ViT-Ti/16 train step on CPU it
  measured as fast as the einsum form and faster than `jax.nn.dot_product_attention`'s XLA path
  (README, "Train-step speed"). The softmax runs in fp32 whatever the compute dtype.
Dropout on the attention weights needs the weights themselves, so `dropout_rate > 0` in training
falls back to the explicit form (`explicit_attention`), which is also the numerical reference.
"""
from typing import Optional

import jax
import jax.numpy as jnp

# head_dim values cuDNN's fused attention accepts (multiples of 8 up to 128; 256 on newer GPUs).
_CUDNN_MAX_HEAD_DIM = 128


def _combine_masks(mask: Optional[jnp.ndarray], is_causal: bool, q_len: int,
                   kv_len: int) -> Optional[jnp.ndarray]:
  """Boolean [batch or 1, heads or 1, q, kv] (True = attend) from a mask and/or causality."""
  if is_causal:
    causal = jnp.tril(jnp.ones((q_len, kv_len), jnp.bool_))[None, None]
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  return mask


def explicit_attention(q, k, v, *, mask=None, is_causal: bool = False, dropout_rate: float = 0.0,
                       dropout_rng=None, deterministic: bool = True):
  """softmax(q k^T / sqrt(d) + mask) v, written out. [batch, tokens, heads, head_dim] in and out.

  The reference for the fast paths, and the path that supports dropout on the weights.
  """
  dtype = q.dtype
  q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  mask = _combine_masks(mask, is_causal, q.shape[1], k.shape[1])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  # Softmax in fp32 even under bf16 compute: the row sums are where bf16 loses accuracy.
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _heads_major_attention(q, k, v, mask):
  """The XLA form that is fastest on CPU: heads moved next to batch before the two dots."""
  dtype = q.dtype
  q = jnp.swapaxes(q, 1, 2) * jnp.asarray(q.shape[-1] ** -0.5, dtype)  # [b, h, q, d]
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


def _use_cudnn(q) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= _CUDNN_MAX_HEAD_DIM)


def dot_product_attention(q, k, v, *, mask: Optional[jnp.ndarray] = None, is_causal: bool = False,
                          dropout_rate: float = 0.0, dropout_rng=None, deterministic: bool = True,
                          implementation: Optional[str] = None):
  """Multi-head attention core. q: [batch, q_tokens, heads, head_dim], k/v: [batch, kv_tokens,
  heads, head_dim], mask: boolean broadcastable to [batch, heads, q_tokens, kv_tokens] (True =
  attend). Returns [batch, q_tokens, heads, head_dim].

  implementation: None picks per platform (see the module docstring); "xla", "cudnn",
  "explicit" force one.
  """
  if not deterministic and dropout_rate > 0.0:
    return explicit_attention(q, k, v, mask=mask, is_causal=is_causal, dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng, deterministic=False)
  forced = implementation is not None
  if implementation is None:
    implementation = "cudnn" if _use_cudnn(q) else "xla"
  if implementation == "explicit":
    return explicit_attention(q, k, v, mask=mask, is_causal=is_causal)
  if implementation == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                          implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      if forced:
        raise
      # A shape, mask or GPU generation cuDNN's fused kernel does not take: XLA's form is exact.
  elif implementation != "xla":
    raise ValueError(f"Unknown attention implementation {implementation!r}: expected None, "
                     "'xla', 'cudnn' or 'explicit'.")
  return _heads_major_attention(q, k, v, _combine_masks(mask, is_causal, q.shape[1], k.shape[1]))
