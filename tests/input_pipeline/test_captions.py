"""Image-caption data: caption folders and listings, tfds caption sets, class captions; one caption
per training image (seeded, resumable), all of them per eval image (padded, masked); CLIP tokens."""
import collections
import itertools
import json
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax.input_pipeline import ops
from vit_jax.input_pipeline import sources
from vit_jax.input_pipeline import tokenizer as tokenizer_lib

TUX_PAINT_STAMPS = "/usr/share/tuxpaint/stamps"
L = 16  # context length of these tests (CLIP's 77 only makes the arrays longer)
PP = f"decode|tokenize({L})"


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.get_tokenizer(context_length=L)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def caption_config(root, source, **kwargs):
  kwargs = {"pp_train": PP, "pp_test": PP, "batch": 2, "batch_eval": 4, **kwargs}
  return util.make_config(str(root), data_source=source, **kwargs)


def eval_captions(config, split, process_count=1, tok=None):
  """{image index: [its captions]} over all processes of one eval pass; checks that every example
  comes once, that padding rows are blank, and (with `tok`) that tokens are tok.encode(texts)."""
  out = {}
  for p in range(process_count):
    ev = input_pipeline.make_eval_data(config, split, p, process_count)
    for b in ev:
      k = config.max_captions_eval
      assert b["texts"].shape == b["texts_mask"].shape == (ev.batch_size, k)
      assert b["texts_mask"].dtype == bool and b["tokens"].dtype == np.int32
      assert not b["texts_mask"][~b["_mask"]].any() and (b["texts"][~b["texts_mask"]] == b"").all()
      if tok is not None:  # blank captions of real examples too ('' gives SOT, EOT)
        expected = tok.encode([t.decode() for t in b["texts"].ravel()])
        m = b["_mask"]
        np.testing.assert_array_equal(b["tokens"][m], expected.reshape(ev.batch_size, k, L)[m])
      for i, texts, mask in zip(util.image_index(b["image"]), b["texts"], b["texts_mask"]):
        if mask.any():
          assert int(i) not in out
          out[int(i)] = [t.decode() for t in texts[mask]]
  return out


# ------------------------------------------------------------------------------------------------
# caption_folder


def caption_tree(root, n=12):
  """root/cat{i % 3}/sub/img{i}.png + img{i}.txt (caption, then a translation line), an .svg with a
  caption (no example), stray files; returns {index: caption}."""
  truth = {}
  for i in range(n):
    stem = os.path.join(root, f"cat{i % 3}", "sub", f"img{i:02d}")
    util.write_png(stem + ".png", i)
    with open(stem + ".txt", "w", encoding="utf-8") as f:
      f.write(f"  Caption number {i}.\nde.utf8=Bildunterschrift {i}\n")
    open(stem + ".dat", "w").write("colorable\n")
    truth[i] = f"Caption number {i}."
  open(os.path.join(root, "cat0", "vector.svg"), "w").write("<svg/>")
  open(os.path.join(root, "cat0", "vector.txt"), "w").write("A vector stamp.\n")
  return truth


def test_caption_folder_pairs_and_stable_split(tmp_path, tok, caplog):
  truth = caption_tree(tmp_path)
  config = caption_config(tmp_path, "caption_folder")
  with caplog.at_level(logging.INFO):
    assert eval_captions(config, "train", 2, tok) == {i: [c] for i, c in truth.items()}
  assert "1 x caption file beside .svg only" in caplog.text
  head, tail = eval_captions(config, "train[:75%]"), eval_captions(config, "train[75%:]")
  assert len(head) == 9 and len(tail) == 3 and not set(head) & set(tail)
  assert {**head, **tail} == {i: [c] for i, c in truth.items()}
  assert sorted(tail) != list(range(9, 12))  # a pseudo-random order, not the sorted one
  config.seed = 7  # the partition is fixed, not drawn from the run's seed
  assert eval_captions(config, "train[75%:]") == tail
  source = sources.get_source(config, "train")
  assert source.left_out == {"caption file beside .svg only": 1} and source.num_skipped == 0


def test_caption_folder_split_subfolders(tmp_path):
  for split, indices in (("train", range(5)), ("val", range(5, 8))):
    for i in indices:
      util.write_png(str(tmp_path / split / "x" / f"{i}.png"), i)
      (tmp_path / split / "x" / f"{i}.txt").write_text(f"image {i}")
  config = caption_config(tmp_path, "caption_folder")
  assert eval_captions(config, "val") == {i: [f"image {i}"] for i in range(5, 8)}
  assert sorted(eval_captions(config, "train")) == list(range(5))


# ------------------------------------------------------------------------------------------------
# caption_csv / caption_jsonl: several captions per image.

CAPTIONS = {i: [f"image {i} caption {j}" for j in range(1 + i % 3)] for i in range(6)}


def write_listing(root, fmt, name="train"):
  """CAPTIONS as root/{name}.{fmt}, rows of one image interleaved with others'."""
  for i in CAPTIONS:
    util.write_png(str(root / "img" / f"{i}.png"), i)
  rows = sorted(((j, i, c) for i, cs in CAPTIONS.items() for j, c in enumerate(cs)))
  with open(root / f"{name}.{fmt}", "w", newline="") as f:
    if fmt == "csv":
      f.write("path,caption\n" + "".join(f'img/{i}.png,"{c}"\n' for _, i, c in rows))
    else:  # a list for image 5, one line per caption for the others
      f.write("".join(json.dumps({"path": f"img/{i}.png", "caption": c}) + "\n"
                      for _, i, c in rows if i != 5))
      f.write(json.dumps({"path": "img/5.png", "captions": CAPTIONS[5]}) + "\n")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_listing_several_captions_eval_all_train_one(tmp_path, fmt, tok):
  write_listing(tmp_path, fmt)
  config = caption_config(tmp_path, f"caption_{fmt}", max_captions_eval=3)
  assert eval_captions(config, "train", 2, tok) == CAPTIONS
  config.max_captions_eval = 2
  with pytest.raises(ValueError, match=r"img/2.png has 3 captions, config.max_captions_eval=2"):
    input_pipeline.make_eval_data(config, "train")

  run = take(input_pipeline.make_train_iterator(config), 60)  # 20 epochs of 6 images
  chosen = collections.defaultdict(set)
  for b in run:
    assert b["texts"].shape == (2,) and b["tokens"].shape == (2, L) and set(b) == {
        "image", "texts", "tokens"}
    np.testing.assert_array_equal(b["tokens"], tok.encode([t.decode() for t in b["texts"]]))
    for i, t in zip(util.image_index(b["image"]), b["texts"]):
      assert t.decode() in CAPTIONS[i]
      chosen[int(i)].add(t.decode())
  # Each epoch draws again: over 20 epochs every caption of an image with 2 or 3 shows up.
  assert {i: sorted(c) for i, c in chosen.items()} == CAPTIONS
  again = take(input_pipeline.make_train_iterator(config), 30)
  for k in (0, 7, 29):
    np.testing.assert_array_equal(again[k]["texts"], run[k]["texts"])
  for k in (4, 13):  # a restart at step k gives batch k (images, captions, tokens)
    resumed = next(input_pipeline.make_train_iterator(config, start_step=k))
    for key in ("image", "texts", "tokens"):
      np.testing.assert_array_equal(resumed[key], run[k][key])
  config.seed = 1
  other = take(input_pipeline.make_train_iterator(config), 10)
  assert any(not np.array_equal(a["texts"], b["texts"]) for a, b in zip(run, other))


def test_resume_with_augmentation_and_cache(tmp_path):
  write_listing(tmp_path, "jsonl")
  pp = f"decode|inception_crop(6, 50)|flip_lr|value_range(-1, 1)|tokenize({L})"
  for cache_train in (False, True):
    config = caption_config(tmp_path, "caption_jsonl", pp_train=pp, cache_train=cache_train)
    run = take(input_pipeline.make_train_iterator(config, 1, 2), 8)  # process 1 of 2
    for k in (1, 6):
      resumed = next(input_pipeline.make_train_iterator(config, 1, 2, start_step=k))
      for key in ("image", "texts", "tokens"):
        np.testing.assert_array_equal(resumed[key], run[k][key])


def test_eval_padding_strings_three_processes(tmp_path):
  """7 images over 3 processes with batches of 2: each process has 2 batches, partly or wholly
  padding; padding rows are b'' texts with every mask False, and each image comes once."""
  for i in range(7):
    util.write_png(str(tmp_path / "img" / f"{i}.png"), i)
  with open(tmp_path / "test.csv", "w") as f:
    f.write("path,caption\n" + "".join(f"img/{i}.png,only {i}\n" for i in (0, 1, 2, 3, 4, 5, 6, 0)))
  config = caption_config(tmp_path, "caption_csv", batch_eval=6, max_captions_eval=2)
  batches = [input_pipeline.make_eval_data(config, "test", p, 3).num_batches for p in range(3)]
  assert batches == [2] * 3
  got = eval_captions(config, "test", 3)
  assert got == {0: ["only 0", "only 0"], **{i: [f"only {i}"] for i in range(1, 7)}}


# ------------------------------------------------------------------------------------------------
# tfds caption datasets (coco_captions-like: captions/text).


class VitJaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Tagged 8x8 RGB PNGs with CAPTIONS-like sequences: train 0..9, test 20..24."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # see test_tfds.VitJaxTinyImages

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 10), "test": self._generate_examples(20, 25)}

  def _generate_examples(self, start, stop):
    images = np.repeat(util.tagged_images(stop)[..., None], 3, axis=-1)
    for i in range(start, stop):
      texts = [f"tfds image {i} caption {j}" for j in range(1 + i % 3)]
      yield i, {"image": images[i], "captions": {"id": list(range(len(texts))), "text": texts}}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds_captions"))
  VitJaxTinyCaptions(data_dir=root).download_and_prepare()
  return root


def tfds_config(root, **kwargs):
  kwargs = {"caption_key": "captions/text", "pp_train": PP, "pp_test": PP, "batch": 2,
            "batch_eval": 4, "max_captions_eval": 3, **kwargs}
  return util.make_config(None, data_source="tfds", dataset="vit_jax_tiny_captions",
                          tfds_data_dir=root, **kwargs)


def test_tfds_captions(tfds_dir, tok):
  config = tfds_config(tfds_dir)
  # Reference: tfds's own reader of the same split.
  reference = {int(util.image_index(ex["image"][None])[0]): [t.decode() for t in
                                                            ex["captions"]["text"]]
               for ex in tfds.as_numpy(tfds.load("vit_jax_tiny_captions", split="test+train[:50%]",
                                                 data_dir=tfds_dir))}
  assert eval_captions(config, "test+train[:50%]", 2, tok) == reference and len(reference) == 10
  run = take(input_pipeline.make_train_iterator(config), 10)
  for b in run:
    for i, t in zip(util.image_index(b["image"]), b["texts"]):
      assert t.decode().startswith(f"tfds image {i} caption ")
  resumed = next(input_pipeline.make_train_iterator(config, start_step=7))
  np.testing.assert_array_equal(resumed["texts"], run[7]["texts"])
  np.testing.assert_array_equal(resumed["image"], run[7]["image"])


def test_tfds_caption_errors(tfds_dir):
  with pytest.raises(ValueError, match=r"caption_key='captions/txt': no feature 'txt' at "
                                       r"captions; found \['id', 'text'\]"):
    input_pipeline.make_eval_data(tfds_config(tfds_dir, caption_key="captions/txt"), "test")
  with pytest.raises(ValueError, match=r"caption_key='captions/id' is a .* of int64, expected"):
    input_pipeline.make_eval_data(tfds_config(tfds_dir, caption_key="captions/id"), "test")
  # Counts are only known when read: an image with too many captions fails then, naming it.
  config = tfds_config(tfds_dir, max_captions_eval=2)
  with pytest.raises(ValueError, match=r"more captions than config.max_captions_eval=2"):
    list(input_pipeline.make_eval_data(config, "test"))


# ------------------------------------------------------------------------------------------------
# Class-name captions (the Fashion-MNIST CLIP demo) and the ops.

TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")
CLASS_PP = f"decode|class_caption('fashion_mnist', {TEMPLATES})|value_range(-1, 1)|tokenize"


def test_class_caption_from_labels(tmp_path, tok):
  config = util.make_config(util.make_idx_dir(tmp_path, n_train=20, n_test=7), pp_train=CLASS_PP,
                            pp_test=CLASS_PP, context_length=L, batch_eval=4)
  names = ops.CLASSNAMES["fashion_mnist"]
  assert names[0] == "T-shirt/top" and names[9] == "Ankle boot"
  run = take(input_pipeline.make_train_iterator(config), 20)
  used = set()
  for b in run:
    assert b["tokens"].shape == (4, L) and b["label"].dtype == np.int32
    pixels = ((b["image"] + 1) * 127.5).round().astype(np.uint8)  # undo value_range(-1, 1)
    labels = util.image_index(pixels) % 10  # the idx test data has label = index % 10
    np.testing.assert_array_equal(b["label"], labels)
    for label, t in zip(labels, b["texts"]):
      template = [tm for tm in TEMPLATES if tm.format(names[label]) == t.decode()]
      used.update(template)
      assert len(template) == 1
    np.testing.assert_array_equal(b["tokens"], tok.encode([t.decode() for t in b["texts"]]))
  assert used == set(TEMPLATES)  # chosen per example
  resumed = next(input_pipeline.make_train_iterator(config, start_step=11))
  np.testing.assert_array_equal(resumed["texts"], run[11]["texts"])
  # Eval: every template, padded to max_captions_eval.
  for b in input_pipeline.make_eval_data(config, "test"):
    m = b["_mask"]
    assert b["texts"].shape == (4, 5)
    np.testing.assert_array_equal(b["texts_mask"][m], [[True, True, False, False, False]] * m.sum())
    for label, texts in zip(b["label"][m], b["texts"][m]):
      assert [t.decode() for t in texts[:2]] == [tm.format(names[label]) for tm in TEMPLATES]


def test_ops_errors_and_config_defaults(tmp_path):
  with pytest.raises(ValueError, match=r"classnames 'fashion_mnst': expected a preset name"):
    ops.parse("class_caption('fashion_mnst')")
  with pytest.raises(ValueError, match=r"template 'a photo' must contain exactly one"):
    ops.parse("class_caption(('a', 'b'), 'a photo')")
  with pytest.raises(ValueError, match=r"context_length must be an int >= 2"):
    ops.parse("tokenize(1)")
  config = util.make_config(util.make_idx_dir(tmp_path), pp_train=CLASS_PP, context_length=L)
  assert next(input_pipeline.make_train_iterator(config))["tokens"].shape == (4, L)
  config.pp.train = CLASS_PP.replace("tokenize", "tokenize(8)")  # the pp string wins
  assert next(input_pipeline.make_train_iterator(config))["tokens"].shape == (4, 8)
  config.tokenizer_path = str(tmp_path / "nowhere.json")
  with pytest.raises(FileNotFoundError, match="nowhere.json"):
    input_pipeline.make_train_iterator(config)
  config.pp.train = "decode|class_caption('fashion_mnist')"
  with pytest.raises(ValueError, match=r"gives captions \('texts'\) but no 'tokens'"):
    input_pipeline.make_train_iterator(config)


# ------------------------------------------------------------------------------------------------
# Bad data.


def bad_tree(root):
  """Good images 0..3 and four bad ones; returns (good {index: caption}, {reason: path})."""
  for i in range(8):
    util.write_png(str(root / "s" / f"{i}.png"), i)
    (root / "s" / f"{i}.txt").write_text(f"good {i}")
  os.remove(root / "s" / "4.txt")
  (root / "s" / "5.txt").write_text("\n\nthe caption is on line 3")
  (root / "s" / "6.txt").write_bytes(b"caf\xe9 latin-1")
  (root / "s" / "7.png").write_bytes(b"not a png")
  bad = {"no caption file": "4.png", "empty caption": "5.txt", "unreadable caption file": "6.txt",
         "undecodable image": "7.png"}
  return {i: [f"good {i}"] for i in range(4)}, {k: str(root / "s" / v) for k, v in bad.items()}


def test_bad_captions_name_files(tmp_path):
  good, bad = bad_tree(tmp_path)
  config = caption_config(tmp_path, "caption_folder")
  with pytest.raises(ValueError, match="3 caption problem") as e:
    sources.get_source(config, "train")
  for reason in ("no caption file", "empty caption", "unreadable caption file"):
    assert bad[reason] in str(e.value)
  assert "skip_corrupt=True" in str(e.value)
  (tmp_path / "s" / "4.txt").write_text("fixed")
  (tmp_path / "s" / "5.txt").write_text("fixed")
  (tmp_path / "s" / "6.txt").write_text("fixed")
  with pytest.raises(ValueError, match="1 unreadable image file") as e:
    list(input_pipeline.make_eval_data(config, "train"))
  assert bad["undecodable image"] in str(e.value)
  (tmp_path / "train.csv").write_text("path,caption\ns/0.png,a\ns/1.png,\"  \"\n")
  with pytest.raises(ValueError, match=r"train.csv:3: empty caption for s/1.png"):
    sources.get_source(caption_config(tmp_path, "caption_csv"), "train")
  (tmp_path / "train.jsonl").write_text(json.dumps({"path": "s/0.png", "text": "a"}) + "\n")
  with pytest.raises(ValueError, match=r"train.jsonl:1: expected a JSON object with key path"):
    sources.get_source(caption_config(tmp_path, "caption_jsonl"), "train")


def test_skip_corrupt_skips_and_counts(tmp_path, caplog):
  good, bad = bad_tree(tmp_path)
  config = caption_config(tmp_path, "caption_folder", skip_corrupt=True)
  with caplog.at_level(logging.WARNING):
    source = sources.get_source(config, "train")
  assert source.num_examples == 4 and source.num_skipped == 4
  assert source.left_out == {reason: 1 for reason in bad}
  assert "3 of 8 images are left without a caption" in caplog.text
  assert all(path in caplog.text for path in bad.values())
  assert eval_captions(config, "train") == good
  run = take(input_pipeline.make_train_iterator(config), 4)
  np.testing.assert_array_equal(
      next(input_pipeline.make_train_iterator(config, start_step=3))["texts"], run[3]["texts"])


# ------------------------------------------------------------------------------------------------
# Real data: Debian's tuxpaint-stamps-default.


def tux_paint_pairs(root):
  """Independent count: PNGs with a same-name .txt whose first line is not blank."""
  pairs = {}
  for d, _, files in os.walk(root):
    for f in files:
      txt = os.path.join(d, f[:-4] + ".txt")
      if f.endswith(".png") and os.path.exists(txt):
        first = open(txt, encoding="utf-8").read().split("\n")[0].strip()
        if first:
          pairs[os.path.join(d, f)] = first
  return pairs


@pytest.mark.skipif(not os.path.isdir(TUX_PAINT_STAMPS),
                    reason="Debian package tuxpaint-stamps-default is not installed "
                    "(apt-get install tuxpaint-stamps-default)")
def test_real_tux_paint_stamps(caplog):
  config = caption_config(TUX_PAINT_STAMPS, "caption_folder", batch_eval=16,
                          pp_test=f"decode|resize(32)|tokenize({L})")
  with pytest.raises(ValueError, match=r"caption problem.*no caption file .*\.txt"):
    sources.get_source(config, "train")  # e.g. its NAME_mirror.png variants have no caption
  config.skip_corrupt = True
  with caplog.at_level(logging.INFO):
    source = sources.get_source(config, "train")
  expected = tux_paint_pairs(TUX_PAINT_STAMPS)
  print(f"\nTux Paint stamps: {source.num_examples} image-caption pairs; left out: "
        f"{source.left_out}")
  assert source.num_examples == len(expected) > 700 and set(source.paths) == set(expected)
  assert "caption file beside .svg only" in source.left_out
  head, tail = (sources.get_source(config, s).paths for s in ("train[:90%]", "train[90%:]"))
  assert not set(head) & set(tail) and set(head) | set(tail) == set(expected)
  ev = input_pipeline.make_eval_data(config, "train[90%:]", with_ids=True)
  b = next(iter(ev))
  assert b["image"].shape == (16, 32, 32, 3) and b["tokens"].shape == (16, 5, L)
  for i, texts in zip(b["_id"], b["texts"]):  # captions are the .txt first lines
    assert texts[0].decode() == expected[tail[i]]
  # Transparent surroundings are composited on white: the corner pixels of these cut-outs.
  assert (b["image"][:, 0, 0] == 255).all(1).mean() > 0.5
