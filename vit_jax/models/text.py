"""CLIP's causal text tower: token + position embedding, the ViT's encoder blocks made causal,
pooling at the end-of-text token, and a bias-free projection.

Param tree (the ViT's names where the parts are the same): `token_embedding/embedding`
[vocab, width], `Transformer/posembed_input/pos_embedding` [1, context_length, width],
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm` (CLIP's `ln_final`), `head/kernel`
[width, embed_dim] (CLIP's `text_projection`) and, with `extra_tokens > 0`,
`extra_token_embedding/embedding` [extra_tokens, width] (the embeddings of ids >= vocab_size).
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

  Added vocabulary (domain words given ids above CLIP's EOT id 49407) breaks argmax pooling, so
  `eot_token_id` (an int) pools at the FIRST position holding that id instead (a row without it
  pools at position 0). `extra_tokens > 0` adds a second table, `extra_token_embedding`
  [extra_tokens, width], for ids vocab_size .. vocab_size + extra_tokens - 1: a separate param so
  that an optimizer group can train it while `token_embedding` stays frozen.
  """
  embed_dim: Optional[int]
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  vocab_size: int = 49408
  context_length: int = 77
  eot_token_id: Optional[int] = None  # None: pool at the argmax id (CLIP); int: first such id
  extra_tokens: int = 0  # ids >= vocab_size, embedded by `extra_token_embedding`
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
    embed = lambda n, name: nn.Embed(n, self.width, embedding_init=nn.initializers.normal(0.02),
                                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.extra_tokens > 0:
      extra = tokens >= self.vocab_size
      base = embed(self.vocab_size, "token_embedding")(jnp.where(extra, 0, tokens))
      new = embed(self.extra_tokens, "extra_token_embedding")(
          jnp.clip(tokens - self.vocab_size, 0, self.extra_tokens - 1))
      x = jnp.where(extra[..., None], new, base)
    else:
      x = embed(self.vocab_size, "token_embedding")(tokens)
    x = vit.Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, approximate_gelu=self.approximate_gelu,
        mlp_activation=self.mlp_activation, layernorm_epsilon=self.layernorm_epsilon,
        posemb_length=self.context_length, is_causal=True, remat=self.remat,
        remat_policy=self.remat_policy, dtype=self.dtype,
        param_dtype=self.param_dtype, name="Transformer")(x, train=train)
    if self.eot_token_id is None:
      eot = jnp.argmax(tokens, axis=-1)  # the first maximum, as torch's argmax
    else:
      eot = jnp.argmax(tokens == self.eot_token_id, axis=-1)  # the first match (0 if none)
    # take_along_axis rather than x[arange(batch), eot]: no array of the batch size, so the
    # function stays shape-polymorphic for exports with a dynamic batch.
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]  # [batch, width]
    if self.embed_dim is not None:
      pooled = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=vit.head_kernel_initializer("normal"), name="head")(pooled)
      # Losses and similarity logits always see fp32 features, whatever the compute dtype.
      pooled = pooled.astype(jnp.float32)
    return (pooled, x) if return_tokens else pooled
