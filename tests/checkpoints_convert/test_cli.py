"""python -m vit_jax.checkpoints_convert: HF -> npz (resized) -> HF, against transformers."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

from tests.checkpoints_convert import helpers  # pylint: disable=g-import-not-at-top
from vit_jax.checkpoints_convert import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_hf_to_npz_to_hf(tmp_path, capsys):
  # .npz records no activation: upstream files mean tanh gelu and LayerNorm eps 1e-6, so the
  # HF model of this chain computes the same.
  hf = helpers.hf_model(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  hf.save_pretrained(tmp_path / "hf")

  assert cli.main([str(tmp_path / "hf"), str(tmp_path / "x.npz"), "--model", "b16"]) == 1
  assert "does not match the checkpoint" in capsys.readouterr().err

  rc = cli.main([str(tmp_path / "hf"), str(tmp_path / "ckpt.npz"), "--image-size", "24",
                 "--resize-method", "bicubic"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "detected: HF transformers" in out
  assert "resized position embeddings from grid 4x4 to 6x6 (bicubic)" in out
  n = sum(p.numel() for p in hf.parameters()) + (36 - 16) * 32  # 20 more position rows
  assert f"parameters: {n:,}" in out

  # The real entry point, npz -> HF directory.
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "vit_jax.checkpoints_convert",
                         str(tmp_path / "ckpt.npz"), str(tmp_path / "out")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "detected: upstream .npz" in proc.stdout
  again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
  x = helpers.images(24, 24)
  diff = helpers.max_diff(helpers.hf_logits(again, x),
                          helpers.hf_logits(hf, x, interpolate_pos_encoding=True))
  print(f"parity CLI HF(16px) -> npz(24px, bicubic) -> HF vs HF interpolate_pos_encoding: "
        f"{diff:.2e}")
  assert diff <= 1e-5
