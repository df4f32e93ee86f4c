"""Image-file sources: class folders, CSV/JSONL listings, corrupt and missing files."""
import json
import logging
import os

import numpy as np
import pytest

from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax.input_pipeline import sources

PP = "decode|onehot(10)"


write_png = util.write_png


def make_folder(root, classes=("cat", "dog", "emu"), per_class=5, sub=""):
  """root/[sub/]CLASS/NNN.png; image index = 100 * class id + n. Returns {index: class id}."""
  truth = {}
  for k, c in enumerate(classes):
    for n in range(per_class):
      write_png(os.path.join(root, sub, c, f"{n:03d}.png"), 100 * k + n)
      truth[100 * k + n] = k
  return truth


def eval_pairs(config, split, process_count=1):
  """{image index: label} over all processes of one eval pass; asserts nothing is duplicated."""
  pairs = []
  for p in range(process_count):
    for b in input_pipeline.make_eval_data(config, split, p, process_count):
      m = b["_mask"]
      pairs += zip(util.image_index(b["image"][m]).tolist(), b["labels"][m].argmax(1).tolist())
  assert len(pairs) == len(dict(pairs))
  return dict(pairs)


def folder_config(root, **kwargs):
  return util.make_config(str(root), data_source="folder", pp_train=PP, pp_test=PP,
                          batch_eval=4, **kwargs)


def test_folder_ratio_split(tmp_path):
  truth = make_folder(tmp_path)
  config = folder_config(tmp_path)
  head, tail = eval_pairs(config, "train[:80%]", 2), eval_pairs(config, "train[80%:]")
  assert len(head) == 12 and len(tail) == 3 and {**head, **tail} == truth
  assert len(set(tail.values())) > 1 or len(set(head.values())) == 3  # classes are mixed
  batch = next(input_pipeline.make_train_iterator(config))
  assert batch["image"].shape == (4, 8, 8, 3)


def test_folder_split_subfolders(tmp_path):
  train = make_folder(tmp_path, sub="train", per_class=4)
  val = make_folder(tmp_path, classes=("cat", "emu"), sub="val", per_class=2)
  config = folder_config(tmp_path)
  assert eval_pairs(config, "train") == train
  # Class ids come from all split folders: 'emu' is 2 in val as in train.
  assert eval_pairs(config, "val") == {i: 2 * (i // 100) for i in val}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_listing_sources(tmp_path, fmt):
  rows = []
  for i in range(7):
    write_png(str(tmp_path / "img" / f"{i}.png"), i)
    rows.append((f"img/{i}.png", ["zebra", "ant", "bee"][i % 3]))
  with open(tmp_path / f"train.{fmt}", "w") as f:
    if fmt == "csv":
      f.write("path,label\n" + "".join(f"{p},{l}\n" for p, l in rows))
    else:
      f.write("".join(json.dumps({"path": p, "label": l}) + "\n" for p, l in rows))
  config = util.make_config(str(tmp_path), data_source=fmt, pp_test=PP, batch_eval=4)
  ids = {"ant": 0, "bee": 1, "zebra": 2}  # class names -> sorted ids
  assert eval_pairs(config, "train", 2) == {i: ids[l] for i, (_, l) in enumerate(rows)}
  assert sorted(eval_pairs(config, "train[2:5]")) == [2, 3, 4]  # the listing's order is kept


def test_listing_label_out_of_range_names_file(tmp_path):
  write_png(str(tmp_path / "a.png"), 0)
  (tmp_path / "train.csv").write_text("path,label\na.png,3\na.png,12\n")
  with pytest.raises(ValueError, match=r"label 12 \(.*a.png\) is outside \[0, num_classes=10\)"):
    sources.get_source(util.make_config(str(tmp_path), data_source="csv"), "train")
  (tmp_path / "train.csv").write_text("file,class\na.png,3\n")
  with pytest.raises(ValueError, match=r"train.csv: expected a header with columns path,label"):
    sources.get_source(util.make_config(str(tmp_path), data_source="csv"), "train")


def corrupt_folder(tmp_path):
  truth = make_folder(tmp_path, per_class=3)
  bad = tmp_path / "dog" / "001.png"
  bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
  (tmp_path / "emu" / "002.png").write_bytes(b"this is not an image")
  return truth, str(bad), str(tmp_path / "emu" / "002.png")


def test_corrupt_image_names_file(tmp_path):
  _, bad, junk = corrupt_folder(tmp_path)
  config = folder_config(tmp_path)
  with pytest.raises(ValueError, match="2 unreadable image file") as e:
    list(input_pipeline.make_eval_data(config, "train"))
  assert bad in str(e.value) and junk in str(e.value) and "skip_corrupt=True" in str(e.value)
  with pytest.raises(ValueError, match="unreadable image file"):
    next(input_pipeline.make_train_iterator(folder_config(tmp_path, batch=8)))


def test_skip_corrupt_skips_and_counts(tmp_path, caplog):
  truth, bad, junk = corrupt_folder(tmp_path)
  config = folder_config(tmp_path, skip_corrupt=True)
  with caplog.at_level(logging.WARNING):
    ev = input_pipeline.make_eval_data(config, "train")
  assert ev.num_examples == 7 and ev.source.num_skipped == 2
  assert "skipping 2 of 9 images" in caplog.text and bad in caplog.text
  del truth[101], truth[202]
  assert eval_pairs(config, "train") == truth
  run = [next(input_pipeline.make_train_iterator(config, start_step=k)) for k in (0, 3)]
  it = input_pipeline.make_train_iterator(config)
  np.testing.assert_array_equal([next(it) for _ in range(4)][3]["image"], run[1]["image"])


def test_missing_listed_file(tmp_path):
  (tmp_path / "test.jsonl").write_text(json.dumps({"path": "gone.png", "label": 1}) + "\n")
  config = util.make_config(str(tmp_path), data_source="jsonl", pp_test=PP)
  with pytest.raises(ValueError, match="gone.png"):
    list(input_pipeline.make_eval_data(config, "test"))


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    input_pipeline.make_eval_data(folder_config(tmp_path / "nope"), "train")
