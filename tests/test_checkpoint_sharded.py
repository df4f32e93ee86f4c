"""Sharded checkpoints: a run saved with FSDP on 8 devices resumes on 4, on 1 with replicated
params, and back, ending with the uninterrupted run's params; it initialises another run through
`pretrained_path`; and a checkpoint damaged on disk makes the run fall back to the older one, or
fail with one error that says which step and file and what to do."""
import base64
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.input_pipeline import util
from vit_jax import checkpoint
from vit_jax import train
from vit_jax.checkpoints_convert import core as checkpoints_core
from vit_jax.configs import vit as vit_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP8 = dict(mesh=[("fsdp", -1)], sharding="fsdp")
FSDP_2X4 = dict(mesh=[("data", 2), ("fsdp", 4)], sharding="fsdp")
REPLICATE = dict(mesh=[("data", -1)], sharding="replicate")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return util.make_idx_dir(root, n_train=48, n_test=16, size=8)


@pytest.fixture(scope="module")
def fsdp8_run(tmp_path_factory, data_dir):
  """An uninterrupted run of 8 steps, FSDP over the 8 devices, with its checkpoints of steps 2, 4,
  6 and 8 kept: the reference of the resume test, and (copied, cut back to an earlier step) the
  start of the damaged-checkpoint tests, which trained these same steps from scratch before. The
  LR does not depend on total_steps (constant decay), so its checkpoint of step 4 holds what a
  4-step run ends with."""
  workdir = str(tmp_path_factory.mktemp("fsdp8") / "run")
  train.train_and_evaluate(_config(data_dir, 8, keep_checkpoints=4, **FSDP8), workdir)
  return workdir


def _run_until(fsdp8_run, workdir, step):
  """A copy of fsdp8_run's workdir as it was after `step`: its later checkpoints left out."""
  shutil.copytree(fsdp8_run, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(ckpts, name))
  return workdir


def _config(data_dir, total_steps, **overrides):
  c = vit_config.get_config("nano4,fashion_mnist")
  c.unlock()
  c.data_dir = str(data_dir)
  c.batch = c.batch_eval = 16
  c.total_steps, c.warmup_steps, c.checkpoint_every_steps = total_steps, 1, 2
  c.log_every_steps, c.shuffle_buffer, c.prefetch = 2, 64, 1
  c.decay_type = "constant"  # the LR must not depend on total_steps, which each segment sets
  # SGD: Adam turns float32 rounding differences between layouts into +-lr steps on params whose
  # exact gradient is zero (see tests/test_sharding.py).
  c.optimizer, c.base_lr, c.momentum = "sgd", 0.1, 0.9
  c.fsdp_min_size = 0
  c.update(overrides)
  return c


def _params(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert mngr.latest_step() == step, mngr.all_steps()
  return jax.device_get(mngr.restore(step, args=ocp.args.StandardRestore())["params"])


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_resume_on_other_meshes_and_device_counts(tmp_path, data_dir, fsdp8_run):
  devices = jax.devices()
  assert len(devices) == 8
  # 8 devices FSDP -> 4 devices FSDP -> 1 device replicated -> 8 devices FSDP 2 x 4. The first
  # segment (steps 1-2 on 8 devices, FSDP) is the reference run's: its checkpoint of step 2.
  run = _run_until(fsdp8_run, str(tmp_path / "run"), 2)
  for total, placement, devs in ((4, FSDP8, devices[:4]), (6, REPLICATE, devices[:1]),
                                 (8, FSDP_2X4, devices)):
    train.train_and_evaluate(_config(data_dir, total, **placement), run, devices=devs)
  want, got = _params(fsdp8_run, 8), _params(run, 8)
  assert _max_diff(want, got) <= 1e-5, _max_diff(want, got)
  assert np.abs(got["head"]["kernel"]).max() > 1e-3  # trained, not two zero heads
  # Saved as laid out: orbax records each array's sharding (the last segment's FSDP 2 x 4 mesh).
  with open(os.path.join(run, "checkpoints", "8", "default", "_sharding")) as f:
    saved = {base64.b64decode(k).decode(): json.loads(v) for k, v in json.load(f).items()}
  kernel = saved["params.Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel"]
  assert kernel["partition_spec"] == [None, "fsdp"] and kernel["shape"] == [2, 4], kernel

  # pretrained_path: the FSDP-8 checkpoint initialises a run on 4 devices with replicated params.
  config = _config(data_dir, 1, pretrained_path=run, **REPLICATE)
  task = train.get_task(config)
  batch = {"image": np.zeros((2, 8, 8, 1), np.float32), "labels": np.zeros((2, 10), np.float32)}
  params = task.init_params(jax.random.PRNGKey(1), batch)
  assert _max_diff(got, params) == 0.0
  # ... and the same file reads as a plain param tree (e.g. to export it).
  state = checkpoints_core.read_state(os.path.join(run, "checkpoints", "8"))
  assert set(state.arrays) == {"/".join(k.key for k in p) for p, _ in
                               jax.tree_util.tree_leaves_with_path(got)}


def _truncate_largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  victim = max(files, key=os.path.getsize)
  size = os.path.getsize(victim)
  with open(victim, "r+b") as f:
    f.truncate(size // 2)
  return victim, size


def test_damaged_latest_checkpoint_falls_back_to_the_older_one(tmp_path, data_dir, fsdp8_run,
                                                              caplog):
  run = _run_until(fsdp8_run, str(tmp_path / "run"), 4)  # checkpoints 2 and 4
  want = _params(run, 4)  # what the rerun of steps 3-4 must reproduce
  victim, _ = _truncate_largest_file(os.path.join(run, "checkpoints", "4"))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(_config(data_dir, 4, **FSDP8), run)
  log = caplog.text
  assert "Checkpoint for step 4 cannot be read back" in log and victim in log, log
  assert "Resuming from the older checkpoint for step 2 instead of step 4" in log, log
  # Nothing is lost: the damaged checkpoint is kept beside the others, with the reason.
  kept = glob.glob(os.path.join(run, "checkpoints", "corrupt_4_*"))
  assert len(kept) == 1 and victim.split("/4/")[1] in open(os.path.join(kept[0], "WHY.txt")).read()
  assert _max_diff(want, _params(run, 4)) <= 1e-5


def test_damaged_only_checkpoint_is_one_clear_error(tmp_path, data_dir, fsdp8_run):
  run = _run_until(fsdp8_run, str(tmp_path / "run"), 2)  # checkpoint 2 only
  victim, size = _truncate_largest_file(os.path.join(run, "checkpoints", "2"))
  # From the command line: a short traceback ending in one error that names the step, the file
  # and what to do (not hundreds of lines of "Event loop is closed").
  cmd = [sys.executable, "-m", "vit_jax.main", f"--workdir={run}",
         "--config=vit_jax/configs/vit.py:nano4,fashion_mnist", f"--config.data_dir={data_dir}",
         "--config.batch=16", "--config.batch_eval=16", "--config.total_steps=4",
         "--config.plots=False",
         "--config.mesh=(('fsdp', -1),)", "--config.sharding=fsdp", "--config.fsdp_min_size=0"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  err = out.stderr
  assert "CheckpointReadError: Cannot resume from" in err, err[-3000:]
  assert "the checkpoint for step 2 is unreadable" in err and victim in err, err[-3000:]
  assert f"{size // 2} bytes, written with {size}" in err and "Restore the file" in err
  traceback_lines = err[err.index("Traceback"):].splitlines()
  assert len(traceback_lines) < 40, err[-5000:]
  assert "Event loop is closed" not in err and "During handling" not in err


def test_clip_checkpoint_saved_sharded_is_a_pretrained_path(tmp_path):
  # CLIP params saved under tensor parallelism x FSDP initialise a CLIP run with replicated params.
  from tests import test_sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  config = test_sharding._clip_config(mesh=(("fsdp", 4), ("model", 2)), sharding="fsdp",
                                      sharding_rules=("tensor_parallel",))
  backend = parallel.get_backend(config)
  batch = test_sharding._batches(config, 1)[0]
  _, state, _, _ = test_sharding._init(config, batch)
  state = backend.put_state(state)
  kernel = state.params["txt"]["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, state)
  ckpt.close()
  saved = jax.device_get(state.params)
  fresh = test_sharding._clip_config(pretrained_path=str(tmp_path))
  params = train.get_task(fresh).init_params(jax.random.PRNGKey(7), batch)
  assert _max_diff(saved, params) == 0.0
