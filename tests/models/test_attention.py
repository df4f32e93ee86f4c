"""models/attention.py against a numpy softmax(q k^T / sqrt(d)) v and jax.nn.dot_product_attention:
every implementation, with and without a padding mask, causal, and the dropout fallback."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import attention


def _numpy_attention(q, k, v, mask=None):
  """[b, t, h, d] float64 reference, written independently of the code under test."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def _qkv(b=3, tq=7, tk=7, h=2, d=8, seed=0):
  rng = np.random.RandomState(seed)
  return tuple(jnp.asarray(rng.randn(b, t, h, d).astype(np.float32)) for t in (tq, tk, tk))


@pytest.mark.parametrize("impl", [None, "xla", "explicit"])
def test_matches_numpy_no_mask(impl):
  q, k, v = _qkv()
  got = attention.dot_product_attention(q, k, v, implementation=impl)
  assert got.shape == q.shape
  np.testing.assert_allclose(got, _numpy_attention(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", [None, "xla", "explicit"])
def test_matches_numpy_with_padding_mask_and_causal(impl):
  q, k, v = _qkv(tq=5, tk=5)
  valid = np.array([5, 3, 1])  # keys past each row's length are padding
  mask = (np.arange(5)[None, :] < valid[:, None])[:, None, None, :]  # [b, 1, 1, kv]
  got = attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation=impl)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), atol=1e-5, rtol=0)
  causal = np.tril(np.ones((5, 5), bool))[None, None]
  got = attention.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, causal), atol=1e-5, rtol=0)
  got = attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask), is_causal=True,
                                        implementation=impl)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask & causal), atol=1e-5, rtol=0)


def test_agrees_with_jax_nn_dot_product_attention():
  q, k, v = _qkv(tq=9, tk=9, h=3, d=16, seed=1)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  got = attention.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_gradients_match_explicit_form():
  q, k, v = _qkv(seed=2)
  loss = lambda impl: lambda q, k, v: jnp.sum(
      jnp.sin(attention.dot_product_attention(q, k, v, is_causal=True, implementation=impl)))
  fast = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss("explicit"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(fast, ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bf16_keeps_the_softmax_in_fp32():
  q, k, v = _qkv(seed=3)
  got = attention.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), _numpy_attention(q, k, v), atol=3e-2)


def test_dropout_only_in_training_and_unbiased():
  q, k, v = _qkv(b=2, tq=6, tk=6, seed=4)
  det = attention.dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=True)
  np.testing.assert_allclose(det, _numpy_attention(q, k, v), atol=1e-5, rtol=0)
  draw = jax.jit(jax.vmap(lambda key: attention.dot_product_attention(
      q, k, v, dropout_rate=0.5, deterministic=False, dropout_rng=key)))
  outs = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 2000)))
  assert not np.allclose(outs[0], outs[1])
  # Inverted dropout keeps the expectation: the mean over 2000 draws is the clean output up to
  # sampling noise (per-element std of one draw is below 1.5 here, so 5 sigma < 0.17).
  np.testing.assert_allclose(outs.mean(0), det, atol=0.17)
  assert np.abs(outs.mean(0) - det).mean() < 0.03


def test_unknown_implementation_is_an_error():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    attention.dot_product_attention(q, k, v, implementation="flash")
