"""WiSE-FT: the weight-space mix against its closed form (LoRA merged first), clear errors on
mismatched trees, and a sweep over a nano CLIP run's workdir whose alpha 0 / 0.5 / 1 rows equal
train.evaluate on the run's step-0 init, the midpoint and its checkpoint; the CLI's params
loading (latest checkpoint, --zeroshot file) against the trees that were saved."""
import flax
import jax
import numpy as np
import pytest

from tests import test_contrastive
from tests.input_pipeline import test_captions
from tests.input_pipeline import util
from vit_jax import checkpoint
from vit_jax import checkpoints_convert
from vit_jax import input_pipeline
from vit_jax import parallel
from vit_jax import train
from vit_jax.evaluation import wise_ft


def _trees():
  rng = np.random.default_rng(0)
  leaf = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  zs = {"img": {"query": {"kernel": leaf(4, 2, 3), "bias": leaf(2, 3)}}, "logit_scale": leaf()}
  ft = jax.tree.map(lambda x: x + leaf(*x.shape), zs)
  return zs, ft


def test_interpolate_closed_form():
  zs, ft = _trees()
  for a, b in zip(jax.tree.leaves(wise_ft.interpolate(zs, ft, 0.0)), jax.tree.leaves(zs)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(wise_ft.interpolate(zs, ft, 1.0)), jax.tree.leaves(ft)):
    np.testing.assert_array_equal(a, b)
  mid = wise_ft.interpolate(flax.core.freeze(zs), ft, 0.5)
  assert isinstance(mid, dict) and not isinstance(mid, flax.core.FrozenDict)  # ft's structure
  for got, a, b in zip(jax.tree.leaves(mid), jax.tree.leaves(zs), jax.tree.leaves(ft)):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, (a.astype(np.float64) + b) / 2, rtol=1e-6, atol=1e-7)


def test_interpolate_merges_lora_first():
  zs, ft = _trees()
  rng = np.random.default_rng(1)
  a = rng.standard_normal((4, 2)).astype(np.float32)  # [fan_in, rank]
  b = rng.standard_normal((2, 6)).astype(np.float32)  # [rank, heads * head_dim]
  ft_lora = {**ft, "lora": {"img.query.kernel": {"a": a, "b": b}}}
  with pytest.raises(ValueError, match="lora_alpha"):
    wise_ft.interpolate(zs, ft_lora, 0.5)
  got = wise_ft.interpolate(zs, ft_lora, 0.25, lora_alpha=4.0)
  assert "lora" not in got
  merged = ft["img"]["query"]["kernel"] + (4.0 / 2) * (a @ b).reshape(4, 2, 3)
  np.testing.assert_allclose(got["img"]["query"]["kernel"],
                             0.75 * zs["img"]["query"]["kernel"] + 0.25 * merged, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(got["logit_scale"], 0.75 * zs["logit_scale"] +
                             0.25 * ft["logit_scale"], rtol=1e-6)


def test_interpolate_mismatch_names_path():
  zs, ft = _trees()
  missing = {"img": {"query": {"kernel": ft["img"]["query"]["kernel"]}},
             "logit_scale": ft["logit_scale"]}
  with pytest.raises(ValueError, match="'img/query/bias' is only in the zero-shot"):
    wise_ft.interpolate(zs, missing, 0.5)
  reshaped = jax.tree.map(lambda x: x, ft)
  reshaped["img"]["query"]["bias"] = np.zeros((3, 2), np.float32)
  with pytest.raises(ValueError, match=r"'img/query/bias' has shape \(2, 3\) .* \(3, 2\)"):
    wise_ft.interpolate(zs, reshaped, 0.5)


def test_overrides():
  got = wise_ft.parse_overrides(["eval_split=train[:10%],batch_eval=8",
                                 "zeroshot.classnames=('a', 'b, c'),remat=True"])
  assert got == {"eval_split": "train[:10%]", "batch_eval": 8,
                 "zeroshot.classnames": ("a", "b, c"), "remat": True}
  config = test_contrastive._fmnist_config("/nonexistent")  # pylint: disable=protected-access
  config.lock()
  ref = wise_ft.override_config(config, got)
  assert ref.zeroshot.classnames == ("a", "b, c") and config.zeroshot.classnames is None
  with pytest.raises(KeyError, match="'zeroshot.classname'"):
    wise_ft.override_config(config, {"zeroshot.classname": ("a",)})


def test_load_params_needs_a_checkpoint(tmp_path):
  config = test_contrastive._fmnist_config(str(tmp_path))  # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match="no such directory"):
    wise_ft.load_params(config, str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    wise_ft.load_params(config, str(tmp_path))


def test_sweep_ends_equal_evaluate(tmp_path, capsys):
  (tmp_path / "data").mkdir()
  data = util.make_idx_dir(tmp_path / "data", n_train=32, n_test=21, size=8)
  config = test_contrastive._fmnist_config(data)  # pylint: disable=protected-access
  workdir = str(tmp_path / "w")
  # A "fine-tuned" run: its step-0 init, perturbed, saved as step 3 the way the loop saves.
  task = train.get_task(config)
  batch = next(input_pipeline.make_train_iterator(config))
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))  # train_and_evaluate's
  state = train.create_train_state(config, task, init_rng, batch)[0]
  init = state.params
  rng = np.random.default_rng(7)  # numpy: jax.random would compile one program per leaf shape
  tuned = jax.tree.map(lambda x: np.asarray(x) + 0.5 * rng.standard_normal(x.shape, np.float32),
                       init)
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(3, state.replace(step=state.step + 3, params=tuned))
  ckpt.close()

  zs, ft, zs_what, ft_what = wise_ft.load_params(config, workdir)
  assert "step-0 init" in zs_what and "step 3" in ft_what
  reference = {"eval_split": "train", "zeroshot.templates": ("a {}.",)}
  rows = wise_ft.sweep(config, zs, ft, [0, 0.5, 1], reference)
  assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
  table = capsys.readouterr().out
  assert "target zeroshot/top1" in table and "reference zeroshot/top5" in table

  # Independently: train.evaluate on the init, the midpoint and the saved params.
  mid = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, init, tuned)
  backend = parallel.get_backend(config)
  ref_config = wise_ft.override_config(config, reference)
  for name, cfg in (("target", config), ("reference", ref_config)):
    evaluators = train.compile_evaluators(train.get_task(cfg).evaluators(), backend)
    eval_data = input_pipeline.make_eval_data(cfg)
    for row, params in zip(rows, (init, mid, tuned)):
      want = train.evaluate(evaluators, backend.put_state(params), eval_data, backend)
      assert row[name] == pytest.approx(want, abs=1e-6), (name, row["alpha"])
  assert rows[0]["reference"]["zeroshot/num_examples"] == 32
  assert rows[0]["target"] != rows[-1]["target"]  # the two ends are different models


def test_load_params_zeroshot_file(tmp_path):
  """--zeroshot: a pretrained file (here an HF CLIPModel directory), loaded as the task loads
  config.pretrained_path; the fine-tuned params: the workdir's latest checkpoint. RGB captioned
  data: the HF format has 3 input channels."""
  test_captions.caption_tree(str(tmp_path / "stamps"), n=8)
  config = test_contrastive._caption_config(  # pylint: disable=protected-access
      str(tmp_path / "stamps"))
  task = train.get_task(config)
  batch = next(iter(input_pipeline.make_eval_data(config)))
  state = train.create_train_state(config, task, jax.random.PRNGKey(5), batch)[0]
  tuned = jax.tree.map(lambda x: x + 1, state.params)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "w"))
  ckpt.save(1, state)
  ckpt.save(2, state.replace(params=tuned))
  ckpt.close()
  pretrained = jax.tree.map(lambda x: -x, state.params)
  hf_dir = checkpoints_convert.export_hf_clip(pretrained, config.model, str(tmp_path / "hf"))

  zs, ft, zs_what, ft_what = wise_ft.load_params(config, str(tmp_path / "w"), hf_dir)
  assert zs_what == hf_dir and "step 2" in ft_what
  for name, got, want in (("zero-shot", zs, pretrained), ("fine-tuned", ft, tuned)):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6,
                                 err_msg=f"{name} {jax.tree_util.keystr(path)}")
