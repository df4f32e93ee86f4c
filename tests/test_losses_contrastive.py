"""CLIP InfoNCE and SigLIP losses: against brute-force numpy and PyTorch, and over 8 devices."""
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import losses
from vit_jax import parallel

N_DEV = 8


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeds(n=12, d=6, seed=0):
  rng = np.random.RandomState(seed)
  img = _unit(rng.randn(n, d)).astype(np.float32)
  # Texts correlated with their images, so accuracies are neither 0 nor 1.
  txt = _unit(img + 0.9 * rng.randn(n, d)).astype(np.float32)
  return img, txt


# --- Independent references --------------------------------------------------------------------


def _np_infonce(img, txt, log_scale):
  """Brute force, float64: cross-entropy row by row with a hand-written logsumexp."""
  img, txt = img.astype(np.float64), txt.astype(np.float64)
  scale = math.exp(min(log_scale, math.log(100.0)))
  n = img.shape[0]

  def xent(a, b):
    total = 0.0
    for i in range(n):
      z = [scale * float(np.dot(a[i], b[j])) for j in range(n)]
      m = max(z)
      total += m + math.log(sum(math.exp(zj - m) for zj in z)) - z[i]
    return total / n

  return 0.5 * (xent(img, txt) + xent(txt, img))


def _np_siglip(img, txt, log_scale, bias):
  img, txt = img.astype(np.float64), txt.astype(np.float64)
  scale, n, total = math.exp(log_scale), img.shape[0], 0.0
  for i in range(n):
    for j in range(n):
      x = (1.0 if i == j else -1.0) * (scale * float(np.dot(img[i], txt[j])) + bias)
      # log_sigmoid(x) = -log(1 + e^-x), written stably for either sign of x.
      total += -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
  return -total / n


def test_infonce_matches_brute_force_and_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  img, txt = _embeds()
  log_scale = math.log(1 / 0.07)
  loss_fn = jax.jit(jax.value_and_grad(losses.contrastive_loss, argnums=(0, 1, 2), has_aux=True))
  (loss, metrics), grads = loss_fn(img, txt, jnp.float32(log_scale))
  np.testing.assert_allclose(loss, _np_infonce(img, txt, log_scale), rtol=1e-5)

  # PyTorch's cross_entropy on the same logits, and its autograd for the gradients.
  ti = torch.tensor(img, dtype=torch.float64, requires_grad=True)
  tt = torch.tensor(txt, dtype=torch.float64, requires_grad=True)
  ts = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
  logits = ts.exp() * ti @ tt.T
  target = torch.arange(len(img))
  tloss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
  tloss.backward()
  np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
  for g, tg in zip(grads, (ti.grad, tt.grad, ts.grad)):
    np.testing.assert_allclose(g, tg.numpy(), rtol=1e-4, atol=1e-6)

  logits = logits.detach().numpy()
  np.testing.assert_allclose(metrics["i2t_top1"], np.mean(logits.argmax(1) == np.arange(12)))
  np.testing.assert_allclose(metrics["t2i_top1"], np.mean(logits.argmax(0) == np.arange(12)))
  assert 0 < metrics["i2t_top1"] < 1 and 0 < metrics["t2i_top1"] < 1
  np.testing.assert_allclose(metrics["scale"], 1 / 0.07, rtol=1e-6)


def test_infonce_clamps_the_scale_at_100():
  img, txt = _embeds()
  fn = jax.jit(jax.value_and_grad(lambda s: losses.contrastive_loss(img, txt, s), has_aux=True))
  log_scales = jnp.float32([math.log(500.0), math.log(100.0), math.log(20.0)])
  (loss, metrics), grad = jax.vmap(fn)(log_scales)
  np.testing.assert_allclose(loss[0], loss[1], rtol=1e-6)
  np.testing.assert_allclose(loss[0], _np_infonce(img, txt, math.log(500.0)), rtol=1e-5)
  np.testing.assert_allclose(metrics["scale"], [100.0, 100.0, 20.0], rtol=1e-5)
  assert grad[0] == 0.0 and grad[2] != 0.0
  unclamped = jax.jit(functools.partial(losses.contrastive_loss, max_log_scale=None))(
      img, txt, log_scales[0])
  np.testing.assert_allclose(unclamped[1]["scale"], 500.0, rtol=1e-5)


def test_siglip_matches_brute_force_and_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  img, txt = _embeds(seed=1)
  log_scale, bias = math.log(10.0), -3.0
  loss_fn = jax.jit(jax.value_and_grad(losses.siglip_loss, argnums=(0, 1, 2, 3), has_aux=True))
  (loss, metrics), grads = loss_fn(img, txt, jnp.float32(log_scale), jnp.float32(bias))
  np.testing.assert_allclose(loss, _np_siglip(img, txt, log_scale, bias), rtol=1e-5)

  # BCE-with-logits with 0/1 targets is -log_sigmoid(+-logits): the same loss, summed / n.
  ti = torch.tensor(img, dtype=torch.float64, requires_grad=True)
  tt = torch.tensor(txt, dtype=torch.float64, requires_grad=True)
  ts = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
  tb = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
  logits = ts.exp() * ti @ tt.T + tb
  tloss = F.binary_cross_entropy_with_logits(
      logits, torch.eye(12, dtype=torch.float64), reduction="sum") / 12
  tloss.backward()
  np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
  for g, tg in zip(grads, (ti.grad, tt.grad, ts.grad, tb.grad)):
    np.testing.assert_allclose(g, tg.numpy(), rtol=1e-4, atol=1e-6)
  logits = logits.detach().numpy()
  np.testing.assert_allclose(metrics["i2t_top1"], np.mean(logits.argmax(1) == np.arange(12)))
  np.testing.assert_allclose(metrics["t2i_top1"], np.mean(logits.argmax(0) == np.arange(12)))
  np.testing.assert_allclose(metrics["bias"], bias)


def test_shape_errors_are_clear():
  img, txt = _embeds()
  with pytest.raises(ValueError, match=r"\[batch, width\]; found \(12, 6\) and \(11, 6\)"):
    losses.contrastive_loss(img, txt[:11], 0.0)
  with pytest.raises(ValueError, match=r"siglip_loss"):
    losses.siglip_loss(img[0], txt[0], 0.0, 0.0)
  with pytest.raises(ValueError, match=r"logit_scale: expected a scalar; found shape \(1,\)"):
    losses.contrastive_loss(img, txt, jnp.zeros(1))


# --- 8 devices: global batch, same loss and gradients as one device ----------------------------
#
# A tiny "model": two linear projections, then L2 normalisation, in front of the loss, so the
# gradients w.r.t. params pass through the gathered embeddings as in a real dual encoder.


def _model_loss(name, params, batch, axis_name=None):
  def embed(x, w):
    z = x @ w
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  img = embed(batch["image"], params["img_proj"])
  txt = embed(batch["text"], params["txt_proj"])
  if name == "contrastive":
    return losses.contrastive_loss(img, txt, params["logit_scale"], axis_name=axis_name)
  return losses.siglip_loss(img, txt, params["logit_scale"], params["logit_bias"],
                            axis_name=axis_name)


def _model_setup(n=4 * N_DEV, d_in=5, d=6):
  rng = np.random.RandomState(2)
  image = rng.randn(n, d_in).astype(np.float32)
  batch = {"image": image, "text": (image @ rng.randn(d_in, d_in) + 0.7 * rng.randn(n, d_in)
                                    ).astype(np.float32)}
  params = {"img_proj": (0.5 * rng.randn(d_in, d)).astype(np.float32),
            "txt_proj": (0.5 * rng.randn(d_in, d)).astype(np.float32),
            "logit_scale": np.float32(math.log(5.0)), "logit_bias": np.float32(-2.0)}
  return params, batch


@functools.lru_cache(maxsize=None)
def _one_device_model(name):
  """One device on the whole batch: ((loss, metrics), grads w.r.t. params), computed once."""
  params, batch = _model_setup()
  grad_fn = jax.value_and_grad(functools.partial(_model_loss, name), has_aux=True)
  return jax.device_get(jax.jit(grad_fn)(params, batch))


def _embed_loss(name, img, txt, axis_name=None):
  scale, bias = np.float32(math.log(8.0)), np.float32(-1.0)
  if name == "contrastive":
    return losses.contrastive_loss(img, txt, scale, axis_name=axis_name)[0]
  return losses.siglip_loss(img, txt, scale, bias, axis_name=axis_name)[0]


def _embed_setup():
  rng = np.random.RandomState(3)
  img = _unit(rng.randn(4 * N_DEV, 6)).astype(np.float32)
  txt = _unit(img + rng.randn(*img.shape)).astype(np.float32)
  return img, txt


@functools.lru_cache(maxsize=None)
def _one_device_embed(name):
  """One device: (loss, (d loss / d image_embeds, d loss / d text_embeds)), computed once."""
  img, txt = _embed_setup()
  grad_fn = jax.value_and_grad(functools.partial(_embed_loss, name), argnums=(0, 1))
  return jax.device_get(jax.jit(grad_fn)(img, txt))


def _close(a, b, tol=1e-5):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a) == len(b), (len(a), len(b))
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _shard(x):
  """[global, ...] -> [devices, global / devices, ...] as pmap wants it."""
  return x.reshape((N_DEV, x.shape[0] // N_DEV) + x.shape[1:])


@pytest.mark.parametrize("name", ["contrastive", "siglip"])
def test_pmap_over_8_devices_equals_one_device(name):
  assert jax.device_count() == N_DEV
  params, batch = _model_setup()
  (loss, metrics), grads = _one_device_model(name)

  # As train.make_train_step under parallel.PmapBackend: per-device value_and_grad, then pmean.
  def step(p, b):
    out = jax.value_and_grad(_model_loss, argnums=1, has_aux=True)(name, p, b, parallel.AXIS)
    return lax.pmean(out, parallel.AXIS)

  replicate = lambda t: jax.tree.map(lambda x: np.broadcast_to(x, (N_DEV,) + np.shape(x)), t)
  (p_loss, p_metrics), p_grads = jax.pmap(step, axis_name=parallel.AXIS)(
      replicate(params), jax.tree.map(_shard, batch))
  first = lambda t: jax.tree.map(lambda x: x[0], t)
  _close((loss, metrics, grads), first((p_loss, p_metrics, p_grads)))
  # Every device agrees, and the metrics are not trivially 0 or 1.
  _close(p_loss, np.full(N_DEV, loss))
  assert 0 < metrics["i2t_top1"] < 1


@pytest.mark.parametrize("name", ["contrastive", "siglip"])
def test_pmap_embedding_gradients_equal_one_device(name):
  """Gradients w.r.t. the embeddings themselves, both ways the train step can see them."""
  img, txt = _embed_setup()
  loss = functools.partial(_embed_loss, name)
  ref_loss, ref_grads = _one_device_embed(name)

  # (1) Embeddings as replicated params (what a replicated model sees): each device takes its
  # rows, and the pmean of the per-device gradients is the one-device gradient.
  def replicated(i, t):
    n = i.shape[0] // N_DEV
    start = lax.axis_index(parallel.AXIS) * n
    rows = lambda x: lax.dynamic_slice_in_dim(x, start, n)
    out = jax.value_and_grad(lambda i, t: loss(rows(i), rows(t), parallel.AXIS),
                             argnums=(0, 1))(i, t)
    return lax.pmean(out, parallel.AXIS)

  rep = lambda x: np.broadcast_to(x, (N_DEV,) + x.shape)
  r_loss, r_grads = jax.pmap(replicated, axis_name=parallel.AXIS)(rep(img), rep(txt))
  _close((ref_loss, ref_grads), (r_loss[0], (r_grads[0][0], r_grads[1][0])))

  # (2) Embeddings sharded (each device's own rows as input): all_gather's transpose sums every
  # device's loss into each device's gradient, so it is N_DEV x the rows of d(mean loss).
  def sharded(i, t):
    return jax.grad(lambda i, t: loss(i, t, parallel.AXIS), argnums=(0, 1))(i, t)

  s_grads = jax.pmap(sharded, axis_name=parallel.AXIS)(_shard(img), _shard(txt))
  for g, ref in zip(s_grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g).reshape(ref.shape) / N_DEV, ref, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["contrastive", "siglip"])
def test_jit_with_sharded_batch_equals_one_device(name):
  params, batch = _model_setup()
  grad_fn = jax.value_and_grad(functools.partial(_model_loss, name), has_aux=True)
  ref = _one_device_model(name)

  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  sharded_batch = jax.device_put(batch, rows)
  assert len(sharded_batch["image"].sharding.device_set) == N_DEV
  out = jax.jit(grad_fn, in_shardings=(replicated, rows), out_shardings=replicated)(
      jax.device_put(params, replicated), sharded_batch)
  _close(ref, out)

  # Gradients w.r.t. the (sharded) embeddings themselves.
  img, txt = jax.device_put(_embed_setup(), rows)
  emb_grad = jax.value_and_grad(functools.partial(_embed_loss, name), argnums=(0, 1))
  _close(_one_device_embed(name), jax.jit(emb_grad, in_shardings=(rows, rows))(img, txt))
