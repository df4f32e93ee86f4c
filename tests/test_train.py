"""The training loop end to end: SIGKILL + resume gives the uninterrupted run's params; bad
config and bad data fail with errors that say what is wrong."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import compilation_cache_env
from tests.input_pipeline import util
from vit_jax import train
from vit_jax.configs import vit as vit_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny model on a tiny idx dataset; pmap and pjit both see the 8 fake devices from conftest.
FLAGS = [
    "--config=vit_jax/configs/vit.py:nano4,fashion_mnist",
    "--config.batch=16", "--config.batch_eval=16", "--config.total_steps=12",
    "--config.warmup_steps=2", "--config.checkpoint_every_steps=4", "--config.log_every_steps=4",
    "--config.shuffle_buffer=64", "--config.prefetch=1", "--config.plots=False",
    "--config.model.transformer.dropout_rate=0.1",  # randomness must resume too
]

# Runs the CLI, but SIGKILLs itself right after the checkpoint of step 8 is on disk: a crash at
# the worst moment for data order (mid-epoch), with no chance to clean up.
_KILL_AFTER_SAVE = """
import os, signal, sys
from absl import app
from vit_jax import checkpoint, main
_save = checkpoint.Checkpointer.save
def save(self, step, state, **kw):
  _save(self, step, state, **kw)
  if step == 8:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save
sys.argv = ["main"] + sys.argv[1:]
app.run(main.main)
"""


def _make_data(root, **kwargs):
  os.makedirs(root, exist_ok=True)
  return util.make_idx_dir(root, size=8, **kwargs)


def _run_cli(workdir, data_dir, *extra, kill_after_save=False, xla_cache=None):
  """xla_cache: a directory that the runs of one test share their compiled executables through
  (tests/conftest.py's compilation_cache_env): the killed and the resumed run load what the
  reference run compiled instead of compiling it again (~10 s a run)."""
  args = ["-c", _KILL_AFTER_SAVE] if kill_after_save else ["-m", "vit_jax.main"]
  cmd = [sys.executable, *args, f"--workdir={workdir}", *FLAGS, f"--config.data_dir={data_dir}",
         *extra]
  env = dict(os.environ, **compilation_cache_env(xla_cache)) if xla_cache else None
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _final_params(workdir, step=12):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert mngr.latest_step() == step, mngr.all_steps()
  return mngr.restore(step, args=ocp.args.StandardRestore())["params"]


@pytest.mark.parametrize("parallelism", ["pjit", "pmap"])
def test_sigkill_and_resume_matches_uninterrupted(tmp_path, parallelism):
  data = _make_data(tmp_path / "data", n_train=40, n_test=20)
  par = f"--config.parallelism={parallelism}"
  cache = tmp_path / "xla_cache"
  ref = _run_cli(tmp_path / "ref", data, par, xla_cache=cache)
  assert ref.returncode == 0, ref.stderr[-3000:]

  killed = _run_cli(tmp_path / "run", data, par, kill_after_save=True, xla_cache=cache)
  assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
  steps = ocp.CheckpointManager(os.path.join(tmp_path / "run", "checkpoints")).all_steps()
  assert max(steps) == 8, steps  # died after step 8's checkpoint, before the end

  resumed = _run_cli(tmp_path / "run", data, par, xla_cache=cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming at step 8" in resumed.stderr

  want, got = _final_params(tmp_path / "ref"), _final_params(tmp_path / "run")
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), want, got))
  assert max(diffs) == 0.0, max(diffs)


def test_unknown_config_key_fails_loudly(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "vit_jax.main", f"--workdir={tmp_path}",
       "--config=vit_jax/configs/vit.py:nano4,fashion_mnist", "--config.totl_steps=5"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "totl_steps" in result.stderr
  config = vit_config.get_config("nano4,fashion_mnist")  # a notebook edit fails the same way
  with pytest.raises(AttributeError, match="totl_steps"):
    config.totl_steps = 5


def test_unknown_model_and_dataset_are_clear():
  with pytest.raises(ValueError, match="Unknown model 'q16'"):
    vit_config.get_config("q16,cifar10")
  with pytest.raises(ValueError, match="Unknown dataset 'cifar11'.*cifar10"):
    vit_config.get_config("b16,cifar11")


def _small_config(data_dir, **overrides):
  c = vit_config.get_config("nano4,fashion_mnist")
  c.unlock()
  c.data_dir = str(data_dir)
  c.batch = c.batch_eval = 8
  c.total_steps, c.checkpoint_every_steps = 2, 0
  c.update(overrides)
  return c


def test_missing_data_dir_names_it(tmp_path):
  missing = tmp_path / "no_such_dir"
  with pytest.raises(Exception, match="no_such_dir"):
    train.train_and_evaluate(_small_config(missing), str(tmp_path / "w"))


def test_empty_eval_split_is_clear(tmp_path):
  data = _make_data(tmp_path / "data", n_train=16, n_test=8)
  with pytest.raises(ValueError, match=r"(?i)empty|no examples"):
    train.train_and_evaluate(_small_config(data, eval_split="test[:0]"), str(tmp_path / "w"))


def test_full_eval_split_counted_once(tmp_path):
  # 21 test examples with eval batch 8: the last batch is padded; every example counts once.
  data = _make_data(tmp_path / "data", n_train=16, n_test=21)
  result = train.train_and_evaluate(_small_config(data), str(tmp_path / "w"))
  assert result["eval/num_examples"] == 21
  assert 0.0 <= result["eval/accuracy"] <= 1.0


def test_early_stopping_on_scripted_metric_keeps_best(tmp_path, monkeypatch):
  # Evals every 2 steps see accuracy 0.5, 0.7 (best, step 4), 0.6, 0.65: with patience 2 the run
  # stops at step 8, long before total_steps, and best/ holds the params of step 4.
  scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.9])
  evaluated_at = []

  def fake_evaluate(evaluators, params, eval_data, backend, **unused):
    evaluated_at.append(True)
    return {"eval/accuracy": next(scripted)}

  monkeypatch.setattr(train, "evaluate", fake_evaluate)
  data = _make_data(tmp_path / "data", n_train=16, n_test=8)
  config = _small_config(data, total_steps=20, eval_every_steps=2, checkpoint_every_steps=2,
                         keep_checkpoints=20)
  config.early_stopping.metric, config.early_stopping.patience = "eval/accuracy", 2
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(config, workdir)

  assert len(evaluated_at) == 4
  latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert latest.latest_step() == 8
  best = ocp.CheckpointManager(os.path.join(workdir, "best"))
  assert best.all_steps() == [4]
  want = latest.restore(4, args=ocp.args.StandardRestore())["params"]
  got = best.restore(4, args=ocp.args.StandardRestore())["params"]
  step8 = latest.restore(8, args=ocp.args.StandardRestore())["params"]
  jax.tree.map(np.testing.assert_array_equal, want, got)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(step8)))


def test_recipe_field_sets_param_groups():
  config = vit_config.get_config("b16,cifar10,freeze6")
  regex, group = config.param_groups[0]
  assert group["frozen"] and "encoderblock_(0|1|2|3|4|5)" in regex
  assert vit_config.get_config("b16,cifar10,layerwise_decay").layerwise_lr_decay == 0.65
  with pytest.raises(ValueError, match="Unknown recipe 'freez'"):
    vit_config.get_config("b16,cifar10,freez")
