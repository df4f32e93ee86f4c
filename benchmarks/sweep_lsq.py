"""Does the sweep find a known best learning rate, and beat random search with the same budget?

  python benchmarks/sweep_lsq.py [--seeds 5] [--trials 12] [--steps 20] [--closed-form]

Every trial trains benchmarks/least_squares.py (plain gradient descent on a least-squares problem
whose best LR is known in closed form) through the real loop (train.train_and_evaluate), driven
by vit_jax.sweep.run with optuna's TPE sampler, then with its random sampler, same budget, same
log-uniform LR range [1e-3, 0.5], no pruning. Prints, per seed and sampler, the best trial's LR
as a factor of the known best LR and its log10 loss, then the medians. `--closed-form` skips the
loop and scores trials with the closed-form loss (the same numbers, in seconds; the loop agrees
with it to 1e-5, see tests/test_sweep.py).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import least_squares  # pylint: disable=g-import-not-at-top,wrong-import-position


def space():
  from optuna.distributions import FloatDistribution  # pylint: disable=g-import-not-at-top
  return {"base_lr": FloatDistribution(*least_squares.LR_RANGE, log=True)}


def settings(sampler: str, seed: int, startup: int):
  from vit_jax import sweep  # pylint: disable=g-import-not-at-top
  s = sweep.base_settings()
  s.metric, s.direction = "eval/log10_loss", "minimize"
  s.sampler, s.seed, s.startup_trials, s.pruner = sampler, seed, startup, "none"
  return s


def closed_form_train(config, workdir, on_eval=None):
  """Stands in for train.train_and_evaluate with the closed-form loss of the same run."""
  del workdir
  value = float(np.log10(least_squares.final_loss(config.base_lr, config.total_steps)))
  if on_eval is not None:
    on_eval(config.total_steps, {"eval/log10_loss": value})
  return {"eval/log10_loss": value}


def search(sampler: str, seed: int, trials: int, steps: int, startup: int, closed_form: bool):
  """(best trial's LR, its log10 loss) of one sweep."""
  from vit_jax import sweep  # pylint: disable=g-import-not-at-top
  config = least_squares.get_config(str(steps))
  with tempfile.TemporaryDirectory() as study_dir:
    study = sweep.run(config, space(), settings(sampler, seed, startup), study_dir, trials,
                      train_fn=closed_form_train if closed_form else None, report=False)
    best = sweep.best_trial(study)
  return best.params["base_lr"], best.value


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--trials", type=int, default=12)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--startup", type=int, default=5, help="TPE's random start trials")
  parser.add_argument("--closed-form", action="store_true")
  args = parser.parse_args()
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  target = least_squares.best_lr(args.steps)
  floor = float(np.log10(least_squares.final_loss(target, args.steps)))
  print(f"known best LR for {args.steps} steps: {target:.5f} (log10 loss {floor:.3f}); "
        f"{args.trials} trials per sweep, LR log-uniform in {least_squares.LR_RANGE}, "
        f"{'closed-form loss' if args.closed_form else 'the real training loop'}")
  print(f"{'seed':>4}  {'sampler':>7}  {'best LR':>9}  {'x best':>7}  {'log10 loss':>10}  "
        f"{'seconds':>7}")
  results = {"tpe": [], "random": []}
  for seed in range(args.seeds):
    for sampler in results:
      t = time.perf_counter()
      lr, value = search(sampler, seed, args.trials, args.steps, args.startup, args.closed_form)
      factor = max(lr / target, target / lr)
      results[sampler].append((factor, value))
      print(f"{seed:>4}  {sampler:>7}  {lr:>9.5f}  {factor:>7.3f}  {value:>10.3f}  "
            f"{time.perf_counter() - t:>7.1f}")
  tpe, rnd = np.array(results["tpe"]), np.array(results["random"])
  print(f"median factor from the best LR: tpe {np.median(tpe[:, 0]):.3f}, random "
        f"{np.median(rnd[:, 0]):.3f}; median best log10 loss: tpe {np.median(tpe[:, 1]):.3f}, "
        f"random {np.median(rnd[:, 1]):.3f}; tpe better in {int(np.sum(tpe[:, 1] < rnd[:, 1]))} "
        f"of {args.seeds} seeds")


if __name__ == "__main__":
  main()
