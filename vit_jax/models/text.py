"""CLIP's causal text tower: token + position embedding, the ViT's encoder blocks made causal,
pooling at the end-of-text token, and a bias-free projection.

Param tree (the ViT's names where the parts are the same): `token_embedding/embedding`
[vocab, width], `Transformer/posembed_input/pos_embedding` [1, context_length, width],
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm` (CLIP's `ln_final`), `head/kernel`
[width, embed_dim] (CLIP's `text_projection`).
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.models import vit

Dtype = Any


class TextTransformer(nn.Module):
  """tokens: int [batch, tokens] (tokens <= context_length) -> [batch, embed_dim].

  The sequence is pooled at its end-of-text token, found as the argmax of the token ids: the EOT
  token has the largest id of CLIP's vocabulary, and OpenAI CLIP and HF `CLIPTextModel` pool the
  same way (the first EOT, if it repeats as padding). Attention is causal, so whatever follows
  the EOT (padding) does not change the pooled features. With `embed_dim=None` the pooled
  `[batch, width]` features are returned unprojected.
  """
  embed_dim: Optional[int]
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  vocab_size: int = 49408
  context_length: int = 77
  mlp_activation: str = "quick_gelu"  # gelu | quick_gelu
  approximate_gelu: bool = False  # for mlp_activation="gelu": tanh form (True) or erf (False)
  layernorm_epsilon: float = 1e-5
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  remat: bool = False
  remat_policy: Optional[str] = None  # a jax.checkpoint_policies name (vit.checkpoint_policy)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, return_tokens: bool = False):
    """Returns the pooled (projected) features [batch, embed_dim]; with `return_tokens`, also
    every token after the final LayerNorm: ([batch, embed_dim], [batch, tokens, width])."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"Text tokens: expected integer ids [batch, tokens], found "
                       f"{tokens.dtype}{list(tokens.shape)}.")
    if tokens.shape[1] > self.context_length:
      raise ValueError(f"Text tokens: {tokens.shape[1]} per sequence, more than the model's "
                       f"context_length {self.context_length}.")
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 dtype=self.dtype, param_dtype=self.param_dtype, name="token_embedding")(tokens)
    x = vit.Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, approximate_gelu=self.approximate_gelu,
        mlp_activation=self.mlp_activation, layernorm_epsilon=self.layernorm_epsilon,
        posemb_length=self.context_length, is_causal=True, remat=self.remat,
        remat_policy=self.remat_policy, dtype=self.dtype,
        param_dtype=self.param_dtype, name="Transformer")(x, train=train)
    eot = jnp.argmax(tokens, axis=-1)  # the first maximum, as torch's argmax
    pooled = x[jnp.arange(x.shape[0]), eot]  # [batch, width]
    if self.embed_dim is not None:
      pooled = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=vit.head_kernel_initializer("normal"), name="head")(pooled)
      # Losses and similarity logits always see fp32 features, whatever the compute dtype.
      pooled = pooled.astype(jnp.float32)
    return (pooled, x) if return_tokens else pooled
