"""Hyper-parameter search with optuna; each trial is a normal run of the one training loop.

  python -m vit_jax.sweep --config=FILE:ARG --space=SPACE.py --study-dir=DIR --trials=N

SPACE.py is a small Python file (see vit_jax/configs/sweep_quickstart.py):
  get_config() -> ConfigDict  the sweep's settings, on `base_settings()` (what to optimise, the
                              sampler, the pruner, what happens to an interrupted trial); the
                              command line overrides them: --space.pruner=hyperband
  get_space() -> {name: optuna distribution}  names are config keys ("lora.rank" for nested
                              keys), or names of your own that `apply` turns into config values
  apply(config, params)       optional: for choices that are not one config key (a recipe, a
                              freezing depth): sets `config` from the trial's `params`

Trial k trains `--config` with its values set in DIR/trials/k (train.train_and_evaluate, with
checkpoints, TensorBoard events and plots as any run) and reports each evaluation of
`settings.metric` to optuna, whose pruner (median or Hyperband) may stop it there. The study lives
in a database: SQLite in DIR by default, or any optuna storage URL (--storage=postgresql://...)
that workers on several machines share. `--trials=N` counts finished and pruned trials in the
study, whoever ran them: restarting the command after a kill, or starting it in several shells,
continues one study and ends with N. A trial whose worker died stops beating its heartbeat; the
next worker that looks marks it failed and retries its values (optuna's RetryHeartbeatStaleTrialCallback):
resuming from its last checkpoint in the same workdir (settings.on_interrupt="resume"), or from
scratch in a new one ("retry"). At the end: DIR/best_config.py (a file `--config=` accepts),
DIR/trials.csv, and optuna's plots in DIR/plots/.
"""
import contextlib
import copy
import csv
import fcntl
import io
import json
import math
import os
import pprint
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
import warnings

from absl import logging
import ml_collections
import optuna
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from vit_jax import configs
from vit_jax import files

# optuna marks the heartbeat API experimental and warns when ask/tell (not Study.optimize) drives
# it; the sweep drives ask/tell itself, with its own heartbeat thread (_Heartbeat).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                        message=r".*(fail_stale_trials|RetryHeartbeatStaleTrialCallback)")
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")

DB_FILE = "study.db"
LOCK_FILE = "study.lock"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def base_settings() -> ml_collections.ConfigDict:
  """Every sweep setting, with its default; a space file's `get_config()` starts from these."""
  s = ml_collections.ConfigDict()
  s.metric = "eval/accuracy"  # an eval metric of the run ("evaluator/metric", as logged)
  s.direction = "maximize"  # maximize | minimize
  s.objective = "last"  # the trial's value: the last evaluation | the best one (early stopping)
  s.sampler = "tpe"  # tpe (Bayesian: optuna's TPESampler, multivariate) | random
  s.startup_trials = 5  # tpe: random trials before the density model takes over
  s.seed = 0  # samplers are seeded with (seed, trials so far): reproducible, distinct per worker
  s.enqueue_config = False  # the base config's own values as the first trial (a baseline)
  s.pruner = "median"  # median | hyperband | none; pruning needs config.eval_every_steps
  s.pruner_startup_trials = 2  # median: trials that finish before any is pruned
  s.pruner_warmup_steps = 0  # median: a trial is not pruned before this step
  s.hyperband_min_steps = 0  # hyperband: the smallest budget (0: config.eval_every_steps)
  s.hyperband_reduction = 3  # hyperband: 1/reduction of the trials go on to the next budget
  s.on_interrupt = "resume"  # a trial whose worker died: resume its checkpoints | retry afresh
  s.max_retries = 2  # retries of one trial's values after its worker died
  s.heartbeat_s = 10  # a running trial's worker writes a heartbeat this often
  s.grace_s = 60  # a running trial without a heartbeat for this long is taken as dead
  s.fail_fast = True  # an exception in a trial stops the sweep (False: log it, go on)
  s.poll_s = 5.0  # waiting for other workers' running trials at the end of the study
  return s


# -- what a trial trains ----------------------------------------------------------------------

def _lookup(config: ml_collections.ConfigDict, key: str) -> Tuple[Any, str]:
  """(parent ConfigDict, leaf name) of a dotted config key; KeyError if it is not one."""
  parent = config
  parts = key.split(".")
  for part in parts[:-1]:
    if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
      raise KeyError(key)
    parent = parent[part]
  if not isinstance(parent, ml_collections.ConfigDict) or parts[-1] not in parent:
    raise KeyError(key)
  return parent, parts[-1]


def is_config_key(config: ml_collections.ConfigDict, key: str) -> bool:
  try:
    _lookup(config, key)
    return True
  except KeyError:
    return False


def trial_config(config: ml_collections.ConfigDict, params: Dict[str, Any],
                 apply: Optional[Callable] = None) -> ml_collections.ConfigDict:
  """`config` with a trial's `params` set: config keys directly, then `apply(config, params)`.

  The copy stays locked, so a value of the wrong type raises, naming the key."""
  config = copy.deepcopy(config)
  own = sorted(k for k in params if not is_config_key(config, k))
  if own and apply is None:
    raise KeyError(f"Search space names {own} are not config keys, and the space file has no "
                   "apply(config, params) to use them.")
  for key, value in params.items():
    if key in own:
      continue
    parent, leaf = _lookup(config, key)
    try:
      parent[leaf] = value
    except TypeError as e:
      raise TypeError(f"Search space {key!r}: value {value!r} does not fit config.{key} "
                      f"({e}).") from e
  if apply is not None:
    apply(config, dict(params))
  return config


def _probe_values(space: Dict[str, BaseDistribution]):
  """A few points of the space that between them take every choice and both ends of every range:
  building their configs before any trial runs catches unknown keys and wrong types."""
  def ends(d):
    if isinstance(d, CategoricalDistribution):
      return list(d.choices)
    return [d.low, d.high]
  options = {k: ends(d) for k, d in space.items()}
  for i in range(max((len(v) for v in options.values()), default=0)):
    yield {k: v[min(i, len(v) - 1)] for k, v in options.items()}


def check_space(config, space: Dict[str, BaseDistribution], apply=None) -> None:
  if not space:
    raise ValueError("The search space is empty: get_space() returned no distributions.")
  for name, dist in space.items():
    if not isinstance(dist, BaseDistribution):
      raise TypeError(f"Search space {name!r}: {dist!r} is not an optuna distribution "
                      "(FloatDistribution, IntDistribution, CategoricalDistribution).")
  for values in _probe_values(space):
    trial_config(config, values, apply)


def config_point(config, space: Dict[str, BaseDistribution]) -> Tuple[Dict[str, Any], str]:
  """The base config's own values of the space's names, and "" when they are all points of the
  space; else ({}, why not)."""
  point = {}
  for name, dist in space.items():
    if not is_config_key(config, name):
      return {}, f"{name!r} is not a config key"
    parent, leaf = _lookup(config, name)
    value = parent[leaf]
    if isinstance(dist, CategoricalDistribution):
      inside = value in dist.choices
    else:
      step = getattr(dist, "step", None)
      inside = (isinstance(value, (int, float)) and dist.low <= value <= dist.high and
                (not step or math.isclose((value - dist.low) / step,
                                          round((value - dist.low) / step))))
    if not inside:
      return {}, f"config.{name}={value!r} is not a point of {dist}"
    point[name] = value
  return point, ""


# -- optuna pieces ----------------------------------------------------------------------------

def make_sampler(settings, seed: int) -> optuna.samplers.BaseSampler:
  if settings.sampler == "tpe":
    with warnings.catch_warnings():  # multivariate / constant_liar are "experimental" in optuna
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      # constant_liar: trials still running count as bad, so parallel workers spread out.
      return optuna.samplers.TPESampler(n_startup_trials=settings.startup_trials, seed=seed,
                                        multivariate=True, constant_liar=True)
  if settings.sampler == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  raise ValueError(f"settings.sampler={settings.sampler!r}: expected 'tpe' or 'random'.")


def make_pruner(settings, config) -> optuna.pruners.BasePruner:
  if settings.pruner == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_steps)
  if settings.pruner == "hyperband":
    return optuna.pruners.HyperbandPruner(
        min_resource=settings.hyperband_min_steps or config.eval_every_steps or 1,
        max_resource=config.total_steps, reduction_factor=settings.hyperband_reduction)
  if settings.pruner == "none":
    return optuna.pruners.NopPruner()
  raise ValueError(f"settings.pruner={settings.pruner!r}: expected 'median', 'hyperband' or "
                   "'none'.")


def make_storage(url: str, settings) -> optuna.storages.RDBStorage:
  """An RDB storage with heartbeats: a dead worker's trial goes FAIL after `grace_s` and its
  values are enqueued again (RetryHeartbeatStaleTrialCallback), with its reports when it will resume."""
  # SQLite takes one writer at a time: wait for the lock rather than fail at once.
  engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=settings.max_retries,
        inherit_intermediate_values=settings.on_interrupt == "resume")
    return optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                      heartbeat_interval=settings.heartbeat_s,
                                      grace_period=settings.grace_s,
                                      heartbeat_stale_trial_callback=retry)


class _Heartbeat:
  """Records the trial's heartbeat every `interval` s from a thread while the trial runs (what
  optuna's `Study.optimize` does; the sweep drives ask/tell itself)."""

  def __init__(self, storage, trial_id: int, interval: float):
    self.storage, self.trial_id, self.interval = storage, trial_id, interval
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._beat, daemon=True)

  def _beat(self):
    while not self.stop.wait(self.interval):
      try:
        self.storage.record_heartbeat(self.trial_id)
      except Exception as e:  # pylint: disable=broad-except  (a busy DB: try again next beat)
        logging.warning("Heartbeat of trial id %d failed: %s", self.trial_id, e)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.stop.set()
    self.thread.join()


@contextlib.contextmanager
def _file_lock(path: str):
  """One worker at a time counts the trials and asks for the next one (workers on this machine;
  workers on other machines sharing a storage URL are checked after asking, see `_surplus`)."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _metric(metrics: Dict[str, float], name: str) -> float:
  if name not in metrics:
    raise KeyError(f"Sweep metric {name!r} is not among the run's eval metrics {sorted(metrics)} "
                   "(set it with --space.metric=...).")
  return float(metrics[name])


def _study_record(config, space, settings, spec: str) -> Dict[str, str]:
  """What a study is bound to: continuing it with another space or objective would mix trials
  that do not compare."""
  return {"space": json.dumps({k: optuna.distributions.distribution_to_json(d)
                               for k, d in sorted(space.items())}),
          "metric": settings.metric, "direction": settings.direction, "config_spec": spec,
          "config": config.to_json_best_effort(sort_keys=True)}


def open_study(storage, name: str, config, space, settings, spec: str = "") -> optuna.Study:
  """Creates the study, or loads it and checks it is the same search."""
  study = optuna.create_study(storage=storage, study_name=name, direction=settings.direction,
                              load_if_exists=True)
  record = _study_record(config, space, settings, spec)
  saved = study.user_attrs
  if not saved.get("space"):
    for k, v in record.items():
      study.set_user_attr(k, v)
    return study
  for key in ("space", "metric", "direction", "config"):
    if saved.get(key) != record[key]:
      if key == "config":
        old, new = json.loads(saved[key]), json.loads(record[key])
        diff = sorted(_diff_keys(old, new))
        detail = f"keys that differ: {diff}"
      else:
        detail = f"study has {saved.get(key)}, this sweep {record[key]}"
      raise ValueError(f"Study {name!r} in {storage.url if hasattr(storage, 'url') else storage} "
                       f"was started with another {key} ({detail}). Continue it with the same "
                       "--config/--space, or start a new one (--study-name or --study-dir).")
  return study


def _diff_keys(a: dict, b: dict, prefix: str = "") -> List[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff_keys(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(prefix + k)
  return out


# -- one trial --------------------------------------------------------------------------------

def trial_workdir(study_dir: str, trial, settings) -> str:
  """Trial k's workdir is DIR/trials/k; a resumed retry keeps the interrupted trial's (its
  user attrs, workdir included, are inherited by the retry)."""
  inherited = trial.user_attrs.get("workdir")
  if inherited and settings.on_interrupt == "resume":
    return inherited
  return os.path.join(study_dir, "trials", f"{trial.number:04d}")


def run_trial(study: optuna.Study, trial: optuna.Trial, config, apply, settings,
              study_dir: str, storage, train_fn: Callable) -> TrialState:
  """Trains one trial, reports its evaluations, tells optuna the outcome; returns its state."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax)
  workdir = trial_workdir(study_dir, trial, settings)
  trial.set_user_attr("workdir", workdir)
  if trial.user_attrs.get("error"):
    trial.set_user_attr("error", "")  # a retry inherits the interrupted trial's attrs
  frozen = storage.get_trial(trial._trial_id)  # pylint: disable=protected-access
  retried_from = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
  resume_step = 0
  if os.path.isdir(workdir):
    resume_step = checkpoint.Checkpointer(workdir).latest_step() or 0
  trial.set_user_attr("resumed_from_step", resume_step)
  logging.info("Trial %d%s: %s in %s%s", trial.number,
               f" (retry of trial {retried_from})" if retried_from is not None else "",
               trial.params, workdir, f", resuming at step {resume_step}" if resume_step else "")
  run_config = trial_config(config, trial.params, apply)
  values: List[float] = []
  stopped = {}

  def on_eval(step: int, metrics: Dict[str, float]) -> bool:
    value = _metric(metrics, settings.metric)
    values.append(value)
    if math.isfinite(value):
      trial.report(value, step)
    if step < run_config.total_steps and trial.should_prune():
      stopped["step"] = step
      return True
    return False

  try:
    result = train_fn(run_config, workdir, on_eval=on_eval)
  except KeyboardInterrupt:
    # Ctrl-C, or SIGTERM (a preemption notice; main() turns it into this): hand the trial back
    # now rather than after grace_s of silence, as a dead worker's would be.
    trial.set_user_attr("error", "interrupted")
    study.tell(trial, state=TrialState.FAIL)
    storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial._trial_id))  # pylint: disable=protected-access
    logging.warning("Trial %d interrupted: its values are queued again (%s); the next worker "
                    "takes them up.", trial.number, settings.on_interrupt)
    raise
  except Exception as e:  # pylint: disable=broad-except
    trial.set_user_attr("error", f"{type(e).__name__}: {e}")
    study.tell(trial, state=TrialState.FAIL)
    if settings.fail_fast:
      raise
    logging.exception("Trial %d failed; going on (settings.fail_fast=False).", trial.number)
    return TrialState.FAIL
  if "step" in stopped:
    trial.set_user_attr("pruned_at_step", stopped["step"])
    study.tell(trial, state=TrialState.PRUNED)
    logging.info("Trial %d pruned at step %d (%s=%.4g).", trial.number, stopped["step"],
                 settings.metric, values[-1])
    return TrialState.PRUNED
  last = _metric(result, settings.metric) if result else values[-1]
  value = last
  if settings.objective == "best" and values:
    value = max(values) if settings.direction == "maximize" else min(values)
  # NaN (a diverged run) is a failed trial to optuna; +-inf it takes as the worst value.
  study.tell(trial, value if math.isfinite(value) else
             (-math.inf if settings.direction == "maximize" else math.inf))
  return TrialState.COMPLETE


# -- the study --------------------------------------------------------------------------------

def _counts(study) -> Dict[TrialState, int]:
  counts = {s: 0 for s in TrialState}
  for t in study.get_trials(deepcopy=False):
    counts[t.state] += 1
  return counts


def _surplus(study, trial, trials: int) -> bool:
  """Workers on other machines (a shared storage URL, no common lock file) may ask at the same
  moment at the end of the study: the later-numbered of those trials steps back."""
  ahead = sum(1 for t in study.get_trials(deepcopy=False)
              if t.number != trial.number and (t.state in DONE or (
                  t.state == TrialState.RUNNING and t.number < trial.number)))
  return ahead >= trials


def run(config, space: Dict[str, BaseDistribution], settings, study_dir: str, trials: int, *,
        apply: Optional[Callable] = None, storage_url: Optional[str] = None,
        study_name: Optional[str] = None, config_spec: str = "",
        train_fn: Optional[Callable] = None, report: bool = True) -> optuna.Study:
  """Runs trials until the study holds `trials` finished or pruned ones; writes the report
  (`write_report`) unless `report=False`.

  `train_fn(config, workdir, on_eval=...)` defaults to train.train_and_evaluate."""
  for key, allowed in (("on_interrupt", ("resume", "retry")), ("objective", ("last", "best")),
                       ("direction", ("maximize", "minimize"))):
    if settings[key] not in allowed:
      raise ValueError(f"settings.{key}={settings[key]!r}: expected one of {list(allowed)}.")
  if train_fn is None:
    from vit_jax import train  # pylint: disable=g-import-not-at-top  (TensorFlow, models)
    train_fn = train.train_and_evaluate
  check_space(config, space, apply)
  make_sampler(settings, 0)  # unknown names fail here, before any trial
  make_pruner(settings, config)
  if settings.pruner != "none" and not config.eval_every_steps:
    logging.warning("config.eval_every_steps=0: a trial is evaluated only at its end, so the "
                    "%s pruner cannot stop one early.", settings.pruner)
  study_dir = os.path.abspath(os.path.expanduser(study_dir))
  os.makedirs(study_dir, exist_ok=True)
  url = storage_url or f"sqlite:///{os.path.join(study_dir, DB_FILE)}"
  name = study_name or os.path.basename(study_dir.rstrip("/"))
  storage = make_storage(url, settings)
  study = open_study(storage, name, config, space, settings, config_spec)
  lock = os.path.join(study_dir, LOCK_FILE)
  if settings.enqueue_config:
    point, why = config_point(config, space)
    if not why:
      with _file_lock(lock):  # skip_if_exists: one baseline, however many workers start
        study.enqueue_trial(point, user_attrs={"baseline": True}, skip_if_exists=True)
    else:
      logging.warning("settings.enqueue_config: no baseline trial, %s.", why)
  failures = 0
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are logged here, once
  while True:
    trial = None
    with _file_lock(lock):
      optuna.storages.fail_stale_trials(study)  # dead workers' trials: FAIL, values enqueued
      counts = _counts(study)
      done, running = sum(counts[s] for s in DONE), counts[TrialState.RUNNING]
      if done >= trials:
        break
      if done + running < trials:
        n = sum(counts.values())
        ask_study = optuna.load_study(study_name=name, storage=storage,
                                      sampler=make_sampler(settings, settings.seed * 100_003 + n),
                                      pruner=make_pruner(settings, config))
        trial = ask_study.ask(space)  # a WAITING retry first, with its values
        storage.record_heartbeat(trial._trial_id)  # pylint: disable=protected-access
    if trial is None:
      logging.info("%d of %d trials done, %d running in other workers: waiting.", done, trials,
                   running)
      time.sleep(settings.poll_s)
      continue
    if _surplus(study, trial, trials):
      trial.set_user_attr("error", "surplus: other workers had already filled the study")
      ask_study.tell(trial, state=TrialState.FAIL)
      continue
    with _Heartbeat(storage, trial._trial_id, settings.heartbeat_s):  # pylint: disable=protected-access
      state = run_trial(ask_study, trial, config, apply, settings, study_dir, storage, train_fn)
    if state == TrialState.FAIL:
      failures += 1
      if failures >= trials:
        raise RuntimeError(f"{failures} trials failed in this worker (see their 'error' user "
                           f"attrs in {url}); stopping.")
  if report:
    write_report(study, config, space, settings, study_dir, apply=apply,
                 config_spec=config_spec)
  return study


# -- the report -------------------------------------------------------------------------------

def best_trial(study) -> Optional[optuna.trial.FrozenTrial]:
  complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.value is not None and math.isfinite(t.value)]
  if not complete:
    return None
  pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
  return pick(complete, key=lambda t: t.value)


def best_config_source(config, trial, settings, config_spec: str) -> str:
  """A config file (`get_config()`) that holds the whole config of `trial`, values literal."""
  values = json.loads(config.to_json_best_effort(sort_keys=True))
  header = (f'"""Best trial of a vit_jax sweep: trial {trial.number}, {settings.metric} = '
            f'{trial.value:.6g} ({settings.direction}).\n\n'
            f'Base config: {config_spec or "(given in Python)"}; searched values: '
            f'{", ".join(f"{k}={v!r}" for k, v in sorted(trial.params.items()))}.\n'
            'Train it: python -m vit_jax.main --workdir=DIR --config=THIS_FILE\n"""\n')
  return (header + "from vit_jax import configs\n\n"
          f"CONFIG = {pprint.pformat(values, indent=1, width=100, sort_dicts=True)}\n\n\n"
          "def get_config():\n  return configs.from_dict(CONFIG)\n")


def trials_csv(study, space) -> str:
  """One row per trial: number, state, value, each searched value, the steps it reached, its
  workdir, and its history (retry of, resumed from, pruned at, error)."""
  names = sorted(space)
  cols = (["number", "state", "value"] + names +
          ["last_step", "pruned_at_step", "retry_of", "resumed_from_step", "duration_s",
           "workdir", "error"])
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(cols)
  for t in study.get_trials(deepcopy=False):
    dur = t.duration.total_seconds() if t.duration else ""
    w.writerow([t.number, t.state.name, "" if t.value is None else t.value] +
               [t.params.get(n, "") for n in names] +
               [t.last_step if t.last_step is not None else "",
                t.user_attrs.get("pruned_at_step", ""),
                optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) if
                optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None
                else "", t.user_attrs.get("resumed_from_step", ""),
                f"{dur:.1f}" if dur != "" else "", t.user_attrs.get("workdir", ""),
                t.user_attrs.get("error", "")])
  return buf.getvalue()


def write_plots(study, out_dir: str) -> List[str]:
  """optuna's matplotlib plots as PNGs: history, parameter importances, parallel coordinates,
  intermediate values (what the pruner saw). A plot that the trials cannot support yet (one
  finished trial, one parameter) is skipped with a log line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as ovm  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  written = []
  plots = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
           "parallel_coordinate": ovm.plot_parallel_coordinate,
           "intermediate_values": ovm.plot_intermediate_values}
  with warnings.catch_warnings(), matplotlib.rc_context({"backend": "Agg"}):
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    for name, fn in plots.items():
      try:
        ax = fn(study)
      except (ValueError, RuntimeError, ZeroDivisionError) as e:
        logging.info("Sweep plot %s skipped: %s", name, e)
        continue
      fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
      if not fig.axes or not any(a.has_data() for a in fig.axes):
        plt.close(fig)
        logging.info("Sweep plot %s skipped: no finished trials to draw.", name)
        continue
      path = os.path.join(out_dir, f"{name}.png")
      fig.set_size_inches(8, 5)
      fig.tight_layout()
      buf = io.BytesIO()
      fig.savefig(buf, format="png", dpi=100)
      files.write_atomic(path, buf.getvalue())
      plt.close(fig)
      written.append(path)
  return written


def write_report(study, config, space, settings, study_dir: str, *, apply=None,
                 config_spec: str = "") -> Dict[str, Any]:
  """trials.csv, best_config.py and plots/*.png in `study_dir`; returns their paths."""
  out: Dict[str, Any] = {}
  out["csv"] = os.path.join(study_dir, "trials.csv")
  files.write_atomic(out["csv"], trials_csv(study, space))
  best = best_trial(study)
  if best is not None:
    out["best_config"] = os.path.join(study_dir, "best_config.py")
    files.write_atomic(out["best_config"], best_config_source(
        trial_config(config, best.params, apply), best, settings, config_spec))
  out["plots"] = write_plots(study, os.path.join(study_dir, "plots"))
  counts = _counts(study)
  logging.info("Study %s: %s. Best: %s. Wrote %s", study.study_name,
               ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n),
               f"trial {best.number}, {settings.metric}={best.value:.6g}, {best.params}"
               if best else "none finished", ", ".join(
                   [out["csv"]] + ([out["best_config"]] if best else []) + out["plots"]))
  return out


def summary_table(study, space) -> str:
  """The trials as a fixed-width table, for the terminal."""
  names = sorted(space)
  rows = [["trial", "state", "value", *names, "steps"]]
  for t in study.get_trials(deepcopy=False):
    rows.append([str(t.number), t.state.name.lower(),
                 "" if t.value is None else f"{t.value:.5g}",
                 *[f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float)
                   else str(t.params.get(n, "")) for n in names],
                 "" if t.last_step is None else str(t.last_step)])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# -- command line -----------------------------------------------------------------------------

def load_space(path: str) -> Tuple[Dict[str, BaseDistribution], Optional[Callable]]:
  """(get_space(), apply or None) of a space file."""
  module = configs.import_file(os.path.expanduser(path))
  if not hasattr(module, "get_space"):
    raise AttributeError(f"Space file {path} has no get_space() returning "
                         "{name: optuna distribution}.")
  return dict(module.get_space()), getattr(module, "apply", None)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Base training config: FILE[:ARG]; "
                                  "--config.key=value overrides apply to every trial.",
                                  lock_config=True)
  config_flags.DEFINE_config_file("space", None, "Space file: get_config() (settings; "
                                  "--space.key=value overrides), get_space(), apply().",
                                  lock_config=True)
  flags.DEFINE_string("study-dir", None, "The study's directory: trials/, study.db (SQLite, "
                      "unless --storage), trials.csv, best_config.py, plots/.")
  flags.DEFINE_integer("trials", None, "Finished + pruned trials the study should hold (all "
                       "workers and restarts together); 0: only write the report.")
  flags.DEFINE_string("storage", None, "An optuna storage URL shared by workers on several "
                      "machines, e.g. postgresql://user:pw@host/db (default: SQLite in "
                      "--study-dir).")
  flags.DEFINE_string("study-name", None, "The study's name in the storage (default: the "
                      "study dir's name).")
  flags.mark_flags_as_required(["config", "space", "study-dir", "trials"])
  return flags.FLAGS


def _sigterm(signum, frame):
  del signum, frame
  raise KeyboardInterrupt("SIGTERM")


def main(argv) -> None:
  if len(argv) > 1:
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  signal.signal(signal.SIGTERM, _sigterm)
  space, apply = load_space(config_flags.get_config_filename(f["space"]))
  study_dir = os.path.expanduser(f["study-dir"].value)
  # The base config as given (file, argument, overrides), for best_config.py's docstring.
  spec = " ".join(a for a in sys.argv[1:] if a.startswith("--config"))
  if f.trials > 0:
    study = run(f.config, space, f.space, study_dir, f.trials, apply=apply,
                storage_url=f.storage, study_name=f["study-name"].value, config_spec=spec)
  else:
    study_dir = os.path.abspath(study_dir)
    storage = make_storage(f.storage or f"sqlite:///{os.path.join(study_dir, DB_FILE)}", f.space)
    study = open_study(storage, f["study-name"].value or os.path.basename(study_dir.rstrip("/")),
                       f.config, space, f.space, spec)
    write_report(study, f.config, space, f.space, study_dir, apply=apply, config_spec=spec)
  print(summary_table(study, space))
  best = best_trial(study)
  if best is not None:
    print(f"Best: trial {best.number}, {f.space.metric} = {best.value:.6g}; config in "
          f"{os.path.join(os.path.abspath(study_dir), 'best_config.py')}")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
