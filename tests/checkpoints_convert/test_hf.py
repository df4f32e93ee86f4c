"""HF transformers ViT <-> our ViT: logits parity (fp32, max |diff| <= 1e-5), export round trip."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

from tests.checkpoints_convert import helpers  # pylint: disable=g-import-not-at-top
from vit_jax import checkpoints_convert

TOL = 1e-5


def _check(params, config, x, ref, name):
  diff = helpers.max_diff(helpers.apply(params, config, x), ref)
  print(f"parity {name}: max|diff| = {diff:.2e}")
  assert diff <= TOL, (name, diff)


@pytest.mark.parametrize("file", ["safetensors", "sharded", "bin", "v5_names", "vitmodel_pooler"])
def test_logits_match_hf(tmp_path, file):
  hf = helpers.hf_model(layer_norm_eps=1e-12)
  x = helpers.images(16, 16)
  if file == "safetensors":
    hf.save_pretrained(tmp_path)  # writes the hub names (vit.encoder.layer.N.attention...)
    path = tmp_path
  elif file == "sharded":  # model.safetensors.index.json + several shards
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    path = tmp_path
  elif file == "bin":
    # An old-style HF file: a torch pickle of the hub-named state dict, beside its config.json.
    sd = {k: torch.from_numpy(v) for k, v in helpers.hf_state_dict(hf).items()}
    hf.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin"
  elif file == "v5_names":
    hf.save_pretrained(tmp_path, save_original_format=False)  # transformers 5 module names
    path = tmp_path
  else:
    hf = helpers.hf_model(cls="ViTModel")  # pooler (Dense + tanh) = our pre_logits
    hf.save_pretrained(tmp_path)
    path = tmp_path
  params = checkpoints_convert.load(path)  # the model config is inferred from config.json
  config = checkpoints_convert.read(path).model_config()
  assert config.approximate_gelu is False and config.layernorm_epsilon == hf.config.layer_norm_eps
  if file == "vitmodel_pooler":
    assert config.representation_size == 32 and "head" not in params
    with torch.no_grad():
      ref = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
    _check(params, config, x, ref, file)
  else:
    _check(params, config, x, helpers.hf_logits(hf, x), file)


@pytest.mark.parametrize("image_size", [(24, 24), (24, 32)])
def test_larger_image_matches_hf_interpolate_pos_encoding(tmp_path, image_size):
  """A 16px checkpoint run at a larger (also non-square) size: our bicubic resampling of the
  position embeddings, done once at load, against HF resampling them in its forward pass."""
  hf = helpers.hf_model()
  hf.save_pretrained(tmp_path)
  config = helpers.model_config(hf.config)
  params = checkpoints_convert.load(tmp_path, config, image_size=image_size,
                                    resize_method="bicubic")
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (
      1, 1 + image_size[0] // 4 * image_size[1] // 4, 32)
  x = helpers.images(*image_size)
  _check(params, config, x, helpers.hf_logits(hf, x, interpolate_pos_encoding=True),
         f"resize 16->{image_size}")


def test_non_square_checkpoint(tmp_path):
  hf = helpers.hf_model(image_size=(16, 24))  # a 4x6 grid, recorded in config.json
  hf.save_pretrained(tmp_path)
  params = checkpoints_convert.load(tmp_path)
  ckpt = checkpoints_convert.read(tmp_path)
  assert ckpt.grid == (4, 6)
  x = helpers.images(16, 24)
  _check(params, ckpt.model_config(), x, helpers.hf_logits(hf, x), "non-square 16x24")


def test_gap_pooling_against_hf_modules(tmp_path):
  """HF ViT has no gap head; the reference runs HF's own embedding, layers, final LayerNorm and
  classifier in torch on the patch tokens only, then averages."""
  hf = helpers.hf_model()
  hf.save_pretrained(tmp_path)
  config = helpers.model_config(hf.config, classifier="gap")
  params = checkpoints_convert.load(tmp_path, config)  # drops cls and its position row
  assert "cls" not in params
  x = helpers.images(16, 16)
  with torch.no_grad():
    v = hf.vit
    h = v.embeddings.patch_embeddings(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    h = h + v.embeddings.position_embeddings[:, 1:]
    for layer in v.layers:
      h = layer(h, None)
    ref = hf.classifier(v.layernorm(h).mean(1)).numpy()
  _check(params, config, x, ref, "gap")
  # And the gap model survives an upstream-npz round trip unchanged.
  checkpoints_convert.export_npz(params, tmp_path / "gap.npz")
  again = checkpoints_convert.load(tmp_path / "gap.npz", config)
  _check(again, config, x, ref, "gap via npz")


@pytest.mark.parametrize("approximate_gelu", [False, True])
def test_export_hf_round_trip(tmp_path, approximate_gelu):
  """Our params -> export_hf -> transformers' from_pretrained -> the same logits."""
  hf = helpers.hf_model(hidden_act="gelu_pytorch_tanh" if approximate_gelu else "gelu",
                        layer_norm_eps=1e-6, image_size=(16, 24))
  hf.save_pretrained(tmp_path / "src")
  config = helpers.model_config(hf.config)
  params = checkpoints_convert.load(tmp_path / "src", config, image_size=(16, 24))
  checkpoints_convert.export_hf(params, config, str(tmp_path / "out"), image_size=(16, 24))
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["hidden_act"] == ("gelu_pytorch_tanh" if approximate_gelu else "gelu")
  again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
  x = helpers.images(16, 24)
  ours = helpers.apply(params, config, x)
  diff = helpers.max_diff(helpers.hf_logits(again, x), ours)
  print(f"parity export_hf round trip (approximate_gelu={approximate_gelu}): {diff:.2e}")
  assert diff <= TOL
  assert helpers.max_diff(helpers.hf_logits(hf, x), ours) <= TOL


def test_export_hf_refuses_what_hf_cannot_hold(tmp_path):
  hf = helpers.hf_model()
  hf.save_pretrained(tmp_path)
  config = helpers.model_config(hf.config, classifier="gap")
  params = checkpoints_convert.load(tmp_path, config)
  with pytest.raises(checkpoints_convert.UnsupportedCheckpointError, match="classifier='gap'"):
    checkpoints_convert.export_hf(params, config, str(tmp_path / "out"))


def test_bf16_safetensors(tmp_path):
  """safetensors.numpy cannot read BF16 (numpy has none); the fallback reader can."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  hf = helpers.hf_model()
  sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in helpers.hf_state_dict(hf).items()}
  hf.config.save_pretrained(tmp_path)
  save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  params = checkpoints_convert.load(tmp_path)
  ref = {k: v.float().numpy() for k, v in sd.items()}
  np.testing.assert_array_equal(params["head"]["kernel"], ref["classifier.weight"].T)
  assert params["head"]["kernel"].dtype == np.float32
