"""The one training loop, shared by every task.

`train_and_evaluate(config, workdir)`: builds the task (model, loss, evaluators), the optimizer
(optim.py), the parallel back-end (parallel.py), the input pipeline, and runs
    batch -> compiled train_step(state, batch, rng) -> metrics -> clu writers
with orbax checkpoints every `checkpoint_every_steps` and evaluations every `eval_every_steps`.
A run restarted in the same workdir resumes from the latest checkpoint with the same data order
(the input pipeline restarts at that step) and the same randomness (rng folded with the step).
Nothing here is specific to a task.
"""
import importlib
import json
import logging as std_logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import checkpoint
from vit_jax import configs
from vit_jax import evaluation
from vit_jax import files
from vit_jax import optim
from vit_jax import parallel

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: the number of updates applied so far
  params: PyTree
  opt_state: PyTree


def get_task(config):
  """The task named by `config.task` (imported lazily: each task pulls in its own model).

  Besides the three built-in names, `config.task` may name a task class of your own, as
  "package.module:ClassName" or "path/to/file.py:ClassName": `Class(config)` with `init_params`,
  `loss_fn` and `evaluators` as in tasks/classification.py, trained by this same loop.
  """
  if config.task == "classification":
    from vit_jax.tasks import classification
    return classification.ClassificationTask(config)
  if config.task == "contrastive":
    from vit_jax.tasks import contrastive
    return contrastive.ContrastiveTask(config)
  if config.task == "detection":
    from vit_jax.tasks import detection
    return detection.DetectionTask(config)
  if ":" in config.task:
    return _import_task(config.task)(config)
  raise ValueError(f"config.task={config.task!r}: expected one of ['classification', "
                   "'contrastive', 'detection'], or 'module:Class' / 'file.py:Class' for a task "
                   "of your own.")


def _import_task(spec: str):
  where, _, name = spec.rpartition(":")
  module = (configs.import_file(where) if where.endswith(".py") else
            importlib.import_module(where))
  if not hasattr(module, name):
    raise AttributeError(f"config.task={spec!r}: {where} has no {name!r}.")
  return getattr(module, name)


def _split_microbatches(batch: PyTree, accum_steps: int) -> PyTree:
  """[batch, ...] -> [accum_steps, batch / accum_steps, ...].

  Micro-batch i takes rows i, i + accum_steps, ...: the row axis keeps its device sharding, so
  every micro-batch is spread over all devices (a plain reshape would put micro-batch 0 on the
  first devices only and force a reshuffle).
  """
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f"Per-device batch {x.shape[0]} is not divisible by "
                       f"config.accum_steps={accum_steps}.")
    return jnp.swapaxes(x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedules: Dict[str, Callable], mean_fn: Callable,
                    accum_steps: int = 1) -> Callable:
  """The train step, written once for every task and both back-ends.

  loss_fn(params, batch, rng) -> (scalar loss, dict of scalar metrics), a mean over `batch`.
  mean_fn: the back-end's cross-device mean (lax.pmean under pmap, identity under pjit).
  Returns step(state, batch, rng) -> (new state, metrics).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      micro = _split_microbatches(batch, accum_steps)

      def body(carry, xs):
        mb, i = xs
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

      first = jax.tree.map(lambda x: x[0], micro)
      (l0, a0), g0 = grad_fn(state.params, first, jax.random.fold_in(rng, 0))
      rest = (jax.tree.map(lambda x: x[1:], micro), jnp.arange(1, accum_steps))
      (loss, aux, grads), _ = jax.lax.scan(body, (l0, a0, g0), rest)
      # Equal micro-batches: the mean of their means is the mean over the whole batch.
      loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, (loss, aux, grads))

    loss, aux, grads = mean_fn((loss, aux, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params)}
    metrics.update({f"lr/{name}": fn(state.step) for name, fn in schedules.items()})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def memory_analysis(compiled) -> Dict[str, int]:
  """Per-device bytes of a compiled step: arguments, outputs, temporaries, and the peak estimate
  (arguments + outputs + temporaries - donated-and-reused); {} where the back-end gives none."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return {}
  m = m[0] if isinstance(m, (list, tuple)) else m
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "temp", "alias", "generated_code")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def format_memory(mem: Dict[str, int]) -> str:
  if not mem:
    return "memory analysis unavailable on this back-end"
  mib = lambda k: f"{mem[k] / 2**20:,.1f} MiB"
  return (f"per-device memory: arguments {mib('argument')}, outputs {mib('output')} "
          f"({mib('alias')} reuse donated inputs), temporaries {mib('temp')}, "
          f"peak ~{mib('peak')}")


def create_train_state(config, task, rng: jax.Array, batch) -> Tuple[TrainState, Any, Dict]:
  """Step-0 state for `task` (params for `batch`'s shapes, pretrained if the config says so) and
  the optimizer: returns (state, tx, schedules), on the host, before `backend.put_state`."""
  params = task.init_params(rng, batch)
  tx, schedules = optim.make_optimizer(config, params)
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params))
  return state, tx, schedules


class EarlyStopping:
  """Stops when `metric` has not improved by `min_delta` for `patience` evaluations.

  Its state lives in `workdir/early_stopping.json` (written atomically) so a resumed run
  continues counting where the interrupted one was.
  """

  def __init__(self, cfg, workdir: str):
    self.metric, self.mode = cfg.metric, cfg.mode
    self.patience, self.min_delta = cfg.patience, cfg.min_delta
    if self.mode not in ("max", "min"):
      raise ValueError(f"config.early_stopping.mode={self.mode!r}: expected 'max' or 'min'.")
    self.path = epath.Path(workdir) / "early_stopping.json"  # local or gs://
    self.best, self.best_step, self.bad_evals = None, None, 0
    if self.path.exists():
      saved = json.loads(self.path.read_text())
      self.best, self.best_step, self.bad_evals = (saved["best"], saved["best_step"],
                                                   saved["bad_evals"])

  def update(self, step: int, metrics: Dict[str, float]) -> Tuple[bool, bool]:
    """Returns (improved, should_stop)."""
    if self.metric not in metrics:
      raise KeyError(f"config.early_stopping.metric={self.metric!r} is not among the eval "
                     f"metrics {sorted(metrics)}.")
    value = float(metrics[self.metric])
    sign = 1.0 if self.mode == "max" else -1.0
    improved = self.best is None or sign * (value - self.best) > self.min_delta
    if improved:
      self.best, self.best_step, self.bad_evals = value, step, 0
    else:
      self.bad_evals += 1
    files.write_atomic(self.path, json.dumps({"best": self.best, "best_step": self.best_step,
                                              "bad_evals": self.bad_evals}))
    return improved, self.bad_evals >= self.patience


class _DropLibraryInfo(std_logging.Filter):
  """Orbax logs a dozen INFO lines per save through absl; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno > std_logging.INFO or "/orbax/" not in record.pathname


def _quiet_library_logs() -> None:
  absl_logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _DropLibraryInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropLibraryInfo())


def _hide_accelerators_from_tf() -> None:
  # tf.data runs on the host; TF must not grab GPU/TPU memory that JAX needs.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None


def _make_writer(workdir: str):
  from clu import metric_writers  # lazy: pulls in TensorFlow's summary ops
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


def _placement(config, backend) -> str:
  if backend.name == "pmap":
    return f"pmap ({backend.n_local} local devices, replicated)"
  rules = f", {len(backend.plan.rules)} sharding rules" if backend.plan.rules else ""
  return f"pjit mesh {dict(backend.mesh.shape)}, sharding={config.sharding}{rules}"


def _format_line(step: int, total: int, metrics: Dict[str, float], steps_per_s: float,
                 batch: int) -> str:
  eta = (total - step) / steps_per_s if steps_per_s > 0 else float("nan")
  parts = [f"step {step}/{total}"]
  parts += [f"{k}={v:.4g}" for k, v in metrics.items()]
  parts += [f"steps/s={steps_per_s:.2f}", f"images/s={steps_per_s * batch:.1f}",
            f"ETA={int(eta // 60)}m{int(eta % 60):02d}s" if np.isfinite(eta) else "ETA=?"]
  return " ".join(parts)


def _format_eval(metrics: Dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def as_evaluator(spec) -> evaluation.Evaluator:
  """A task's evaluator: an `evaluation.Evaluator`, or a plain (eval_fn, finalize) pair."""
  if isinstance(spec, evaluation.Evaluator):
    return spec
  eval_fn, finalize = spec
  return evaluation.Evaluator(step=lambda params, aux, batch: eval_fn(params, batch),
                              finalize=finalize)


def device_batch(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The arrays of a batch that go to the devices: strings (captions, file paths) stay on the
  host, where jax could not take them."""
  return {k: v for k, v in batch.items() if np.asarray(v).dtype != object}


def compile_evaluators(task_evaluators, backend) -> Dict[str, Tuple[Any, Callable]]:
  """{name: (evaluator, compiled step((params, aux), batch))}."""
  out = {}
  for name, spec in task_evaluators.items():
    ev = as_evaluator(spec)
    fn = lambda pa, batch, ev=ev: ev.step(pa[0], pa[1], batch)
    out[name] = (ev, backend.compile_eval_step(fn, reduce=ev.reduce))
  return out


def evaluate(evaluators, params, eval_data, backend, *, step: Optional[int] = None,
             workdir: Optional[str] = None) -> Dict[str, float]:
  """Runs every evaluator over one full pass of `eval_data`; returns `{name/metric: value}`.

  With `workdir`, evaluators that write files (`Evaluator.write`) do so on process 0.
  """
  results = {}
  for name, (ev, step_fn) in evaluators.items():
    aux = None
    if ev.prepare is not None:
      aux = backend.put_state(ev.prepare(backend.get_state(params)))
    outputs = None
    for batch in eval_data:
      out = step_fn((params, aux), backend.put_batch(device_batch(batch)))
      if ev.reduce == "sum":
        outputs = out if outputs is None else jax.tree.map(jnp.add, outputs, out)  # on device
      else:
        outputs = (outputs or []) + [backend.fetch_examples(out)]
    if outputs is None:
      raise ValueError(f"Evaluator {name!r}: the eval split gave no batches.")
    if ev.reduce == "sum":
      outputs = backend.fetch(outputs)
    else:
      outputs = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
    metrics = ev.finalize(outputs)
    if ev.write is not None and workdir is not None and jax.process_index() == 0:
      ev.write(outputs, step, workdir)
    if "num_examples" in metrics and int(metrics["num_examples"]) != eval_data.num_examples:
      raise RuntimeError(f"Evaluator {name!r} counted {int(metrics['num_examples'])} examples; "
                         f"the split has {eval_data.num_examples}.")
    results.update({f"{name}/{k}": v for k, v in metrics.items()})
  return results


def state_memory(state: TrainState, backend) -> Dict[str, int]:
  """Bytes of params and optimizer state that one device holds (the largest shard per leaf)."""
  shardings = backend.shardings(state)
  return {"params": parallel.bytes_per_device(state.params, shardings and shardings.params),
          "opt_state": parallel.bytes_per_device(state.opt_state,
                                                 shardings and shardings.opt_state)}


def train_and_evaluate(config, workdir: str, *, devices=None,
                       on_eval: Optional[Callable[[int, Dict[str, float]], bool]] = None
                       ) -> Dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last eval.

  `devices`: the devices to run on (default all; under pmap, this process's). A run resumes on
  any number of devices: the checkpoint is re-laid onto the new mesh as it is read.
  `on_eval(step, metrics)`: called after each evaluation (on every process; multi-process
  callers must return the same answer everywhere); returning True stops the run there, after a
  checkpoint, as early stopping does (sweep.py reports to optuna's pruner through it).
  """
  from vit_jax import input_pipeline  # lazy: imports TensorFlow
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or gs://bucket/...
  if jax.process_index() == 0:  # predict.py and export.py rebuild the model from it
    configs.save_run_config(config, workdir)
  _quiet_library_logs()
  _hide_accelerators_from_tf()
  backend = parallel.get_backend(config, devices)
  task = get_task(config)
  pid, pcount = jax.process_index(), jax.process_count()
  logging.info("Devices: %d (%d local, process %d of %d), back-end %s, platform %s",
               jax.device_count() if devices is None else len(devices),
               jax.local_device_count() if devices is None else len(
                   [d for d in devices if d.process_index == pid]), pid, pcount, backend.name,
               jax.default_backend())

  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = ckpt.latest_step() or 0
  make_iter = lambda step: input_pipeline.make_train_iterator(
      config, process_index=pid, process_count=pcount, start_step=step)
  train_iter = make_iter(start_step)
  first_batch = next(train_iter)
  eval_data = input_pipeline.make_eval_data(config, split=config.eval_split, process_index=pid,
                                            process_count=pcount)

  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  state, tx, schedules = create_train_state(config, task, init_rng, first_batch)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  per_device = state_memory(state, backend)
  logging.info("Parameters: %s (%.1f MiB); optimizer state: %.1f MiB; per device under %s: "
               "params %.1f MiB, optimizer state %.1f MiB", f"{num_params:,}",
               optim.tree_bytes(state.params) / 2**20, optim.tree_bytes(state.opt_state) / 2**20,
               _placement(config, backend), per_device["params"] / 2**20,
               per_device["opt_state"] / 2**20)
  if start_step:
    # Restored straight into this run's layout (any mesh, any device count). A checkpoint that
    # does not read back is moved aside and the next older one used; its step restarts the data.
    restored, state = ckpt.restore_latest(backend.restore_target(state))
    if restored != start_step:
      train_iter.close()
      train_iter, start_step = make_iter(restored), restored
      first_batch = next(train_iter)
    logging.info("Resuming at step %d", start_step)
  state = backend.put_state(state)

  train_step = backend.compile_train_step(
      make_train_step(task.loss_fn, tx, schedules, backend.mean, config.accum_steps))
  # Compiled ahead of the loop, so its memory needs are known before the first step runs out of
  # memory. Under pjit the loop then calls this executable (no second compile). Under pmap it
  # keeps calling the pmapped function: with several processes a pmap step returns global arrays
  # whose types differ from the per-process inputs it was compiled for, which only the pmap
  # dispatcher accepts (one more compile, on the first step).
  t_compile = time.perf_counter()
  compiled = train_step.lower(state, backend.put_batch(device_batch(first_batch)),
                              train_rng).compile()
  logging.info("Train step compiled in %.1fs; %s", time.perf_counter() - t_compile,
               format_memory(memory_analysis(compiled)))
  if backend.name == "pjit":
    train_step = compiled
  evaluators = compile_evaluators(task.evaluators(), backend)
  stopper = EarlyStopping(config.early_stopping, workdir) if config.early_stopping.metric else None
  best_ckpt = checkpoint.Checkpointer(workdir, keep=1, name="best") if stopper else None

  writer = _make_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})

  total = config.total_steps
  pending, t0, step0 = [], time.perf_counter(), start_step
  last_eval: Dict[str, float] = {}
  step = start_step
  batch = first_batch
  while step < total:
    state, metrics = train_step(state, backend.put_batch(device_batch(batch)), train_rng)
    step += 1
    pending.append(metrics)  # device arrays: no host sync until log time
    if step < total:
      batch = next(train_iter)

    if step % config.log_every_steps == 0 or step == total or step == start_step + 1:
      fetched = backend.fetch(pending)
      # Losses and accuracies are averaged over the interval; learning rates are shown as of now.
      mean_metrics = {k: float(fetched[-1][k] if k.startswith("lr/") else
                               np.mean([m[k] for m in fetched])) for k in fetched[0]}
      now = time.perf_counter()
      # The first step includes compilation: rates start from the step after it.
      sps = (step - step0) / (now - t0) if step > start_step + 1 else 0.0
      if step == start_step + 1:
        t0, step0 = now, step
      writer.write_scalars(step, {f"train/{k}": v for k, v in mean_metrics.items()})
      if sps:
        writer.write_scalars(step, {"steps_per_sec": sps, "images_per_sec": sps * config.batch})
      logging.info("%s", _format_line(step, total, mean_metrics, sps, config.batch))
      pending = []

    is_eval = step == total or (config.eval_every_steps and step % config.eval_every_steps == 0)
    should_stop = False
    if is_eval:
      t_eval = time.perf_counter()
      last_eval = evaluate(evaluators, state.params, eval_data, backend, step=step,
                           workdir=workdir)
      writer.write_scalars(step, last_eval)
      logging.info("eval step %d: %s (%.1fs)", step, _format_eval(last_eval),
                   time.perf_counter() - t_eval)
      if stopper:
        improved, should_stop = stopper.update(step, last_eval)
        if improved:
          best_ckpt.save(step, backend.get_state(state))
          logging.info("New best %s=%.4f at step %d", stopper.metric, stopper.best, step)
        if should_stop:
          logging.info("Early stopping at step %d: no %s improvement > %g for %d evals "
                       "(best %.4f at step %d).", step, stopper.metric, stopper.min_delta,
                       stopper.patience, stopper.best, stopper.best_step)
      if on_eval is not None and on_eval(step, dict(last_eval)):
        logging.info("Stopped at step %d by the caller (on_eval).", step)
        should_stop = True
      t0 += time.perf_counter() - t_eval  # eval time is not training throughput

    if step == total or should_stop or (
        config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0):
      ckpt.save(step, backend.get_state(state))
    if should_stop:
      break

  # Shut the input pipeline down now, timed, rather than at interpreter exit: its background
  # threads (prefetch, the next epoch's shuffle buffer) otherwise end during teardown, where a
  # slow stop shows as an unexplained wait after the last log line.
  t_close = time.perf_counter()
  train_iter.close()
  del train_iter
  logging.info("Input pipeline stopped in %.1fs", time.perf_counter() - t_close)
  writer.flush()
  writer.close()
  ckpt.close()
  if best_ckpt:
    best_ckpt.close()
  if not last_eval and start_step >= total:
    # A finished run restarted in its workdir: nothing to train, report the final model again.
    last_eval = evaluate(evaluators, state.params, eval_data, backend)
    logging.info("eval step %d (already trained to total_steps=%d): %s", start_step, total,
                 _format_eval(last_eval))
  if jax.process_index() == 0 and config.plots:
    write_plots(workdir)
  return last_eval


def write_plots(workdir: str) -> None:
  """PNGs of the run's curves (and classification report) in `workdir/plots`, from its events.
  A failure here costs the plots only: it is logged, and the finished run stands."""
  t = time.perf_counter()
  try:
    from vit_jax import plots  # pylint: disable=g-import-not-at-top  (lazy: matplotlib)
    written = plots.write_plots([workdir])
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Plots for %s failed (the run itself is complete): %s: %s", workdir,
                    type(e).__name__, e)
    return
  logging.info("%d plot files in %s/plots (%.1fs)", len(written), workdir,
               time.perf_counter() - t)
