"""Files that would run code are refused before anything runs; torch stays optional."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vit_jax import checkpoints_convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Payload:
  """Unpickling this calls open(marker, 'w'): the file appearing means code ran."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path):
  torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
  marker = str(tmp_path / "pwned")
  legacy = tmp_path / "legacy.bin"  # a plain pickle, as torch.load reads legacy files
  with open(legacy, "wb") as f:
    pickle.dump({"patch_embed.proj.weight": _Payload(marker)}, f, protocol=2)
  zipped = tmp_path / "zipped.pth"  # torch.save's zip format
  torch.save({"patch_embed.proj.weight": _Payload(marker)}, zipped)
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  torch.save({"vit.embeddings.cls_token": _Payload(marker)}, hf_dir / "pytorch_model.bin")

  for path in (legacy, zipped, hf_dir):
    with pytest.raises(checkpoints_convert.UnsafeCheckpointError, match="refused"):
      checkpoints_convert.read(str(path))
    assert not os.path.exists(marker), f"{path}: the payload ran"

  # The payloads are live: an unrestricted unpickler does create the marker.
  torch.load(zipped, weights_only=False)
  assert os.path.exists(marker)


def test_malicious_torchscript_is_refused_by_load_model_and_nothing_runs(tmp_path, monkeypatch):
  """A TorchScript archive (OpenAI's CLIP `.pt` format) with a payload in its data.pkl, at the
  root or among a module's attributes: `load_model`, `read` and an HF directory holding it refuse
  it naming the global, and neither torch.load nor torch.jit.load (which would run the archive's
  code) is called."""
  torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
  import types  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  marker = str(tmp_path / "pwned")
  good = tmp_path / "good.pt"  # a real archive, as torch.jit.save writes one
  torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(good))
  # data.pkl as TorchScript writes it (GLOBAL '__torch__.<module> <class>', then its attributes).
  fake = types.ModuleType("__torch__")
  fake.Linear = type("Linear", (), {"__module__": "__torch__"})
  monkeypatch.setitem(sys.modules, "__torch__", fake)
  module = fake.Linear()
  module.__dict__.update(training=False, weight=_Payload(marker))
  payloads = {"root": pickle.dumps(_Payload(marker), protocol=2),
              "attribute": pickle.dumps(module, protocol=2)}
  assert all(b"io\nopen" in p for p in payloads.values())

  def forbidden(*args, **kwargs):
    raise AssertionError("torch.load / torch.jit.load called on a TorchScript archive")

  monkeypatch.setattr(torch, "load", forbidden)
  monkeypatch.setattr(torch.jit, "load", forbidden)
  for where, payload in payloads.items():
    hf_dir = tmp_path / f"hf_{where}"
    hf_dir.mkdir()
    bad = tmp_path / f"{where}.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
      for info in src.infolist():
        dst.writestr(info, payload if info.filename.endswith("/data.pkl") else src.read(info))
    (hf_dir / "pytorch_model.bin").write_bytes(bad.read_bytes())
    for load in (checkpoints_convert.load_model, checkpoints_convert.read):
      for path in (bad, hf_dir):
        with pytest.raises(checkpoints_convert.UnsafeCheckpointError,
                           match=r"refused\. Its TorchScript data\.pkl references the global "
                                 r"io\.open.*nothing from the file was run"):
          load(str(path))
        assert not os.path.exists(marker), f"{where} payload, {path}: it ran"

  # The payloads are live: an unrestricted unpickler does create the marker.
  pickle.loads(payloads["attribute"])
  assert os.path.exists(marker)


def test_no_torch_needed_for_npz_and_safetensors(tmp_path):
  """With torch unimportable, the package imports, and .npz and HF .safetensors load."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models as model_configs  # pylint: disable=g-import-not-at-top
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = model_configs.get_model_config("nano4")
  model = vit.VisionTransformer(num_classes=3, **model_configs.model_kwargs(config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes["params"])
  checkpoints_convert.export_npz(params, str(tmp_path / "a.npz"))
  checkpoints_convert.export_hf(params, config, str(tmp_path / "hf"))  # writes no torch either
  (tmp_path / "b.bin").write_bytes(b"\x80\x02}q\x00.")  # an (empty) torch pickle

  code = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # any `import torch` now raises ImportError
      import numpy as np
      from vit_jax import checkpoints_convert as cc
      a = cc.load({str(tmp_path / "a.npz")!r})
      b = cc.load({str(tmp_path / "hf")!r})
      assert cc.read({str(tmp_path / "hf")!r}).format == "HF transformers"
      try:
        cc.read({str(tmp_path / "b.bin")!r})
        raise SystemExit("a torch pickle loaded without torch")
      except cc.CheckpointError as e:
        assert "needs torch" in str(e), e
      assert sys.modules["torch"] is None and "transformers" not in sys.modules
      print(float(a["head"]["kernel"].sum()), float(b["head"]["kernel"].sum()))
  """)
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  sums = [float(v) for v in out.stdout.split()]
  expected = float(np.asarray(params["head"]["kernel"]).sum())
  np.testing.assert_allclose(sums, [expected, expected], rtol=1e-6)
