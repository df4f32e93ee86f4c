"""Preprocessing ops, composed from a big_vision-style string: "decode|inception_crop(224)|flip_lr".

Each op is registered by name with a factory: `factory(*args, **kwargs) -> op(data, seed) -> data`,
where `data` is an example dict ({'image': [h, w, c], 'label': []}, or a batch of them for
`batchable` ops) and `seed` is an int64 [2] stateless seed (None for deterministic ops). Random ops
use only stateless TF random functions on that seed, so an example's augmentation is a function of
(config.seed, its position in the stream): reproducible, and resumable without replay.

Image dtypes: ops before `value_range`/`normalize` keep uint8 (resize rounds back to uint8), which is
what `randaug` and `color_jitter` expect; `value_range`/`normalize` give float32.

| op (main arguments)                      | does                                         | kind   |
| ---------------------------------------- | -------------------------------------------- | ------ |
| decode(channels=3, background=255)       | bytes -> uint8 [h, w, c]; PNG alpha on white | batch* |
| resize(size), resize_small(smaller_size) | to (h, w), or smaller side (keeps aspect)    |        |
| central_crop(size), random_crop(size)    | (h, w) window                                | random |
| inception_crop(size, area_min, area_max) | random area/aspect crop (fused with decode)  | random |
| flip_lr                                  | mirror with probability 1/2                  | random |
| color_jitter(b, c, s, h), randaug(n, m)  | colour jitter, RandAugment (uint8)           | random |
| value_range(vmin, vmax), normalize(mean) | uint8 -> float32                             | batch  |
| onehot(depth, smoothing=0)               | label [] -> labels float32 [depth]           | batch  |
| class_caption(classnames, templates)     | label [] -> texts string [T], T templates    |        |
| tokenize(context_length, path=None)      | texts string [...] -> tokens int32 [..., L]  | batch  |
| keep(*keys), drop(*keys)                 | select keys                                  | batch  |

random: uses its seed; batch: runs on whole batches when it ends the pp string (*decode only on
already decoded images). Inside the pipeline, `tokenize` takes context_length and path from
config.context_length and config.tokenizer_path unless the pp string gives them (see `parse`'s
`defaults`), so pp, model and zero-shot prompts share one tokenizer.

Captions: an example's `texts` is string [k] (its k captions) until the pipeline turns it into one
caption (training, chosen with the example's seed) or K padded ones with `texts_mask` (evaluation);
see captions.py. That happens after the per-example ops and before the batched ones, so a
`tokenize` at the end of the pp string encodes only the captions that are used.
"""
import ast
import dataclasses
import functools
import inspect
from typing import Callable

import tensorflow as tf

from vit_jax.input_pipeline import randaug as randaug_lib
from vit_jax.input_pipeline import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class OpInfo:
  factory: Callable
  random: bool  # uses its seed
  batchable: bool  # same result applied to a batch as to each example (elementwise, deterministic)


REGISTRY: dict[str, OpInfo] = {}

# Named (mean, std) presets for `normalize`, in [0, 1] units.
NORMALIZE_PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def register(name: str, *, random: bool = False, batchable: bool = False):
  def deco(factory):
    REGISTRY[name] = OpInfo(factory, random, batchable)
    return factory
  return deco


@dataclasses.dataclass(frozen=True)
class Op:
  """One parsed op of a pp string."""
  name: str
  fn: Callable[[dict, tf.Tensor | None], dict]
  index: int  # 0-based position in the pp string; also what its seed is folded with
  where: str  # "op 3 'flip_lr' (character 17) of pp 'decode|...'", for error messages
  random: bool
  batchable: bool

  def __call__(self, data: dict, seed) -> dict:
    op_seed = tf.random.experimental.stateless_fold_in(seed, self.index) if self.random else None
    try:
      return self.fn(dict(data), op_seed)
    except KeyError as e:
      raise ValueError(f"{self.where}: the example has no key {e}; keys: {sorted(data)}.") from e
    except (ValueError, TypeError) as e:
      raise ValueError(f"{self.where}: {e}") from e


def parse(pp: str, defaults: dict[str, dict] | None = None) -> list[Op]:
  """Parses "name(args)|name|..." into ops; raises ValueError naming the bad op and its position.

  Arguments are Python literals (numbers, strings, tuples, None, True/False), positional or keyword.
  `defaults` ({op name: {argument: value}}) replaces the factory's defaults for arguments the pp
  string leaves out (the pipeline passes config.context_length / tokenizer_path for `tokenize`).
  `decode` directly followed by `inception_crop` is fused into one op that, for JPEG bytes, decodes
  only the crop window (same result, much less work).
  """
  ops, offset = [], 0
  for index, text in enumerate(pp.split("|") if pp.strip() else []):
    where = f"op {index + 1} {text.strip()!r} (character {offset + len(text) - len(text.lstrip())})" \
            f" of pp {pp!r}"
    offset += len(text) + 1
    name, args, kwargs = _parse_call(text.strip(), where)
    if name not in REGISTRY:
      raise ValueError(f"{where}: unknown op {name!r}; known ops: {', '.join(sorted(REGISTRY))}.")
    info = REGISTRY[name]
    try:
      if defaults and name in defaults:
        bound = inspect.signature(info.factory).bind_partial(*args, **kwargs)
        for k, v in defaults[name].items():
          bound.arguments.setdefault(k, v)
        args, kwargs = bound.args, bound.kwargs
      fn = info.factory(*args, **kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: bad arguments: {e}") from e
    ops.append(Op(name, fn, index, where, info.random, info.batchable))
  return _fuse_decode_crop(ops)


def _parse_call(text: str, where: str):
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"{where}: not an op call like name or name(1, key='image'): {e.msg}") from e
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f"{where}: not an op call like name or name(1, key='image').")
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError as e:
    raise ValueError(f"{where}: arguments must be literals (numbers, strings, tuples): {e}") from e
  return node.func.id, args, kwargs


def _fuse_decode_crop(ops: list[Op]) -> list[Op]:
  out = []
  for op in ops:
    prev = out[-1] if out else None
    if (op.name == "inception_crop" and prev is not None and prev.name == "decode"
        and getattr(prev.fn, "key", None) == getattr(op.fn, "key", None)):
      fused = lambda data, seed, crop=op.fn, d=prev.fn: crop(data, seed, decode=d)
      out[-1] = dataclasses.replace(op, fn=fused, where=f"{prev.where} + {op.where}")
    else:
      out.append(op)
  return out


def apply(ops: list[Op], data: dict, seed) -> dict:
  """Applies `ops` in order; `seed` is the example's int64 [2] stateless seed."""
  for op in ops:
    data = op(data, seed)
  return data


def split_batchable(ops: list[Op], image_encoded: bool) -> tuple[list[Op], list[Op]]:
  """(per-example ops, trailing ops that can run on whole batches, which is faster)."""
  k = len(ops)
  while k > 0 and ops[k - 1].batchable and not (ops[k - 1].name == "decode" and image_encoded):
    k -= 1
  return ops[:k], ops[k:]


# ------------------------------------------------------------------------------------------------
# Helpers.


def _size2(size, what="size") -> tuple[int, int]:
  if isinstance(size, int):
    size = (size, size)
  if (not isinstance(size, (tuple, list)) or len(size) != 2
      or not all(isinstance(s, int) and s > 0 for s in size)):
    raise ValueError(f"{what} must be a positive int or (height, width), got {size!r}.")
  return tuple(size)


def _as_dtype(image: tf.Tensor, dtype) -> tf.Tensor:
  """Float result back to the input's dtype (uint8: round and clip), so value ranges stay."""
  if dtype == tf.uint8:
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return tf.cast(image, dtype)


def _resize(image, size, method, antialias):
  out = tf.image.resize(image, size, method=method, antialias=antialias)
  return _as_dtype(out, image.dtype)


def _check_method(method):
  methods = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
             "mitchellcubic")
  if method not in methods:
    raise ValueError(f"resize method {method!r}: expected one of {methods}.")


def _image_op(key):
  """Marks a closure with its key so `parse` can tell which ops act on the same tensor."""
  def deco(fn):
    fn.key = key
    return fn
  return deco


# ------------------------------------------------------------------------------------------------
# Decoding and geometry.


def _decode_image(encoded, channels, precise, background=None):
  """Encoded image -> uint8 [h, w, channels]; a PNG with transparency is composited on
  `background` (None: its colour channels are kept and alpha dropped, as TF's decoders do)."""
  if not precise:
    decode = lambda: tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  else:  # libjpeg's accurate IDCT (as PIL), instead of TF's default fast one
    decode = lambda: tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=channels, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=channels, expand_animations=False))
  if background is None:
    image = decode()
  else:
    # Only PNG carries alpha among the formats decoded here (GIF transparency is not decoded).
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
    image = tf.cond(is_png, lambda: _decode_png_on(encoded, channels, background), decode)
  image.set_shape([None, None, channels])
  return image


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode_png_on(encoded, channels, background):
  """PNG -> uint8 [h, w, channels], composited on `background` (RGB, [3]) where it is transparent.

  Decoding to RGBA gives every PNG kind (RGBA, gray+alpha, palette or RGB with a tRNS chunk) its
  alpha, and the same colour values as `decode_image`, so an opaque PNG decodes exactly as before.
  """
  rgba = tf.io.decode_png(encoded, channels=4)

  def composite():
    rgb = tf.cast(rgba[..., :3], tf.float32)
    alpha = tf.cast(rgba[..., 3:], tf.float32) / 255.0
    out = rgb * alpha + tf.constant(background, tf.float32) * (1.0 - alpha)
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    return out if channels == 3 else _as_dtype(tf.image.rgb_to_grayscale(tf.cast(out, tf.float32)),
                                              tf.uint8)

  def opaque():  # TF's own gray conversion when channels=1, as decode_image would give
    return rgba[..., :3] if channels == 3 else tf.io.decode_png(encoded, channels=1)
  return tf.cond(tf.reduce_any(rgba[..., 3] < 255), composite, opaque)


def _background(background):
  """None, a gray level or an (r, g, b) triple in 0..255 -> None or a 3-tuple of floats."""
  if background is None:
    return None
  if isinstance(background, (int, float)):
    background = (background,) * 3
  if (not isinstance(background, (tuple, list)) or len(background) != 3
      or not all(isinstance(v, (int, float)) and 0 <= v <= 255 for v in background)):
    raise ValueError(f"background must be None, a value in [0, 255] or an (r, g, b) triple of "
                     f"them, got {background!r}.")
  return tuple(float(v) for v in background)


@register("decode", batchable=True)
def get_decode(channels=3, precise=False, background=255, key="image"):
  """Encoded JPEG/PNG/GIF/BMP -> uint8 [h, w, channels] (gray -> RGB; precise: accurate JPEG IDCT);
  no-op on already decoded uint8 images.

  Transparent pixels of a PNG (RGBA, gray+alpha, or a tRNS chunk) are composited on `background`
  (a gray level, or (r, g, b); default white); background=None drops alpha and keeps whatever colour
  the transparent pixels store, as `tf.io.decode_image` does.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
  background = _background(background)

  @_image_op(key)
  def _decode(data, seed):
    del seed
    if data[key].dtype == tf.string:
      data[key] = _decode_image(data[key], channels, precise, background)
    return data
  _decode.channels, _decode.precise, _decode.background = channels, precise, background
  return _decode


@register("resize")
def get_resize(size, method="bilinear", antialias=False, key="image"):
  """Resizes to size (int: square, or (h, w)), ignoring the aspect ratio."""
  size = _size2(size)
  _check_method(method)

  @_image_op(key)
  def _op(data, seed):
    del seed
    data[key] = _resize(data[key], size, method, antialias)
    return data
  return _op


@register("resize_small")
def get_resize_small(smaller_size, method="area", antialias=True, key="image"):
  """Resizes so that the smaller side is `smaller_size`, keeping the aspect ratio."""
  if not (isinstance(smaller_size, int) and smaller_size > 0):
    raise ValueError(f"smaller_size must be a positive int, got {smaller_size!r}.")
  _check_method(method)

  @_image_op(key)
  def _op(data, seed):
    del seed
    image = data[key]
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.cast(tf.round(hw * smaller_size / tf.reduce_min(hw)), tf.int32)
    new = tf.maximum(new, smaller_size)  # rounding must not go below the asked size
    data[key] = _resize(image, new, method, antialias)
    return data
  return _op


@register("central_crop")
def get_central_crop(size, key="image"):
  """Crops the central (h, w) window; the image must be at least that large."""
  h, w = _size2(size)

  @_image_op(key)
  def _op(data, seed):
    del seed
    image = data[key]
    shape = tf.shape(image)
    tf.debugging.assert_greater_equal(shape[:2], [h, w], message=f"central_crop({size}): image "
                                      "smaller than the crop")
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    data[key] = tf.ensure_shape(image[top:top + h, left:left + w], [h, w, image.shape[-1]])
    return data
  return _op


@register("random_crop", random=True)
def get_random_crop(size, key="image"):
  """Crops a uniformly random (h, w) window; the image must be at least that large."""
  h, w = _size2(size)

  @_image_op(key)
  def _op(data, seed):
    image = data[key]
    crop = tf.image.stateless_random_crop(image, tf.concat([[h, w], tf.shape(image)[2:]], 0), seed)
    data[key] = tf.ensure_shape(crop, [h, w, image.shape[-1]])
    return data
  return _op


def _crop_window(shape, seed, area_min, area_max):
  """Inception-style crop window (begin [3], size [3]) as upstream: area fraction in
  [area_min, area_max] %, aspect ratio in [3/4, 4/3], whole image if 100 tries fail."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(area_min / 100, area_max / 100),
      max_attempts=100, use_image_if_no_bounding_boxes=True)
  return begin, size


@register("inception_crop", random=True)
def get_inception_crop(size=None, area_min=5, area_max=100, method="bilinear", antialias=False,
                       key="image"):
  """Random crop of area_min..area_max % of the image, aspect 3/4..4/3, resized to size (if any)."""
  if size is not None:
    size = _size2(size)
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"need 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}.")
  _check_method(method)

  @_image_op(key)
  def _op(data, seed, decode=None):
    image = data[key]
    if image.dtype == tf.string:  # fused with the preceding decode op `decode`, see parse()
      if decode is None:
        raise ValueError("the image is still encoded: put 'decode' before 'inception_crop'.")
      channels = decode.channels

      def jpeg():
        shape = tf.image.extract_jpeg_shape(image)
        begin, crop = _crop_window(shape, seed, area_min, area_max)
        window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        return tf.image.decode_and_crop_jpeg(
            image, window, channels=channels,
            dct_method="INTEGER_ACCURATE" if decode.precise else "")

      def other():
        decoded = _decode_image(image, channels, decode.precise, decode.background)
        begin, crop = _crop_window(tf.shape(decoded), seed, area_min, area_max)
        return tf.slice(decoded, begin, crop)
      crop = tf.cond(tf.io.is_jpeg(image), jpeg, other)
      crop.set_shape([None, None, channels])
    else:
      begin, crop_size = _crop_window(tf.shape(image), seed, area_min, area_max)
      crop = tf.slice(image, begin, crop_size)
      crop.set_shape([None, None, image.shape[-1]])
    data[key] = _resize(crop, size, method, antialias) if size is not None else crop
    return data
  return _op


@register("flip_lr", random=True)
def get_flip_lr(key="image"):
  """Mirrors left-right with probability 1/2."""
  @_image_op(key)
  def _op(data, seed):
    data[key] = tf.image.stateless_random_flip_left_right(data[key], seed)
    return data
  return _op


# ------------------------------------------------------------------------------------------------
# Colour and RandAugment (uint8 in, uint8 out).


@register("color_jitter", random=True)
def get_color_jitter(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, key="image"):
  """torchvision-style jitter in fixed order: factors in [1-b, 1+b], [1-c, 1+c], [1-s, 1+s]; hue
  shift in [-hue, hue] turns (hue <= 0.5)."""
  for name, v, top in (("brightness", brightness, None), ("contrast", contrast, None),
                       ("saturation", saturation, None), ("hue", hue, 0.5)):
    if not isinstance(v, (int, float)) or v < 0 or (top is not None and v > top):
      raise ValueError(f"{name} must be a number in [0, {top or 'inf'}], got {v!r}.")

  @_image_op(key)
  def _op(data, seed):
    image = data[key]
    if image.dtype != tf.uint8:
      raise ValueError(f"color_jitter needs a uint8 image, got {image.dtype.name}: put it before "
                       "value_range/normalize.")
    x = tf.image.convert_image_dtype(image, tf.float32)  # [0, 1]
    seeds = tf.random.experimental.stateless_split(seed, 4)

    def factor(s, amount):
      return tf.random.stateless_uniform([], s, max(0.0, 1 - amount), 1 + amount)
    if brightness:
      x = tf.clip_by_value(x * factor(seeds[0], brightness), 0.0, 1.0)
    if contrast:
      gray_mean = tf.reduce_mean(tf.image.rgb_to_grayscale(x) if x.shape[-1] == 3 else x)
      x = tf.clip_by_value(gray_mean + factor(seeds[1], contrast) * (x - gray_mean), 0.0, 1.0)
    if saturation and x.shape[-1] == 3:
      x = tf.clip_by_value(tf.image.adjust_saturation(x, factor(seeds[2], saturation)), 0.0, 1.0)
    if hue and x.shape[-1] == 3:
      x = tf.image.adjust_hue(x, tf.random.stateless_uniform([], seeds[3], -hue, hue))
    data[key] = tf.image.convert_image_dtype(x, tf.uint8, saturate=True)
    return data
  return _op


@register("randaug", random=True)
def get_randaug(num_layers=2, magnitude=10, key="image"):
  """RandAugment: num_layers ops drawn uniformly from the 14 of the paper, at `magnitude` (0..30;
  10 is upstream's maximum, 20 is stronger still). uint8 RGB in and out."""
  if not (isinstance(num_layers, int) and num_layers >= 0):
    raise ValueError(f"num_layers must be an int >= 0, got {num_layers!r}.")
  if not (isinstance(magnitude, (int, float)) and 0 <= magnitude <= randaug_lib.MAX_MAGNITUDE):
    raise ValueError(f"magnitude must be in [0, {randaug_lib.MAX_MAGNITUDE}], got {magnitude!r}.")

  @_image_op(key)
  def _op(data, seed):
    if data[key].dtype != tf.uint8:
      raise ValueError(f"randaug needs a uint8 image, got {data[key].dtype.name}: put it before "
                       "value_range/normalize.")
    data[key] = randaug_lib.randaugment(data[key], seed, num_layers, float(magnitude))
    return data
  return _op


# ------------------------------------------------------------------------------------------------
# Value ranges and labels (batchable: they run after batching when they end the pp string).


@register("value_range", batchable=True)
def get_value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, clip_values=False,
                    key="image"):
  """Maps [in_min, in_max] linearly to float32 [vmin, vmax] (optionally clipping)."""
  if in_max <= in_min:
    raise ValueError(f"need in_min < in_max, got {in_min}, {in_max}.")

  @_image_op(key)
  def _op(data, seed):
    del seed
    x = (tf.cast(data[key], tf.float32) - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
    data[key] = tf.clip_by_value(x, min(vmin, vmax), max(vmin, vmax)) if clip_values else x
    return data
  return _op


@register("normalize", batchable=True)
def get_normalize(mean="imagenet", std=None, in_max=255.0, key="image"):
  """float32 (x / in_max - mean) / std per channel; mean, std in [0, 1] units or a preset name
  ('imagenet', 'clip')."""
  if isinstance(mean, str):
    if mean not in NORMALIZE_PRESETS or std is not None:
      raise ValueError(f"normalize preset {mean!r}: expected one of {list(NORMALIZE_PRESETS)} "
                       "and no std.")
    mean, std = NORMALIZE_PRESETS[mean]
  if std is None or len(mean) != len(std) or min(std) <= 0:
    raise ValueError(f"need mean and std of the same length, std > 0; got {mean!r}, {std!r}.")

  @_image_op(key)
  def _op(data, seed):
    del seed
    x = tf.cast(data[key], tf.float32) / in_max
    data[key] = (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return data
  return _op


@register("onehot", batchable=True)
def get_onehot(depth, key="label", key_result="labels", on=1.0, off=0.0, smoothing=0.0):
  """Integer label [] -> float32 [depth]; label smoothing s: on = 1 - s + s/depth, off = s/depth."""
  if not (isinstance(depth, int) and depth > 0):
    raise ValueError(f"depth must be a positive int, got {depth!r}.")
  if not 0 <= smoothing < 1:
    raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}.")
  if smoothing:
    on, off = 1 - smoothing + smoothing / depth, smoothing / depth

  def _op(data, seed):
    del seed
    label = tf.cast(data[key], tf.int64)
    ok = tf.reduce_all((label >= 0) & (label < depth))
    check = tf.debugging.Assert(ok, [f"onehot({depth}): label outside [0, {depth}):", label],
                                summarize=8)
    with tf.control_dependencies([check]):
      data[key_result] = tf.one_hot(label, depth, on_value=on, off_value=off, dtype=tf.float32)
    return data
  return _op


# ------------------------------------------------------------------------------------------------
# Text: captions from class names, and CLIP tokens.

# Class names by dataset, in label order, for `class_caption` (Fashion-MNIST: its README's names).
CLASSNAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}


def _strings(value, what, preset=None) -> tuple[str, ...]:
  """A tuple of non-empty strings; a single string is a preset's name if `preset` is given (a
  one-class list is more likely a misspelt preset), else a 1-tuple."""
  if isinstance(value, str):
    if preset is not None:
      if value not in preset:
        raise ValueError(f"{what} {value!r}: expected a preset name, one of {sorted(preset)}, or "
                         "a tuple of strings.")
      return preset[value]
    value = (value,)
  if (not isinstance(value, (tuple, list)) or not value
      or not all(isinstance(v, str) and v for v in value)):
    known = f" or one of {sorted(preset)}" if preset else ""
    raise ValueError(f"{what} must be a non-empty tuple of non-empty strings{known}, "
                     f"got {value!r}.")
  return tuple(value)


@register("class_caption")
def get_class_caption(classnames, templates=("a photo of a {}.",), key="label",
                      key_result="texts"):
  """Integer label [] -> string [T]: every template filled with the label's class name.

  `classnames`: names in label order, or a preset ('fashion_mnist'). `templates`: strings with one
  '{}' each. The pipeline then picks one of the T captions per example with its seed (training) or
  keeps all of them, padded and masked (evaluation), as for a dataset with T captions per image.
  Not batchable: that choice is made per example, before batching.
  """
  classnames = _strings(classnames, "classnames", CLASSNAMES)
  templates = _strings(templates, "templates")
  for t in templates:
    if t.count("{}") != 1:
      raise ValueError(f"template {t!r} must contain exactly one '{{}}' (the class name).")
  # [classes, T], so that one gather gives a label's T captions.
  table = tf.constant([[t.format(c) for t in templates] for c in classnames])
  depth = len(classnames)

  def _op(data, seed):
    del seed
    label = tf.cast(data[key], tf.int64)
    ok = tf.reduce_all((label >= 0) & (label < depth))
    check = tf.debugging.Assert(ok, [f"class_caption: label outside [0, {depth}) (the number of "
                                     "classnames):", label], summarize=8)
    with tf.control_dependencies([check]):
      data[key_result] = tf.gather(table, label)
    return data
  return _op


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path, context_length):
  """One tokenizer per (path, context_length) and process: building it reads ~1.4 MB of merges."""
  return tokenizer_lib.get_tokenizer(path, context_length)


@register("tokenize", batchable=True)
def get_tokenize(context_length=77, key="texts", key_result="tokens", path=None):
  """Strings of any shape [...] -> int32 [..., context_length] CLIP BPE ids (SOT, tokens, EOT, 0
  padding; longer texts are cut to keep their EOT), with `tokenizer.get_tokenizer(path)`; path None:
  OpenAI's BPE file from the open_clip wheel. In the pipeline, context_length and path default to
  config.context_length and config.tokenizer_path."""
  if not (isinstance(context_length, int) and context_length >= 2):
    raise ValueError(f"context_length must be an int >= 2 (SOT and EOT), got {context_length!r}.")
  if isinstance(path, list):  # a (vocab.json, merges.txt) pair; lists are not hashable
    path = tuple(path)
  tok = _cached_tokenizer(path, context_length)

  def _op(data, seed):
    del seed
    texts = data[key]
    if texts.dtype != tf.string:
      raise ValueError(f"tokenize: {key!r} must be strings, got {texts.dtype.name}.")
    ids = tok.tf_encode(tf.reshape(texts, [-1]))
    ids = tf.reshape(ids, tf.concat([tf.shape(texts), [context_length]], 0))
    ids.set_shape(texts.shape.concatenate([context_length]))
    data[key_result] = ids
    return data
  return _op


@register("keep", batchable=True)
def get_keep(*keys):
  """Keeps only these keys (and the pipeline's internal '_' keys)."""
  def _op(data, seed):
    del seed
    missing = [k for k in keys if k not in data]
    if missing:
      raise KeyError(missing[0])
    return {k: v for k, v in data.items() if k in keys or k.startswith("_")}
  return _op


@register("drop", batchable=True)
def get_drop(*keys):
  """Drops these keys."""
  def _op(data, seed):
    del seed
    for k in keys:
      del data[k]  # a missing key is an error: probably a typo
    return data
  return _op
