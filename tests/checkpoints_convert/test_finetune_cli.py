"""Fine-tuning through `python -m vit_jax.main` from a converted checkpoint.

A tiny HF ViT is trained for a few seconds in torch on Fashion-MNIST (the Debian
dataset-fashion-mnist files the demo config reads), saved with save_pretrained, and given to
the trainer as `--config.pretrained_path`; its first training step must have a lower loss than
from scratch. From scratch, the ViT's zero-initialised head gives uniform logits, so the first
step's loss is ln(10) on any data (checked below on the fresh model, which is cheaper than a
second run of the trainer).
"""
import gzip
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

from tests.conftest import TEST_XLA_FLAGS  # pylint: disable=g-import-not-at-top
from vit_jax.configs import models as model_configs  # pylint: disable=g-import-not-at-top
from vit_jax.configs import vit as vit_configs  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = vit_configs.FASHION_MNIST_DIR


def _idx(name):
  with gzip.open(os.path.join(DATA, name)) as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _pretrain_hf(out_dir):
  """nano4's architecture in HF (tanh gelu, eps 1e-6, 1 channel), 200 Adam steps (~5 s)."""
  torch.manual_seed(0)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: more threads only contend for the 2 cores
  config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      patch_size=4, image_size=28, num_channels=1, num_labels=10,
      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  model = transformers.ViTForImageClassification(config)
  images = torch.from_numpy(_idx("train-images-idx3-ubyte.gz")[-20_000:].copy())
  labels = torch.from_numpy(_idx("train-labels-idx1-ubyte.gz")[-20_000:].astype(np.int64))
  opt = torch.optim.Adam(model.parameters(), lr=1e-2)
  gen = torch.Generator().manual_seed(0)
  losses = []
  for _ in range(200):
    idx = torch.randint(0, len(images), (64,), generator=gen)
    x = images[idx][:, None].float() / 127.5 - 1  # the config's value_range(-1, 1)
    loss = torch.nn.functional.cross_entropy(model(x).logits, labels[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
  torch.set_num_threads(threads)
  model.save_pretrained(out_dir)
  return float(np.mean(losses[-20:]))


def _first_loss(output):
  m = re.search(r"step 1/\d+ .*?\bloss=([\d.]+)", output)
  assert m, output[-3000:]
  return float(m.group(1))


@pytest.mark.skipif(not os.path.exists(DATA), reason=f"{DATA} missing (apt-get install "
                    "dataset-fashion-mnist)")
def test_finetune_from_hf_checkpoint_starts_lower(tmp_path):
  pretrain_loss = _pretrain_hf(tmp_path / "hf")
  assert pretrain_loss < 1.6, pretrain_loss
  flags = ["--config=vit_jax/configs/vit.py:nano4,fashion_mnist", "--config.total_steps=2",
           "--config.plots=False",
           "--config.batch=64", "--config.batch_eval=256", "--config.train_split=train[:512]",
           "--config.eval_split=test[:256]", "--config.log_every_steps=1",
           "--config.warmup_steps=1", "--config.checkpoint_every_steps=0",
           f"--config.pretrained_path={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}"]
  # One CPU device is plenty for 2 steps; the suite's fast-compile flags (tests/conftest.py).
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS)
  proc = subprocess.run([sys.executable, "-m", "vit_jax.main"] + flags, cwd=ROOT, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "checkpoints_convert: loaded" in proc.stdout
  assert "kept the checkpoint's head" in proc.stdout
  pretrained = _first_loss(proc.stdout)

  # From scratch: the same model config's fresh params give all-zero logits.
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = vit_configs.get_config("nano4,fashion_mnist")
  model = vit.VisionTransformer(num_classes=10, **model_configs.model_kwargs(config.model))
  x = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(config.seed), x)["params"]
  np.testing.assert_array_equal(model.apply({"params": params}, x), 0.0)
  scratch = float(np.log(10))  # cross-entropy of uniform logits, with or without smoothing
  print(f"first-step loss: from scratch {scratch:.3f}, from the converted HF checkpoint "
        f"{pretrained:.3f}")
  assert pretrained < scratch - 0.4
