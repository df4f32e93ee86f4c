"""vit_jax.sweep: trial configs, interrupted and shared studies, and whether TPE finds a known best
learning rate (benchmarks/least_squares.py) better than random search.

The heavier check (TPE vs random through the real loop, several seeds) is marked `slow`:
`python -m pytest -m slow tests/test_sweep.py`. CI runs the rest: the same comparison scored with
the problem's closed-form loss (which the real loop reproduces: test_loop_matches_closed_form),
and a real 6-trial sweep of the quick-start config killed during its third trial.
"""
import math
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
from optuna.trial import TrialState
import pytest

from vit_jax import configs
from vit_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
least_squares = configs.import_file(os.path.join(REPO, "benchmarks", "least_squares.py"))
sweep_lsq = configs.import_file(os.path.join(REPO, "benchmarks", "sweep_lsq.py"))


def _settings(**kw):
  s = sweep.base_settings()
  s.update(kw)
  return s


# -- what a trial trains ----------------------------------------------------------------------

def test_trial_config_sets_keys_and_rejects_bad_ones():
  base = configs.get_config("vit.py")
  cfg = sweep.trial_config(base, {"base_lr": 0.01, "model.transformer.num_layers": 2,
                                  "aug_level": "light1"})
  assert (cfg.base_lr, cfg.model.transformer.num_layers, cfg.aug_level) == (0.01, 2, "light1")
  assert base.base_lr == 2e-3 and base.aug_level is None  # the base is left alone
  with pytest.raises(KeyError, match=r"\['base_lrr'\] are not config keys"):
    sweep.trial_config(base, {"base_lrr": 0.01})
  with pytest.raises(TypeError, match="model.transformer.num_layers"):
    sweep.trial_config(base, {"model.transformer.num_layers": 1.5})
  # Every choice and both ends of every range are built before a trial runs.
  with pytest.raises(TypeError, match="'warmup_steps'"):
    sweep.check_space(base, {"base_lr": FloatDistribution(1e-4, 1e-2, log=True),
                             "warmup_steps": CategoricalDistribution([0, "ten"])})


def test_space_files_shipped():
  """The quick-start space builds on vit.py; the fine-tuning space's apply() turns a freezing
  depth and a head LR multiplier into param_groups that optim.py groups as intended."""
  for name, spec in (("sweep_quickstart.py", "vit.py"), ("sweep_finetune.py", "vit.py:ti16,cifar10")):
    path = os.path.join(REPO, "vit_jax", "configs", name)
    space, apply = sweep.load_space(path)
    settings = configs.import_file(path).get_config()
    base = configs.get_config(spec)
    sweep.check_space(base, space, apply)
    assert settings.metric == "eval/accuracy"
  quick_space, _ = sweep.load_space(os.path.join(REPO, "vit_jax", "configs",
                                                 "sweep_quickstart.py"))
  assert sweep.config_point(configs.get_config("vit.py"), quick_space) == (
      {"base_lr": 2e-3, "warmup_steps": 200, "weight_decay": 0.05, "aug_level": None}, "")
  space, apply = sweep.load_space(os.path.join(REPO, "vit_jax", "configs", "sweep_finetune.py"))
  cfg = sweep.trial_config(configs.get_config("vit.py:ti16,cifar10"),
                           {"base_lr": 0.01, "freeze_blocks": 4, "head_lr_mult": 10.0,
                            "aug_level": "none"}, apply)
  cfg.warmup_steps = 0  # a nonzero LR at step 0
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  params = {"embedding": {"kernel": np.zeros(2)}, "head": {"kernel": np.zeros(2)},
            "Transformer": {f"encoderblock_{i}": {"w": np.zeros(2)} for i in range(12)}}
  tx, schedules = optim.make_optimizer(cfg, params)
  assert set(schedules) == {"head", "backbone"}  # the frozen group has no schedule
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  frozen = [updates["embedding"]["kernel"]] + [
      updates["Transformer"][f"encoderblock_{i}"]["w"] for i in range(4)]
  assert all(np.all(u == 0) for u in frozen)
  assert np.all(updates["Transformer"]["encoderblock_4"]["w"] != 0)


# -- the known best LR --------------------------------------------------------------------------

def test_real_loop_reports_closed_form_and_prunes(tmp_path):
  """Trials through the real loop (train.train_and_evaluate) report, at every evaluation, exactly
  the closed-form loss of gradient descent at their LR after that many steps (so the closed-form
  stand-in below measures what the loop would), and Hyperband stops trials at an evaluation
  through train's on_eval."""
  config = least_squares.get_config("20")
  settings = sweep_lsq.settings("random", 0, 5)
  settings.pruner, settings.hyperband_min_steps = "hyperband", 5
  study = sweep.run(config, sweep_lsq.space(), settings, str(tmp_path / "study"), 6)
  trials = study.get_trials()
  assert len(trials) == 6 and all(t.state in sweep.DONE for t in trials)
  for t in trials:
    steps = sorted(t.intermediate_values)
    assert steps == list(range(5, t.last_step + 5, 5)), steps  # every evaluation reported
    for step, value in t.intermediate_values.items():
      expected = math.log10(least_squares.final_loss(t.params["base_lr"], step))
      assert abs(value - expected) < 1e-4, (t.params, step, value, expected)
    if t.state == TrialState.COMPLETE:
      assert t.last_step == 20 and t.value == t.intermediate_values[20]
    else:
      assert t.user_attrs["pruned_at_step"] == t.last_step < 20
      ckpts = os.listdir(os.path.join(t.user_attrs["workdir"], "checkpoints"))
      assert str(t.last_step) in ckpts  # stopped as early stopping does: after a checkpoint
  assert any(t.state == TrialState.PRUNED for t in trials)


def _compare(seeds, trials, closed_form):
  out = {}
  for sampler in ("tpe", "random"):
    out[sampler] = [sweep_lsq.search(sampler, seed, trials, 20, 5, closed_form) for seed in seeds]
  return out


def _check_tpe_beats_random(results, target, factor, min_wins):
  """TPE's best LR within `factor` of the known best in every seed, its median best loss below
  random search's, and a lower best loss than random's in at least `min_wins` seeds."""
  tpe_factor = [max(lr / target, target / lr) for lr, _ in results["tpe"]]
  tpe_loss = np.array([v for _, v in results["tpe"]])
  rnd_loss = np.array([v for _, v in results["random"]])
  assert max(tpe_factor) <= factor, (tpe_factor, results)
  assert np.median(tpe_loss) < np.median(rnd_loss), results
  assert np.sum(tpe_loss < rnd_loss) >= min_wins, results


def test_tpe_finds_known_best_lr_closed_form():
  """20 trials, seeds 0-2: TPE's best LR is within 1.25x of the known best in every seed, and
  its best loss is lower than random search's in every seed (measured: 1.01x, 1.22x, 1.05x vs
  random's 1.37x, 1.36x, 1.55x)."""
  target = least_squares.best_lr(20)
  _check_tpe_beats_random(_compare(range(3), 20, closed_form=True), target, 1.25, min_wins=3)


@pytest.mark.slow
def test_tpe_finds_known_best_lr_real_loop():
  """As above through the real loop, seeds 0-4, TPE ahead in at least 4 (measured: 4; in seed 3
  random search drew 1.035x against TPE's 1.152x). benchmarks/sweep_lsq.py prints the table."""
  target = least_squares.best_lr(20)
  _check_tpe_beats_random(_compare(range(5), 20, closed_form=False), target, 1.25, min_wins=4)


# -- interrupted trials, in-process ------------------------------------------------------------

def _dead_trial(study_dir, settings, space, config, workdir_of_dead=True):
  """A study whose trial 0 is RUNNING with a heartbeat that stopped: a worker that died."""
  url = f"sqlite:///{os.path.join(study_dir, sweep.DB_FILE)}"
  os.makedirs(study_dir, exist_ok=True)
  storage = sweep.make_storage(url, settings)
  study = sweep.open_study(storage, os.path.basename(study_dir), config, space, settings)
  trial = study.ask(space)
  if workdir_of_dead:
    trial.set_user_attr("workdir", sweep.trial_workdir(study_dir, trial, settings))
  storage.record_heartbeat(trial._trial_id)  # pylint: disable=protected-access
  return trial.params


@pytest.mark.parametrize("mode", ["resume", "retry"])
def test_dead_worker_trial_is_retried(tmp_path, mode):
  config = least_squares.get_config("20")
  space = sweep_lsq.space()
  settings = _settings(metric="eval/log10_loss", direction="minimize", pruner="none",
                       heartbeat_s=1, grace_s=1, on_interrupt=mode, poll_s=0.2)
  study_dir = str(tmp_path / "study")
  dead_params = _dead_trial(study_dir, settings, space, config)
  time.sleep(2.5)  # past the 1 s grace period, on SQLite's clock of whole seconds
  calls = []

  def train_fn(cfg, workdir, on_eval=None):
    calls.append((cfg.base_lr, workdir))
    return sweep_lsq.closed_form_train(cfg, workdir, on_eval)

  study = sweep.run(config, space, settings, study_dir, 3, train_fn=train_fn)
  trials = study.get_trials()
  assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
  retry = next(t for t in trials if sweep.optuna.storages.RetryHeartbeatStaleTrialCallback
               .retried_trial_number(t) == 0)
  assert retry.params == dead_params and calls[0][0] == dead_params["base_lr"]
  first_workdir = os.path.join(os.path.abspath(study_dir), "trials", "0000")
  if mode == "resume":
    assert retry.user_attrs["workdir"] == first_workdir == calls[0][1]
  else:
    assert retry.user_attrs["workdir"] == calls[0][1] != first_workdir
  assert len({w for _, w in calls}) == 3


def test_interrupted_trial_is_queued_again(tmp_path):
  """Ctrl-C (or SIGTERM, which the CLI turns into it) during a trial: the trial is handed back at
  once, FAIL with its values queued, and the next run resumes it in its workdir."""
  config = least_squares.get_config("20")
  settings = _settings(metric="eval/log10_loss", direction="minimize", pruner="none")
  study_dir = str(tmp_path / "study")
  seen = []

  def interrupted(cfg, workdir, on_eval=None):
    seen.append(workdir)
    if len(seen) == 2:
      raise KeyboardInterrupt
    return sweep_lsq.closed_form_train(cfg, workdir, on_eval)

  with pytest.raises(KeyboardInterrupt):
    sweep.run(config, sweep_lsq.space(), settings, study_dir, 3, train_fn=interrupted)
  study = sweep.run(config, sweep_lsq.space(), settings, study_dir, 3,
                    train_fn=sweep_lsq.closed_form_train)
  trials = study.get_trials()
  assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                       TrialState.COMPLETE, TrialState.COMPLETE]
  assert trials[1].user_attrs["error"] == "interrupted"
  assert trials[2].params == trials[1].params  # the retry ran first, in trial 1's workdir
  assert trials[2].user_attrs["workdir"] == seen[1] and not trials[2].user_attrs["error"]


def test_base_config_as_first_trial(tmp_path):
  """settings.enqueue_config: trial 0 trains the base config's own values, once, however often
  the sweep restarts; a base config outside the space gets no baseline (and a warning)."""
  config = least_squares.get_config("20")  # base_lr 0.1
  settings = _settings(metric="eval/log10_loss", direction="minimize", pruner="none",
                       enqueue_config=True)
  for trials in (2, 3):
    study = sweep.run(config, sweep_lsq.space(), settings, str(tmp_path / "s"), trials,
                      train_fn=sweep_lsq.closed_form_train, report=False)
  baselines = [t for t in study.trials if t.user_attrs.get("baseline")]
  assert [t.number for t in baselines] == [0] and baselines[0].params == {"base_lr": 0.1}
  assert len(study.trials) == 3
  assert sweep.config_point(config, {"base_lr": FloatDistribution(0.2, 0.5)}) == (
      {}, "config.base_lr=0.1 is not a point of FloatDistribution(high=0.5, log=False, "
      "low=0.2, step=None)")
  assert sweep.config_point(config, {"warmup_steps": IntDistribution(0, 10, step=5)})[0] == {
      "warmup_steps": 0}


def test_surplus_trial_of_another_machine_steps_back(tmp_path):
  """Workers sharing a storage URL from different machines have no common lock: a trial asked
  when the study already has enough is recognised as surplus."""
  config = least_squares.get_config("20")
  settings = _settings(metric="eval/log10_loss", direction="minimize", pruner="none")
  study = sweep.run(config, sweep_lsq.space(), settings, str(tmp_path / "s"), 2,
                    train_fn=sweep_lsq.closed_form_train, report=False)
  late = study.ask(sweep_lsq.space())
  assert sweep._surplus(study, late, 2) and not sweep._surplus(study, late, 3)  # pylint: disable=protected-access


def test_study_must_stay_the_same_search(tmp_path):
  config = least_squares.get_config("20")
  settings = _settings(metric="eval/log10_loss", direction="minimize", pruner="none")
  study_dir = str(tmp_path / "study")
  sweep.run(config, sweep_lsq.space(), settings, study_dir, 1,
            train_fn=sweep_lsq.closed_form_train)
  other = {"base_lr": FloatDistribution(1e-4, 1.0, log=True)}
  with pytest.raises(ValueError, match="another space"):
    sweep.run(config, other, settings, study_dir, 2, train_fn=sweep_lsq.closed_form_train)
  with pytest.raises(ValueError, match=r"another config .*\['total_steps'\]"):
    sweep.run(least_squares.get_config("30"), sweep_lsq.space(), settings, study_dir, 2,
              train_fn=sweep_lsq.closed_form_train)


def test_bad_settings_fail_before_any_trial(tmp_path):
  config = least_squares.get_config("20")
  for key, value, match in (("sampler", "grid", "sampler"), ("pruner", "asha", "pruner"),
                            ("on_interrupt", "ignore", "on_interrupt"),
                            ("objective", "mean", "objective"),
                            ("direction", "max", "direction")):
    with pytest.raises(ValueError, match=match):
      sweep.run(config, sweep_lsq.space(), _settings(**{key: value}), str(tmp_path / key), 1,
                train_fn=sweep_lsq.closed_form_train)
    assert not (tmp_path / key / "trials").exists()


@pytest.mark.parametrize("objective,expected", [("last", 2.0), ("best", 1.0)])
def test_objective_last_or_best_evaluation(tmp_path, objective, expected):
  def train_fn(cfg, workdir, on_eval=None):
    del cfg, workdir
    for step, value in ((5, 3.0), (10, 1.0), (15, 2.0)):
      on_eval(step, {"eval/log10_loss": value})
    return {"eval/log10_loss": 2.0}

  settings = _settings(metric="eval/log10_loss", direction="minimize", pruner="none",
                       objective=objective)
  study = sweep.run(least_squares.get_config("15"), sweep_lsq.space(), settings,
                    str(tmp_path / "s"), 1, train_fn=train_fn, report=False)
  assert study.trials[0].value == expected
  assert study.trials[0].intermediate_values == {5: 3.0, 10: 1.0, 15: 2.0}


def test_unknown_metric_fails_the_trial(tmp_path):
  config = least_squares.get_config("20")
  with pytest.raises(KeyError, match=r"'eval/acc' is not among the run's eval metrics "
                     r"\['eval/log10_loss'\]"):
    sweep.run(config, sweep_lsq.space(), _settings(metric="eval/acc"), str(tmp_path / "bad"),
              1, train_fn=sweep_lsq.closed_form_train)
  failed = optuna.load_study(study_name="bad", storage=f"sqlite:///{tmp_path}/bad/study.db")
  assert failed.trials[0].state == TrialState.FAIL
  assert "eval/acc" in failed.trials[0].user_attrs["error"]


# -- the acceptance: a real sweep, killed, restarted with two workers ---------------------------

QUICK = ["--config=vit_jax/configs/vit.py", "--config.total_steps=20",
         "--config.batch=16", "--config.batch_eval=128", "--config.train_split=train[:512]",
         "--config.eval_split=test[:256]", "--config.cache_train=False",
         "--config.shuffle_buffer=512", "--config.eval_every_steps=10",
         "--config.checkpoint_every_steps=10", "--config.log_every_steps=10",
         "--config.plots=False", "--config.warmup_steps=5", "--config.model.hidden_size=32",
         "--config.model.transformer.num_layers=1", "--config.model.transformer.mlp_dim=32",
         "--space=vit_jax/configs/sweep_quickstart.py", "--trials=6", "--space.heartbeat_s=1",
         "--space.grace_s=3", "--space.poll_s=0.5", "--space.startup_trials=3"]


def _worker(study_dir, log):
  return subprocess.Popen([sys.executable, "-m", "vit_jax.sweep", f"--study-dir={study_dir}",
                           *QUICK], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def test_sweep_killed_and_restarted_with_two_workers(tmp_path):
  """6 trials of the quick-start config (tiny model): SIGKILL while trial 3 runs (after its first
  checkpoint), then two workers on the same study. The study ends with 6 finished or pruned
  trials of 6 distinct configs; the killed trial is retried once, resuming from its checkpoint
  in its own workdir; no trial is trained to completion twice; the report is written."""
  study_dir = tmp_path / "study"
  url = f"sqlite:///{study_dir}/study.db"
  with open(tmp_path / "worker0.log", "w") as log:
    first = _worker(study_dir, log)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
      ckpts = study_dir / "trials" / "0002" / "checkpoints"
      if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
        break
      time.sleep(0.2)
    assert first.poll() is None, (tmp_path / "worker0.log").read_text()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
  study = optuna.load_study(study_name="study", storage=url)
  states = {t.number: t.state for t in study.get_trials()}
  assert states[2] == TrialState.RUNNING and len(states) == 3, states

  logs = [open(tmp_path / f"worker{i}.log", "w") for i in (1, 2)]
  workers = [_worker(study_dir, log) for log in logs]
  for w in workers:
    w.wait(timeout=300)
  for log in logs:
    log.close()
  for i, w in zip((1, 2), workers):
    assert w.returncode == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]

  study = optuna.load_study(study_name="study", storage=url)
  trials = study.get_trials()
  done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
  assert len(done) == 6, [(t.number, t.state) for t in trials]
  assert [t.number for t in trials if t.state == TrialState.FAIL] == [2]
  assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
  keys = sorted(done[0].params)
  assert len({tuple(t.params[k] for k in keys) for t in done}) == 6  # 6 distinct trials
  retry = [t for t in done if optuna.storages.RetryHeartbeatStaleTrialCallback
           .retried_trial_number(t) == 2]
  assert len(retry) == 1 and retry[0].params == trials[2].params
  assert retry[0].user_attrs["workdir"] == str(study_dir / "trials" / "0002")
  assert retry[0].user_attrs["resumed_from_step"] >= 10  # resumed, not retrained from scratch
  assert len({t.user_attrs["workdir"] for t in done}) == 6  # each trained once, in its own dir
  # Both restarted workers ran trials.
  ran = [sum("Trial " in line and " in " in line for line in (tmp_path / f"worker{i}.log")
             .read_text().splitlines()) for i in (1, 2)]
  assert min(ran) >= 1, ran

  rows = (study_dir / "trials.csv").read_text().splitlines()
  assert len(rows) == 1 + len(trials) and rows[0].startswith("number,state,value")
  best = max((t for t in done if t.state == TrialState.COMPLETE), key=lambda t: t.value)
  best_cfg = configs.get_config(str(study_dir / "best_config.py"))
  assert isinstance(best_cfg, ml_collections.ConfigDict)
  assert best_cfg.base_lr == best.params["base_lr"]
  assert best_cfg.aug_level == best.params["aug_level"]
  assert best_cfg.total_steps == 20 and best_cfg.model.hidden_size == 32
  for name in ("history", "parallel_coordinate", "intermediate_values", "importances"):
    png = study_dir / "plots" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
