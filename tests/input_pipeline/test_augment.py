"""RandAugment ops vs PIL, magnitude scale, mixup/cutmix closed forms, AugReg levels."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax.input_pipeline import augreg, batch_ops, randaug

GREY = (128, 128, 128)


def photo(h=32, w=40, seed=0):
  """A smooth image with some texture, so that every op visibly changes it."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w]
  base = np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.integers(0, 60, (h, w, 3))
  return np.clip(base + 30, 0, 255).astype(np.uint8)


def pil_reference(name, pil, m, sign):
  """PIL's version of op `name` at magnitude m (the scale of randaug's docstring)."""
  factor = max(0.0, 1 + sign * 0.09 * m)
  w, h = pil.size
  if name == "Identity":
    return pil
  if name == "AutoContrast":
    return ImageOps.autocontrast(pil)
  if name == "Equalize":
    return ImageOps.equalize(pil)
  if name == "Posterize":
    return ImageOps.posterize(pil, int(np.clip(round(8 - 0.4 * m), 1, 8)))
  if name == "Solarize":
    return ImageOps.solarize(pil, max(0, 256 * (1 - m / 20)))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return getattr(ImageEnhance, name)(pil).enhance(factor)
  if name == "Rotate":
    return pil.rotate(sign * 3 * m, resample=Image.NEAREST, fillcolor=GREY)
  shear, shift = sign * 0.03 * m, sign * 0.045 * m
  # PIL's coordinates are pixel corners, so the centre row is at h / 2 (TF: (h - 1) / 2).
  matrix = {"ShearX": (1, shear, -shear * h / 2, 0, 1, 0),
            "ShearY": (1, 0, 0, shear, 1, -shear * w / 2),
            "TranslateX": (1, 0, -round(shift * w), 0, 1, 0),
            "TranslateY": (1, 0, 0, 0, 1, -round(shift * h))}[name]
  return pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=GREY)


@pytest.mark.parametrize("name", sorted(randaug.OPS))
def test_randaug_ops_match_pil(name):
  image = photo()
  pil = Image.fromarray(image)
  for m, sign in ((10, 1.0), (7, -1.0)):
    ours = randaug.apply_op(name, image, m, sign).numpy().astype(int)
    ref = np.asarray(pil_reference(name, pil, m, sign)).astype(int)
    diff = np.abs(ours - ref)
    # Float blends round differently from PIL's integer arithmetic by at most a level.
    assert diff.mean() < 0.6 and np.quantile(diff, 0.99) <= 1, (name, m, sign, diff.mean())


def distortion(name, m, image):
  out = randaug.apply_op(name, image, m, 1.0).numpy()
  if name.startswith("Translate"):  # the part shifted out and filled with grey
    return (out == GREY).all(-1).mean()
  return np.abs(out.astype(float) - image).mean()


@pytest.mark.parametrize("name", sorted(set(randaug.OPS) - {"Identity", "AutoContrast",
                                                              "Equalize"}))
def test_randaug_magnitude_grows_through_20(name):
  image = photo()
  image[image == 128] = 127  # no pixel looks like the fill value
  d = [distortion(name, m, image) for m in (0, 5, 10, 15, 20)]
  assert d[0] < 0.5  # magnitude 0 changes (almost) nothing
  assert all(a < b for a, b in zip(d[1:], d[2:])), d  # stronger at 15 than 10, at 20 than 15


def test_randaugment_layers_seeds():
  image = tf.constant(photo())
  out = [randaug.randaugment(image, tf.constant([s, 0], tf.int64), 2, 15.0).numpy()
         for s in range(6)]
  assert all(o.dtype == np.uint8 and o.shape == image.shape for o in out)
  again = randaug.randaugment(image, tf.constant([0, 0], tf.int64), 2, 15.0).numpy()
  np.testing.assert_array_equal(out[0], again)
  assert len({o.tobytes() for o in out}) > 3
  np.testing.assert_array_equal(randaug.randaugment(image, tf.constant([0, 0], tf.int64), 0, 15.0),
                                image)


def two_class_batch(b=6, h=10, w=12, num_classes=4):
  images = np.stack([np.full((h, w, 3), 10 + 40 * i, np.float32) for i in range(b)])
  labels = np.eye(num_classes, dtype=np.float32)[np.arange(b) % num_classes]
  return {"image": tf.constant(images), "labels": tf.constant(labels)}


def test_mixup_same_lambda_for_images_and_labels():
  batch = two_class_batch()
  for s in range(5):
    out = batch_ops.mixup(batch, tf.constant([s, 1], tf.int64), 0.4)
    x, y = batch["image"].numpy(), batch["labels"].numpy()
    lam_images = (out["image"].numpy() - np.roll(x, 1, 0)) / (x - np.roll(x, 1, 0))
    lam_labels = out["labels"].numpy()[np.arange(6), y.argmax(1)]
    np.testing.assert_allclose(lam_images, lam_labels[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lam_labels, lam_labels[0], rtol=1e-6)
    np.testing.assert_allclose(out["labels"].numpy().sum(1), 1, rtol=1e-6)


def test_beta_moments():
  alpha = 0.2
  lam = np.array([batch_ops.sample_beta(tf.constant([s, 2], tf.int64), alpha).numpy()
                  for s in range(600)])
  assert abs(lam.mean() - 0.5) < 0.05
  assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.03  # Beta(a, a) variance


def test_cutmix_label_weight_is_pasted_area():
  batch = two_class_batch()
  x, y = batch["image"].numpy(), batch["labels"].numpy()
  areas = []
  for s in range(8):
    out = batch_ops.cutmix(batch, tf.constant([s, 3], tf.int64), 1.0)
    image = out["image"].numpy()
    pasted = image != x  # every image differs from its rolled neighbour everywhere
    np.testing.assert_array_equal(image[pasted], np.roll(x, 1, 0)[pasted])
    area = pasted[..., 0].mean(axis=(1, 2))
    assert np.ptp(area) == 0  # one box for the whole batch
    np.testing.assert_allclose(out["labels"].numpy(),
                               (1 - area[0]) * y + area[0] * np.roll(y, 1, 0), rtol=1e-6)
    areas.append(area[0])
  assert 0 < np.mean(areas) < 1 and np.ptp(areas) > 0.1


def test_switch_prob():
  batch = two_class_batch()
  def is_cutmix(out):  # cutmix keeps some pixels exactly, mixup (0 < λ < 1) none
    return bool((out["image"].numpy() == batch["image"].numpy()).any())
  for prob, expected in ((0.0, {False}), (1.0, {True}), (0.5, {False, True})):
    op = batch_ops.get_batch_op(0.5, 1.0, prob)
    assert {is_cutmix(op(batch, tf.constant([s, 4], tf.int64))) for s in range(12)} == expected
  assert batch_ops.get_batch_op(0.0, 0.0) is None
  with pytest.raises(ValueError, match="mix_switch_prob must be in"):
    batch_ops.get_batch_op(0.2, 0.2, 1.5)


UPSTREAM = {  # vision_transformer README: level -> (mixup alpha, randaug (layers, magnitude))
    "none": (0.0, None), "light1": (0.0, (2, 0)), "light2": (0.2, (2, 10)),
    "medium1": (0.2, (2, 15)), "medium2": (0.5, (2, 15)), "strong1": (0.5, (2, 20)),
    "strong2": (0.8, (2, 20))}


@pytest.mark.parametrize("level", sorted(UPSTREAM))
def test_augreg_levels(level):
  alpha, ra = UPSTREAM[level]
  config = util.make_config(aug_level=level,
                            pp_train="decode|inception_crop(224)|flip_lr|value_range(-1,1)|onehot(10)")
  pp, mixup_alpha = augreg.resolve(config)
  assert mixup_alpha == alpha
  expected = "decode|inception_crop(224)|flip_lr|" + (f"randaug({ra[0]},{ra[1]})|" if ra else "") \
      + "value_range(-1,1)|onehot(10)"
  assert pp == expected
  name = f"B_16-i21k-300ep-lr_0.001-aug_{level}-wd_0.1-do_0.0-sd_0.0"
  assert augreg.level_from_filename(name) == level
  assert augreg.level_from_filename(f"gs://x/{name}--imagenet2012-steps_20k-lr_0.01-res_384.npz") \
      == level


def test_aug_level_from_checkpoint_filename():
  name = "S_16-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"
  pp = "decode|flip_lr|value_range(-1,1)|onehot(10)"
  config = util.make_config(aug_level="checkpoint", pp_train=pp)
  config.pretrained_path = f"/ckpt/{name}--imagenet2012-steps_20k-lr_0.01-res_384.npz"
  assert augreg.resolve(config) == ("decode|flip_lr|randaug(2,15)|value_range(-1,1)|onehot(10)",
                                    0.5)
  config.pretrained_path, config.model_name = None, name.replace("medium2", "light1")
  assert augreg.resolve(config) == ("decode|flip_lr|randaug(2,0)|value_range(-1,1)|onehot(10)",
                                    0.0)
  config.model_name = "ViT-B_16"
  with pytest.raises(ValueError, match="name none"):
    augreg.resolve(config)


def test_augreg_errors():
  assert augreg.level_from_filename("ViT-B_16.npz") is None
  with pytest.raises(ValueError, match="Unknown AugReg level 'huge'"):
    augreg.level_from_filename("S_16-i1k-300ep-lr_0.001-aug_huge-wd_0.1")
  config = util.make_config(aug_level="medium1", mixup_alpha=0.3)
  with pytest.raises(ValueError, match="mixup_alpha=0.3 too"):
    augreg.resolve(config)
  config = util.make_config(aug_level="light1", pp_train="decode|randaug(2,5)|onehot(10)")
  with pytest.raises(ValueError, match="already has one"):
    augreg.resolve(config)


def test_aug_level_in_pipeline(tmp_path):
  root = util.make_idx_dir(tmp_path, n_train=24, size=16)
  config = util.make_config(root, aug_level="strong2", batch=8,
                            pp_train="decode(3)|inception_crop(12)|flip_lr|value_range|onehot(10)")
  it = input_pipeline.make_train_iterator(config)
  batch = next(it)
  assert batch["image"].shape == (8, 12, 12, 1) and batch["image"].dtype == np.float32
  # Mixup with alpha 0.8: soft labels summing to one.
  assert (batch["labels"].max(1) < 1).all()
  np.testing.assert_allclose(batch["labels"].sum(1), 1, rtol=1e-6)
  resumed = next(input_pipeline.make_train_iterator(config, start_step=3))
  np.testing.assert_array_equal(resumed["image"], [next(it) for _ in range(3)][-1]["image"])
