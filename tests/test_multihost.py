"""Two processes under `jax.distributed` (gloo on 127.0.0.1, 4 CPU devices each) train as one job.

The reference is a single process with 8 devices fed the same global batches, built by
concatenating what each process's input pipeline reads: the multi-host run must end with the same
params (so the global batch was assembled from process-local parts and gradients were reduced
over both processes), and its eval must count every test example exactly once.
"""
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import TEST_XLA_FLAGS
from tests.conftest import compilation_cache_env
from tests.input_pipeline import util
from vit_jax import input_pipeline
from vit_jax import parallel
from vit_jax import train
from vit_jax.configs import vit as vit_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
OVERRIDES = dict(batch=16, batch_eval=8, total_steps=STEPS, warmup_steps=1, log_every_steps=1,
                 checkpoint_every_steps=0, shuffle_buffer=64, prefetch=1, optimizer="sgd",
                 base_lr=0.1, momentum=0.9, decay_type="constant")  # LR independent of total_steps


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# FSDP over both processes' 8 devices: every param split across hosts, each host saving and
# restoring only its own shards.
FSDP = dict(mesh=(("fsdp", -1),), sharding="fsdp", fsdp_min_size=0)


def _config(data_dir, parallelism, **overrides):
  c = vit_config.get_config("nano4,fashion_mnist")
  c.unlock()
  c.update(OVERRIDES)
  c.data_dir, c.parallelism = str(data_dir), parallelism
  c.update(overrides)
  return c


def _launch(workdir, data_dir, parallelism, **overrides):
  """Both processes of the job; each keeps its compiled executables in a cache directory of its
  own beside `workdir` (tests/conftest.py's compilation_cache_env), which a restarted job reads:
  the restart after a preemption loads what the first launch compiled instead of compiling it
  again."""
  port = _free_port()
  flags = [f"--config.{k}={repr(v) if isinstance(v, tuple) else v}"
           for k, v in dict(OVERRIDES, **overrides).items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}",
             TF_NUM_INTRAOP_THREADS="1")  # compile-bound, as tests/conftest.py says
  cache = os.path.join(os.path.dirname(workdir), "xla_cache")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}",
       "--config=vit_jax/configs/vit.py:nano4,fashion_mnist", *flags,
       f"--config.data_dir={data_dir}", f"--config.parallelism={parallelism}",
       "--config.plots=False",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=dict(env, **compilation_cache_env(os.path.join(cache, str(i)))),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _single_process_state(config):
  """The same job in this process (8 devices), fed the concatenated per-process batches."""
  iters = [input_pipeline.make_train_iterator(config, process_index=i, process_count=2)
           for i in range(2)]
  batches = [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
             for parts in (tuple(next(it) for it in iters) for _ in range(STEPS))]
  backend = parallel.get_backend(config)
  task = train.get_task(config)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))  # as train.py
  state, tx, schedules = train.create_train_state(config, task, init_rng, batches[0])
  state = backend.put_state(state)
  step = backend.compile_train_step(
      train.make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  for b in batches:
    state, _ = step(state, backend.put_batch(b), train_rng)
  return backend.get_state(state)


@pytest.mark.parametrize("parallelism,placement,preempt", [
    ("pjit", {}, False), ("pmap", {}, True), ("pjit", FSDP, True)],
    ids=["pjit", "pmap", "pjit_fsdp"])
def test_two_processes_train_as_one(tmp_path, parallelism, placement, preempt):
  os.makedirs(tmp_path / "data")
  data = util.make_idx_dir(tmp_path / "data", n_train=64, n_test=21, size=8)
  if preempt:
    # Preempted after step 2 (its checkpoint written), then restarted to the end: the resume path
    # (orbax restore on every process; under FSDP each process reads its own shards) is part of
    # what must give the single-process params. Replicated pjit restores like FSDP, with P().
    first = _launch(tmp_path / "run", data, parallelism, total_steps=STEPS - 1, **placement)
    assert "Saved checkpoint for step 2" in first[0], first[0][-3000:]
  outs = _launch(tmp_path / "run", data, parallelism, **placement)
  assert all(("Resuming at step 2" in out) == preempt for out in outs), outs[0][-3000:]
  assert "Devices: 8 (4 local, process 0 of 2)" in outs[0], outs[0][-3000:]
  assert "Devices: 8 (4 local, process 1 of 2)" in outs[1], outs[1][-3000:]
  # Both processes report the same eval over all 21 test examples (11 + 10, padded and masked).
  evals = [re.search(r"eval step 3: (.*) \(", out).group(1) for out in outs]
  assert evals[0] == evals[1] and "eval/num_examples=21.0000" in evals[0], evals

  mngr = ocp.CheckpointManager(os.path.join(tmp_path / "run", "checkpoints"))
  assert mngr.latest_step() == STEPS
  want = _single_process_state(_config(data, parallelism, **placement))
  # Restored onto this process's devices, in the single-process state's structure.
  got = mngr.restore(STEPS, args=ocp.args.StandardRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, want)))
  assert int(got.step) == STEPS
  got, want = jax.device_get((got.params, want.params))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), want, got))
  assert max(diffs) <= 1e-5, max(diffs)
  assert np.abs(got["head"]["kernel"]).max() > 1e-3  # trained: not two untouched inits
