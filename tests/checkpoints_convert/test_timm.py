"""timm `vit_*` state dicts.

timm itself does not import beside torch 2.13+cpu (it needs torchvision, whose PyPI wheel for
2.13 needs CUDA libraries; see ../shared/known-good-versions.txt), so:
- the always-run tests build a timm-format state dict from an HF model by inverting transformers'
  own timm->HF conversion script, and compare our logits with that HF model;
- the tests against timm's VisionTransformer and its npz loader run where `import timm` works.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
pytest.importorskip("transformers", reason="transformers not installed")

from tests.checkpoints_convert import helpers  # pylint: disable=g-import-not-at-top
from vit_jax import checkpoints_convert


def _timm():
  try:
    import timm  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  # torchvision op registration errors too
    pytest.skip(f"timm does not import here ({type(e).__name__}: {e}). It is not in the test "
                "extras on purpose: it needs torchvision, which does not import beside the pinned "
                "CPU torch 2.13.0; run these in the torch 2.14.1 + torchvision 0.29.1 + timm venv "
                "of the README's Testing section")
  return timm


@pytest.mark.parametrize("file", ["safetensors", "pth_wrapped"])
def test_timm_state_dict_matches_hf(tmp_path, file):
  hf = helpers.hf_model(layer_norm_eps=1e-6)  # timm's LayerNorm epsilon
  sd = helpers.timm_state_dict(hf)
  if file == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path))
  else:  # a timm training checkpoint: {'state_dict': ..., 'epoch': ...} with DDP's 'module.'
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()},
                "epoch": 3}, path)
  with pytest.raises(checkpoints_convert.CheckpointError, match="number of attention heads"):
    checkpoints_convert.read(str(path))  # timm files omit heads; width 32 is no upstream size
  ckpt = checkpoints_convert.read(str(path), num_heads=4)
  assert ckpt.format == "timm"
  config = ckpt.model_config()
  params = checkpoints_convert.load(str(path), config)
  x = helpers.images(16, 16)
  diff = helpers.max_diff(helpers.apply(params, config, x), helpers.hf_logits(hf, x))
  print(f"parity timm-format {file}: {diff:.2e}")
  assert diff <= 1e-5


def test_timm_no_embed_class_and_unsupported_features(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  hf = helpers.hf_model(layer_norm_eps=1e-6)
  with torch.no_grad():
    hf.vit.embeddings.position_embeddings[:, 0] = 0
  sd = helpers.timm_state_dict(hf)
  sd["pos_embed"] = sd["pos_embed"][:, 1:]  # timm no_embed_class=True layout
  save_file(sd, str(tmp_path / "a.safetensors"))
  config = helpers.model_config(hf.config)
  params = checkpoints_convert.load(str(tmp_path / "a.safetensors"), config)
  x = helpers.images(16, 16)
  assert helpers.max_diff(helpers.apply(params, config, x), helpers.hf_logits(hf, x)) <= 1e-5

  sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
  sd["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
  save_file(sd, str(tmp_path / "b.safetensors"))
  with pytest.raises(checkpoints_convert.CheckpointMismatchError) as e:
    checkpoints_convert.load(str(tmp_path / "b.safetensors"), config)
  msg = str(e.value)
  assert "detected format: timm" in msg and "unexpected" in msg and "fc_norm.weight" in msg
  assert "missing (in the model, not in the checkpoint): Transformer/encoder_norm/scale" in msg
  assert "fc_norm=False" in msg and "layer scale" in msg


_VARIANTS = {
    "token": dict(global_pool="token"),
    "gap": dict(global_pool="avg", class_token=False, fc_norm=False),
    "no_embed_class": dict(global_pool="token", no_embed_class=True),
}


def _timm_vit(timm, variant, img_size=16, perturb=True):
  torch.manual_seed(0)
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=img_size, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
      num_classes=5, **_VARIANTS[variant]).eval()
  if perturb:
    with torch.no_grad():
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.2)
  return model


def _run(model, x_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_against_timm_vision_transformer(tmp_path, variant):
  timm = _timm()
  model = _timm_vit(timm, variant)
  torch.save(model.state_dict(), tmp_path / "timm.pth")
  config = checkpoints_convert.read(str(tmp_path / "timm.pth"), num_heads=4).model_config()
  assert config.classifier == ("gap" if variant == "gap" else "token")
  params = checkpoints_convert.load(str(tmp_path / "timm.pth"), config)
  x = helpers.images(16, 16)
  ref = _run(model, x)
  assert helpers.max_diff(helpers.apply(params, config, x), ref) <= 1e-5

  # Our exported .npz through timm's own npz loader gives timm's logits back.
  checkpoints_convert.export_npz(params, str(tmp_path / "ours.npz"))
  again = _timm_vit(timm, "gap" if variant == "gap" else "token", perturb=False)
  load_npz = timm.models.vision_transformer._load_weights  # pylint: disable=protected-access
  load_npz(again, str(tmp_path / "ours.npz"))
  assert helpers.max_diff(_run(again, x), ref) <= 1e-5


def test_resize_matches_timm_checkpoint_filter_fn(tmp_path):
  """timm resamples position embeddings on load with bicubic + antialias: our
  'bicubic_antialias'. (HF's plain 'bicubic' differs from it by ~1e-2 in logits.)"""
  timm = _timm()
  model = _timm_vit(timm, "token")
  sd = model.state_dict()
  torch.save(sd, tmp_path / "timm.pth")
  bigger = _timm_vit(timm, "token", img_size=24, perturb=False)
  bigger.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(sd, bigger))
  config = checkpoints_convert.read(str(tmp_path / "timm.pth"), num_heads=4).model_config()
  params = checkpoints_convert.load(str(tmp_path / "timm.pth"), config, image_size=24,
                                    resize_method="bicubic_antialias")
  x = helpers.images(24, 24)
  assert helpers.max_diff(helpers.apply(params, config, x), _run(bigger, x)) <= 1e-5
