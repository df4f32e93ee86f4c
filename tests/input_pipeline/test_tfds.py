"""tfds source on a tiny dataset prepared offline into tmp_path (real tfds builder and reader)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax.input_pipeline import sources


class VitJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Tagged 8x8 RGB PNGs: train 100..129, test 0..12; label = tag % 10."""
  VERSION = tfds.core.Version("1.0.0")
  # tfds looks for a checksums file next to the builder's code through importlib_resources, which
  # is not installed here (and nothing is downloaded): no code path, no lookup.
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(100, 130), "test": self._generate_examples(0, 13)}

  def _generate_examples(self, start, stop):
    images = np.repeat(util.tagged_images(stop)[..., None], 3, axis=-1)
    for i in range(start, stop):
      yield i, {"image": images[i], "label": i % 10}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  VitJaxTinyImages(data_dir=root).download_and_prepare()
  return root


def tfds_config(root, **kwargs):
  return util.make_config(None, data_source="tfds", dataset="vit_jax_tiny_images",
                          tfds_data_dir=root, **kwargs)


def test_tfds_eval_two_processes_and_slicing(tfds_dir):
  config = tfds_config(tfds_dir, batch_eval=4)
  seen = []
  for p in range(2):
    ev = input_pipeline.make_eval_data(config, "test+train[:10%]", p, 2)
    assert ev.num_examples == 16
    for b in ev:
      assert b["image"].shape == (2, 8, 8, 3)
      seen += list(util.image_index(b["image"][b["_mask"]]) + 1000 * b["labels"][b["_mask"]]
                   .argmax(1))
  # Reference: tfds's own reader of the same split (tfds stores examples in a hashed order).
  reference = tfds.load("vit_jax_tiny_images", split="test+train[:10%]", data_dir=tfds_dir)
  expected = [int(util.image_index(ex["image"][None].numpy())[0]) + 1000 * int(ex["label"])
              for ex in reference]
  assert sorted(seen) == sorted(expected) and len(set(expected)) == 16


def test_tfds_train_resume(tfds_dir):
  config = tfds_config(tfds_dir, pp_train="decode|flip_lr|random_crop(6)|onehot(10)")
  it = input_pipeline.make_train_iterator(config)
  run = [next(it) for _ in range(10)]
  resumed = next(input_pipeline.make_train_iterator(config, start_step=8))
  np.testing.assert_array_equal(resumed["image"], run[8]["image"])


def test_tfds_not_prepared_does_not_download(tmp_path):
  config = tfds_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds_download=True"):
    input_pipeline.make_train_iterator(config)


def test_tfds_more_classes_than_config(tfds_dir):
  with pytest.raises(ValueError, match="has 10 classes but config.num_classes=5"):
    input_pipeline.make_eval_data(tfds_config(tfds_dir, num_classes=5), "test")


def test_class_names_are_the_label_feature_names(tfds_dir):
  # ClassLabel(num_classes=10) names its classes "0".."9": what predict prints for this data.
  assert sources.class_names(tfds_config(tfds_dir)) == [str(i) for i in range(10)]
