"""The contrastive task through the one training loop: it trains under pmap and pjit, and its
zero-shot and retrieval evaluators, run by train.evaluate over padded multi-device batches, equal
a brute-force numpy computation on the same model's embeddings."""
import numpy as np
import pytest

import jax
from tests.input_pipeline import test_captions
from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax import parallel
from vit_jax import train
from vit_jax.configs import clip as clip_config
from vit_jax.input_pipeline import ops
from vit_jax.input_pipeline import tokenizer


def _fmnist_config(data_dir, parallelism="pjit", **overrides):
  c = clip_config.get_config("nano,fashion_mnist")
  c.unlock()
  c.data_dir, c.parallelism = data_dir, parallelism
  c.model.image_size = 8
  c.model.image.patches.size = (4, 4)
  c.context_length = c.model.text.context_length = 16
  c.batch, c.batch_eval, c.total_steps, c.warmup_steps = 16, 16, 4, 1
  c.shuffle_buffer, c.prefetch, c.log_every_steps = 64, 1, 2
  c.eval_every_steps, c.checkpoint_every_steps = 0, 0
  c.zeroshot.templates = ("a photo of a {}.", "a {}.")
  c.update(overrides)
  return c


def _caption_config(root, parallelism="pjit", **overrides):
  c = clip_config.get_config("nano,captions")
  c.unlock()
  c.data_source, c.data_dir, c.parallelism = "caption_folder", root, parallelism
  c.train_split, c.eval_split = "train[:50%]", "train[50%:]"
  c.model.image_size = 8
  c.model.image.patches.size = (4, 4)
  c.context_length = c.model.text.context_length = 16
  c.pp.train = "decode|resize(8)|value_range(-1,1)|tokenize"
  c.pp.test = "decode|resize(8)|value_range(-1,1)|tokenize"
  c.batch, c.batch_eval, c.total_steps, c.warmup_steps = 8, 8, 2, 1
  c.shuffle_buffer, c.prefetch, c.log_every_steps = 16, 1, 1
  c.max_captions_eval, c.checkpoint_every_steps = 1, 0
  c.update(overrides)
  return c


# pjit only: the pmap loss is tested against one device in tests/test_losses_contrastive.py and
# the pmap eval path below; a second end-to-end run would double this file's time.
@pytest.mark.parametrize("parallelism", ["pjit"])
def test_trains_and_zeroshot_matches_numpy(tmp_path, parallelism):
  (tmp_path / "data").mkdir()
  data = util.make_idx_dir(tmp_path / "data", n_train=32, n_test=21, size=8)
  config = _fmnist_config(data, parallelism)
  result = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert result["zeroshot/num_examples"] == 21

  # Brute force: the final params, numpy embeddings, numpy top-k, over all 21 test images.
  task = train.get_task(config)
  batch = next(input_pipeline.make_train_iterator(config))
  # The restore target: the step-0 state's shapes (jax.eval_shape: no init computed).
  shapes = jax.eval_shape(lambda: train.create_train_state(config, task, jax.random.PRNGKey(0),
                                                           batch)[0])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  ckpt_state = train.checkpoint.Checkpointer(str(tmp_path / "w"), keep=1)
  params = ckpt_state.restore(ckpt_state.latest_step(), state).params
  tok = tokenizer.get_tokenizer(None, 16)
  names = ops.CLASSNAMES["fashion_mnist"]
  templates = config.zeroshot.templates
  txt = np.asarray(jax.jit(task.encode_text)(params, tok.encode([t.format(n) for n in names
                                                       for t in templates])))
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  cls = txt.reshape(len(names), len(templates), -1).mean(1)
  cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
  images, labels = [], []
  for b in input_pipeline.make_eval_data(config):
    images.append(b["image"][b["_mask"]])
    labels.append(b["labels"][b["_mask"]].argmax(-1))
  images, labels = np.concatenate(images), np.concatenate(labels)
  img = np.asarray(jax.jit(task.encode_image)(params, images))
  scores = img @ cls.T
  rank = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(1)
  assert result["zeroshot/top1"] == pytest.approx(np.mean(rank < 1), abs=1e-6)
  assert result["zeroshot/top5"] == pytest.approx(np.mean(rank < 5), abs=1e-6)
  ckpt_state.close()


@pytest.mark.parametrize("parallelism", ["pjit", "pmap"])
def test_retrieval_eval_matches_numpy(tmp_path, parallelism):
  test_captions.caption_tree(str(tmp_path / "stamps"), n=20)
  config = _caption_config(str(tmp_path / "stamps"), parallelism, evals=("retrieval",))
  task = train.get_task(config)
  backend = parallel.get_backend(config)
  batch = next(input_pipeline.make_train_iterator(config))
  state, _, _ = train.create_train_state(config, task, jax.random.PRNGKey(3), batch)
  eval_data = input_pipeline.make_eval_data(config)  # 10 images: batches of 8, one padded
  evaluators = train.compile_evaluators(task.evaluators(), backend)
  got = train.evaluate(evaluators, backend.put_state(state.params), eval_data, backend)

  images, tokens = [], []
  for b in eval_data:
    images.append(b["image"][b["_mask"]])
    tokens.append(b["tokens"][b["_mask"]][:, 0])
  img = np.asarray(jax.jit(task.encode_image)(state.params, np.concatenate(images)))
  txt = np.asarray(jax.jit(task.encode_text)(state.params, np.concatenate(tokens)))
  sim = img @ txt.T  # [images, captions]; caption i belongs to image i
  n = len(sim)
  for k in (1, 5, 10):
    i2t = np.mean([(sim[i] > sim[i, i]).sum() < k for i in range(n)])
    t2i = np.mean([(sim[:, j] > sim[j, j]).sum() < k for j in range(n)])
    assert got[f"retrieval/i2t/R@{k}"] == pytest.approx(i2t, abs=1e-6), k
    assert got[f"retrieval/t2i/R@{k}"] == pytest.approx(t2i, abs=1e-6), k
  assert got["retrieval/num_examples"] == n == 10


def test_accum_steps_refused(tmp_path):
  config = _fmnist_config(str(tmp_path), accum_steps=2)
  with pytest.raises(ValueError, match="accum_steps=2"):
    train.get_task(config)
