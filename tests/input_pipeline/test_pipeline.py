"""Train/eval pipeline: sharding, padding, determinism, resume, errors."""
import itertools
import os

import numpy as np
import pytest

from tests.input_pipeline import util
from vit_jax import input_pipeline

AUGMENT = "decode|inception_crop(6, 20)|flip_lr|value_range(0, 255)|onehot(10)"


def take(iterator, n):
  return list(itertools.islice(iterator, n))


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_split_exactly_once(tmp_path, process_count):
  n = 23
  config = util.make_config(util.make_idx_dir(tmp_path, n_test=n), batch_eval=6)
  seen, batches = [], set()
  for p in range(process_count):
    ev = input_pipeline.make_eval_data(config, "test", p, process_count)
    assert ev.num_examples == n
    passes = [list(ev), list(ev)]  # iter() gives a fresh pass each time
    assert len(passes[0]) == len(passes[1]) == ev.num_batches
    batches.add(ev.num_batches)
    for b in passes[0]:
      assert b["image"].shape == (6 // process_count, 8, 8, 1) and b["_mask"].dtype == bool
      assert not b["image"][~b["_mask"]].any()  # padding is zeros
      seen += list(util.image_index(b["image"][b["_mask"]]))
  assert len(batches) == 1  # the same number of batches on every process
  assert sorted(seen) == list(range(n))


@pytest.mark.skipif(not os.path.isdir(util.FASHION_MNIST), reason="dataset-fashion-mnist missing")
def test_real_eval_two_processes_label_counts():
  config = util.make_config(None, batch_eval=1024, pp_test="decode|value_range(-1,1)|onehot(10)")
  total, examples = np.zeros(10), 0
  for p in range(2):
    for b in input_pipeline.make_eval_data(config, "test", p, 2):
      assert b["image"].dtype == np.float32 and b["labels"].shape == (512, 10)
      total += b["labels"][b["_mask"]].sum(0)
      examples += b["_mask"].sum()
  assert examples == 10000
  np.testing.assert_array_equal(total, [1000] * 10)  # Fashion-MNIST's test split is balanced


def test_batch_not_divisible(tmp_path):
  config = util.make_config(util.make_idx_dir(tmp_path), batch=10, batch_eval=9)
  with pytest.raises(ValueError, match="batch=10 is not divisible by process_count=4"):
    input_pipeline.make_train_iterator(config, 0, 4)
  with pytest.raises(ValueError, match="batch_eval=9 is not divisible by process_count=2"):
    input_pipeline.make_eval_data(config, "test", 0, 2)


def test_empty_split_raises(tmp_path):
  config = util.make_config(util.make_idx_dir(tmp_path), dataset="tiny")
  with pytest.raises(ValueError, match=r"Split 'test\[5:5\]' of dataset 'tiny' is empty"):
    input_pipeline.make_eval_data(config, "test[5:5]")


def test_pp_without_onehot_or_wrong_depth(tmp_path):
  config = util.make_config(util.make_idx_dir(tmp_path), pp_train="decode")
  with pytest.raises(ValueError, match=r"no 'labels': end it with onehot\(10\)"):
    input_pipeline.make_train_iterator(config)
  config.pp.train = "decode|onehot(12)"
  with pytest.raises(ValueError, match="labels of size 12, config.num_classes=10"):
    input_pipeline.make_train_iterator(config)


def test_train_batches_shapes_and_epoch_is_permutation(tmp_path):
  config = util.make_config(util.make_idx_dir(tmp_path, n_train=40), batch=8,
                            pp_train="decode|onehot(10)")
  batches = take(input_pipeline.make_train_iterator(config), 10)  # 2 epochs
  assert set(batches[0]) == {"image", "labels"}
  assert batches[0]["labels"].dtype == np.float32 and batches[0]["labels"].shape == (8, 10)
  ids = np.concatenate([util.image_index(b["image"]) for b in batches])
  assert sorted(ids[:40]) == list(range(40)) and sorted(ids[40:]) == list(range(40))
  assert list(ids[:40]) != list(range(40)) and list(ids[:40]) != list(ids[40:])  # shuffled
  np.testing.assert_array_equal(  # labels follow their images: label = index % 10
      np.concatenate([b["labels"].argmax(1) for b in batches]), ids % 10)


def test_train_processes_read_disjoint_parts(tmp_path):
  config = util.make_config(util.make_idx_dir(tmp_path, n_train=40), batch=8)
  parts = [np.concatenate([util.image_index(b["image"]) for b in
                           take(input_pipeline.make_train_iterator(config, p, 2), 5)])
           for p in range(2)]  # 5 batches of 4 = one epoch of each half
  assert sorted(parts[0]) == list(range(20)) and sorted(parts[1]) == list(range(20, 40))


@pytest.mark.parametrize("cache_train", [False, True])
def test_same_seed_same_batches_and_resume(tmp_path, cache_train):
  root = util.make_idx_dir(tmp_path, n_train=30)
  config = util.make_config(root, pp_train=AUGMENT, cache_train=cache_train, mixup_alpha=0.4,
                            cutmix_alpha=0.5)
  run = take(input_pipeline.make_train_iterator(config, 1, 2), 12)  # several epochs of 15
  again = take(input_pipeline.make_train_iterator(config, 1, 2), 12)
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  for k in (1, 5, 9):
    resumed = next(input_pipeline.make_train_iterator(config, 1, 2, start_step=k))
    np.testing.assert_array_equal(resumed["image"], run[k]["image"])
    np.testing.assert_array_equal(resumed["labels"], run[k]["labels"])
  config.seed = 1
  other = take(input_pipeline.make_train_iterator(config, 1, 2), 3)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(run, other))


def test_resume_with_ids(tmp_path):
  """With only cheap ops the whole pipeline is vectorised; the order must still match."""
  config = util.make_config(util.make_idx_dir(tmp_path, n_train=30), batch=6)
  run = take(input_pipeline.make_train_iterator(config, with_ids=True), 8)
  np.testing.assert_array_equal(  # '_id' is the split position, and matches the pixels
      run[0]["_id"], util.image_index(run[0]["image"]))
  resumed = take(input_pipeline.make_train_iterator(config, start_step=6, with_ids=True), 2)
  np.testing.assert_array_equal(resumed[0]["_id"], run[6]["_id"])
  np.testing.assert_array_equal(resumed[1]["_id"], run[7]["_id"])


def test_resume_far_away_skips_whole_epochs(tmp_path):
  """Step 10**9 (4e9 examples in) starts within a second: whole epochs are not replayed."""
  config = util.make_config(util.make_idx_dir(tmp_path, n_train=30), pp_train=AUGMENT)
  k = 10**9
  two = take(input_pipeline.make_train_iterator(config, start_step=k - 1), 2)
  resumed = next(input_pipeline.make_train_iterator(config, start_step=k))
  np.testing.assert_array_equal(resumed["image"], two[1]["image"])
