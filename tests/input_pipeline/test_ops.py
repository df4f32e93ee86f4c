"""Op registry: pp-string errors, and each op's semantics against closed forms or PIL/numpy."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax.input_pipeline import ops


def run(pp, image, label=3, seed=(0, 0)):
  """Applies a pp string to one example; returns the output dict as numpy."""
  data = {"image": tf.constant(image), "label": tf.constant(label, tf.int64)}
  out = ops.apply(ops.parse(pp), data, tf.constant(seed, tf.int64))
  return {k: v.numpy() for k, v in out.items()}


def rand_image(h=20, w=30, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), np.uint8)


def encode(image, fmt):
  buf = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, fmt, quality=95)
  return buf.getvalue()


@pytest.mark.parametrize("pp, message", [
    ("decode|fliplr|onehot(10)", r"op 2 'fliplr' \(character 7\).*unknown op 'fliplr'; known ops:"),
    ("decode| resize(-3)", r"op 2 'resize\(-3\)' \(character 8\).*size must be a positive int"),
    ("flip_lr(1, 2)", r"op 1 'flip_lr\(1, 2\)' \(character 0\).*bad arguments"),
    ("decode|resize(32", r"op 2 'resize\(32'.*not an op call"),
    ("decode||onehot(10)", r"op 2 '' \(character 7\).*not an op call"),
    ("resize(size)", r"op 1 'resize\(size\)'.*arguments must be literals"),
    ("value_range(1, 2, 5, 5)", r"op 1.*need in_min < in_max"),
    ("normalize('imagnet')", r"op 1.*preset 'imagnet'"),
    ("onehot(10, smoothing=1.5)", r"op 1.*smoothing must be in \[0, 1\)"),
    ("randaug(2, 31)", r"op 1.*magnitude must be in \[0, 30\]"),
    ("inception_crop(224, area_min=50, area_max=20)", r"op 1.*area_min <= area_max"),
])
def test_parse_errors_name_op_and_position(pp, message):
  with pytest.raises(ValueError, match=message):
    ops.parse(pp)


def test_trace_time_errors_name_op():
  with pytest.raises(ValueError, match=r"""op 2 "onehot\(10, key='lbl'\)" .*no key 'lbl'"""):
    run("decode|onehot(10, key='lbl')", rand_image())
  with pytest.raises(ValueError, match=r"op 2 'randaug\(2, 5\)'.*needs a uint8 image"):
    run("value_range|randaug(2, 5)", rand_image())


def test_onehot_label_out_of_range_and_smoothing():
  out = run("onehot(4, smoothing=0.2)", rand_image(), label=1)
  np.testing.assert_allclose(out["labels"], [0.05, 0.85, 0.05, 0.05], rtol=1e-6)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"onehot\(4\): label outside \[0, 4\)"):
    run("onehot(4)", rand_image(), label=4)


@pytest.mark.parametrize("fmt, channels", [("JPEG", 3), ("PNG", 3), ("PNG", 1), ("JPEG", 1)])
def test_decode_matches_pil_and_gray_to_rgb(fmt, channels):
  image = rand_image(c=channels)
  data = encode(image, fmt)
  out = run("decode(precise=True)", data)["image"]
  reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  assert out.shape == (20, 30, 3) and out.dtype == np.uint8
  diff = np.abs(out.astype(int) - reference)
  if fmt == "PNG":
    assert diff.max() == 0
  else:  # the same IDCT as PIL; chroma upsampling may still differ by a level or two
    assert diff.mean() < 0.5 and diff.max() <= 3
    fast = run("decode", data)["image"]  # TF's default fast IDCT: close, not exact
    assert np.abs(fast.astype(int) - reference).mean() < 3
  np.testing.assert_array_equal(run("decode", image)["image"], image)  # uint8: no-op


def composite(rgba, background):
  """Closed form: colour * alpha + background * (1 - alpha), rounded; rgba uint8 [h, w, 4]."""
  a = rgba[..., 3:].astype(np.float64) / 255
  return np.round(rgba[..., :3] * a + np.array(background, np.float64) * (1 - a)).astype(np.uint8)


def png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, "PNG")
  return buf.getvalue()


def alpha_images():
  """PIL images of every PNG kind with transparency: RGBA, gray + alpha, palette and RGB with a
  tRNS chunk; alpha includes 0 and 255."""
  rng = np.random.default_rng(0)
  rgba = rand_image(c=4)
  rgba[0, :4, 3] = (0, 255, 1, 254)
  la = Image.fromarray(rgba[..., 2:].copy(), "LA")  # gray = the blue channel
  palette = Image.fromarray(rgba[..., :3]).quantize(16)
  palette.info["transparency"] = 3  # palette index 3 is transparent
  keyed = Image.fromarray(np.where(rng.random((20, 30, 1)) < 0.3, [7, 8, 9], rgba[..., :3])
                          .astype(np.uint8))
  keyed.info["transparency"] = (7, 8, 9)  # tRNS colour key
  return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": la, "P+tRNS": palette, "RGB+tRNS": keyed}


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P+tRNS", "RGB+tRNS"])
@pytest.mark.parametrize("background", [255, (0, 64, 200)])
def test_decode_composites_transparent_png(kind, background):
  image = alpha_images()[kind]
  data = png(image)
  rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))  # PIL's reading of the alpha
  assert (rgba[..., 3] < 255).any() and (rgba[..., 3] == 255).any()
  arg = background if isinstance(background, int) else f"{background}"
  out = run(f"decode(background={arg})", data)["image"]
  np.testing.assert_array_equal(out, composite(rgba, background))
  # PIL's own compositing (integer arithmetic) agrees within a level.
  bg = Image.new("RGBA", image.size, (background,) * 3 + (255,) if isinstance(background, int)
                 else tuple(background) + (255,))
  pil = np.asarray(Image.alpha_composite(bg, image.convert("RGBA")).convert("RGB"))
  assert np.abs(out.astype(int) - pil).max() <= 1
  # The fused decode + crop path composites too (the full-image crop is the image).
  square = png(image.crop((0, 0, 20, 20)))
  fused = run(f"decode(background={arg})|inception_crop(area_min=100)", square)["image"]
  np.testing.assert_array_equal(fused, run(f"decode(background={arg})", square)["image"])


def test_decode_opaque_png_and_background_none_unchanged():
  """Opaque PNGs (and alpha dropped with background=None) decode exactly as tf.io.decode_image."""
  rgba = rand_image(c=4)
  opaque = rgba.copy()
  opaque[..., 3] = 255
  cases = [png(Image.fromarray(rand_image(c=3))), png(Image.fromarray(rand_image(c=1)[..., 0])),
           png(Image.fromarray(opaque, "RGBA"))]
  for data in cases:
    for channels in (1, 3):
      expected = tf.io.decode_image(data, channels=channels, expand_animations=False).numpy()
      np.testing.assert_array_equal(run(f"decode({channels})", data)["image"], expected)
  data = png(Image.fromarray(rgba, "RGBA"))
  np.testing.assert_array_equal(run("decode(background=None)", data)["image"], rgba[..., :3])
  gray = run("decode(1)", data)["image"]  # composited, then to gray
  assert gray.shape == (20, 30, 1)
  with pytest.raises(ValueError, match=r"background must be None, a value in \[0, 255\]"):
    ops.parse("decode(background=300)")


def test_fused_decode_crop_equals_decode_then_crop():
  image = rand_image(64, 80)
  for fmt in ("JPEG", "PNG"):
    data = encode(image, fmt)
    for seed in range(5):
      fused = run("decode|inception_crop", data, seed=(seed, 1))["image"]
      decoded = run("decode", data)["image"]
      # The same op index and seed without fusion: decode first, then crop the uint8 image.
      separate = run("decode|inception_crop", decoded, seed=(seed, 1))["image"]
      assert fused.shape == separate.shape
      assert np.abs(fused.astype(int) - separate).mean() < 1.0


def test_inception_crop_area_and_aspect_in_range():
  image = np.zeros((100, 120, 3), np.uint8)
  fractions, aspects = [], []
  for seed in range(300):
    crop = run("inception_crop(area_min=20, area_max=60)", image, seed=(seed, 7))["image"]
    h, w, _ = crop.shape
    fractions.append(h * w / (100 * 120))
    aspects.append(w / h)
  fractions, aspects = np.array(fractions), np.array(aspects)
  # Integer window sizes round the area a little beyond the asked range.
  assert fractions.min() >= 0.2 * 0.95 and fractions.max() <= 0.6 * 1.05
  assert aspects.min() >= 0.75 * 0.95 and aspects.max() <= 4 / 3 * 1.05
  assert fractions.max() - fractions.min() > 0.3  # really random over the range
  assert run("inception_crop(24)", image)["image"].shape == (24, 24, 3)


def test_flip_lr_mirrors_exactly():
  image = rand_image()
  outs = [run("flip_lr", image, seed=(s, 0))["image"] for s in range(16)]
  flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
  kept = [np.array_equal(o, image) for o in outs]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_crops_and_resizes():
  image = rand_image(20, 30)
  np.testing.assert_array_equal(run("central_crop((10, 12))", image)["image"], image[5:15, 9:21])
  crop = run("random_crop(8)", image, seed=(3, 3))["image"]
  windows = [image[i:i + 8, j:j + 8] for i in range(13) for j in range(23)]
  assert any(np.array_equal(crop, w) for w in windows)
  assert run("resize_small(10)", image)["image"].shape == (10, 15, 3)
  resized = run("resize((10, 15), method='area')", image)["image"]
  assert resized.dtype == np.uint8  # uint8 in, uint8 out
  np.testing.assert_allclose(resized, image.reshape(10, 2, 15, 2, 3).mean((1, 3)), atol=0.51)


def test_value_range_and_normalize_hit_targets():
  image = np.array([[[0, 128, 255]]], np.uint8)
  out = run("value_range(-1, 1)", image)["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[-1, 128 / 127.5 - 1, 1]]], atol=1e-6)
  np.testing.assert_allclose(run("value_range(0, 1)", image)["image"], image / 255, rtol=1e-6)
  mean = np.array([0.485, 0.456, 0.406]) * 255
  out = run("normalize('imagenet')", mean[None, None].astype(np.float32))["image"]
  np.testing.assert_allclose(out, 0, atol=1e-6)
  out = run("normalize('clip')", np.full((1, 1, 3), 255, np.float32))["image"]
  np.testing.assert_allclose(out[0, 0], (1 - np.array([0.48145466, 0.4578275, 0.40821073]))
                             / np.array([0.26862954, 0.26130258, 0.27577711]), rtol=1e-5)


def test_color_jitter_ranges_and_identity():
  image = rand_image()
  np.testing.assert_array_equal(run("color_jitter", image)["image"], image)
  out = run("color_jitter(brightness=0.5)", image, seed=(1, 2))["image"].astype(float)
  factor = out.sum() / image.sum()  # brightness is a plain scale (up to clipping at 255)
  assert 0.5 <= factor <= 1.5 and out.dtype == float
  out = run("color_jitter(0.4, 0.4, 0.4, 0.1)", image, seed=(5, 2))["image"]
  assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)


def test_keep_drop():
  out = run("onehot(10)|keep('image', 'labels')", rand_image())
  assert set(out) == {"image", "labels"}
  assert set(run("drop('label')", rand_image())) == {"image"}
  with pytest.raises(ValueError, match="no key 'nope'"):
    run("drop('nope')", rand_image())
