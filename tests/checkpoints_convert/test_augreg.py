"""configs/augreg.py: AugReg filenames -> fine-tuning configs."""
import pytest

from vit_jax.configs import augreg


def test_filename_config():
  name = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1"
  c = augreg.get_config(name)
  assert c.model.name == "ViT-B_16" and c.model.hidden_size == 768
  assert c.model_name == name and c.pretrained_dir
  assert c.dataset == "cifar10" and c.num_classes == 10
  # Upstream fine-tunes without AugReg; the pre-training recipe is recorded.
  assert c.model.transformer.dropout_rate == 0.0 and c.model.transformer.stochastic_depth == 0.0
  assert (c.augreg.aug_level, c.augreg.dropout_rate, c.augreg.stochastic_depth) == (
      "medium1", 0.1, 0.1)
  assert (c.augreg.dataset, c.augreg.epochs, c.augreg.lr, c.augreg.weight_decay) == (
      "i21k", 300, 0.001, 0.1)
  assert c.aug_level is None
  with pytest.raises(AttributeError):
    c.augreg_typo = 1  # still locked


def test_model_shortcut_dataset_and_finetuned_names():
  c = augreg.get_config("S_32,oxford_iiit_pet")
  assert c.model_name == augreg.RECOMMENDED["S_32"] and c.model.name == "ViT-S_32"
  assert c.num_classes == 37
  c = augreg.get_config("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"
                        "--imagenet2012-steps_20k-lr_0.03-res_384")
  assert c.model.name == "ViT-Ti_16"
  assert (c.augreg.adapt_dataset, c.augreg.adapt_steps, c.augreg.adapt_resolution) == (
      "imagenet2012", 20_000, 384)


@pytest.mark.parametrize("name,match", [
    ("R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "hybrid"),
    ("B_16-i21k-300ep-lr_0.001-aug_huge9-wd_0.1-do_0.0-sd_0.0", "aug level"),
    ("B_16.npz", "Not an AugReg filename"),
])
def test_errors(name, match):
  with pytest.raises(ValueError, match=match):
    augreg.get_config(name)
