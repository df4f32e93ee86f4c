"""A least-squares problem whose best learning rate is known in closed form, trained by the real
loop (train.train_and_evaluate: the optimizer, schedules, checkpoints, evaluations, the sweep's
pruner reports), for checking that a sweep finds the best LR (benchmarks/sweep_lsq.py and
tests/test_sweep.py).

The task: w [8] minimises 0.5 * mean((X w - y)^2) over a fixed X [32, 8] whose Gram matrix
X^T X / 32 has eigenvalues spread over [1, 10] (condition number 10), y = X w_star, starting at
w = 0, with plain gradient descent (SGD, no momentum, constant LR, no clipping) for
`total_steps` steps. Along eigenvalue l the error shrinks by (1 - lr * l) per step, so the final
loss is 0.5 * sum_i l_i e_i^2 (1 - lr l_i)^(2 T) exactly, and its minimiser over lr is the known
best LR (`best_lr`). The metric is log10 of the final loss (`eval/log10_loss`, minimised).

This is a config file too: `--config=benchmarks/least_squares.py`. The input pipeline runs as for
any run (a few Fashion-MNIST images); the task's data are its own fixed matrix, which the batches
do not change.
"""
import os
from typing import Dict, Tuple

import numpy as np

DIM, ROWS = 8, 32
EIGENVALUES = np.geomspace(1.0, 10.0, DIM)
LR_RANGE = (1e-3, 0.5)  # the search range: from far too slow to diverging (lr > 2 / 10)


def problem() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(X [ROWS, DIM], y [ROWS], w_star [DIM]), fixed."""
  rng = np.random.default_rng(0)
  rotation, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  rows, _ = np.linalg.qr(rng.normal(size=(ROWS, DIM)))  # orthonormal columns
  x = rows @ np.diag(np.sqrt(ROWS * EIGENVALUES)) @ rotation.T  # X^T X / ROWS = Q diag(l) Q^T
  w_star = rng.normal(size=DIM)
  return x, x @ w_star, w_star


def final_loss(lr, steps: int) -> np.ndarray:
  """The loss after `steps` gradient-descent steps at `lr` (any shape), from w = 0, in closed
  form (float64)."""
  x, _, w_star = problem()
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  lams = np.linalg.svd(x, compute_uv=False) ** 2 / ROWS
  e0 = vt @ (0.0 - w_star)  # the starting error along each eigenvector
  lr = np.asarray(lr, np.float64)[..., None]
  return 0.5 * np.sum(lams * e0**2 * (1.0 - lr * lams) ** (2 * steps), axis=-1)


def best_lr(steps: int) -> float:
  """argmin over lr of `final_loss(lr, steps)` (a dense log grid, then a fine one around it)."""
  grid = np.geomspace(*LR_RANGE, 20_001)
  lr = grid[np.argmin(final_loss(grid, steps))]
  fine = np.linspace(lr * 0.999, lr * 1.001, 2_001)
  return float(fine[np.argmin(final_loss(fine, steps))])


class LeastSquaresTask:
  """`config.task = "benchmarks/least_squares.py:LeastSquaresTask"`."""

  def __init__(self, config):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.config = config
    x, y, _ = problem()
    self.x, self.y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(self, w):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return 0.5 * jnp.mean((self.x @ w - self.y) ** 2)

  def init_params(self, rng, batch) -> Dict[str, np.ndarray]:
    del rng, batch
    return {"w": np.zeros((DIM,), np.float32)}

  def loss_fn(self, params, batch, rng):
    del batch, rng
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    loss = self.loss(params["w"])
    return loss, {"log10_loss": jnp.log10(loss)}

  def evaluators(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from vit_jax import evaluation  # pylint: disable=g-import-not-at-top

    def step(params, log10_loss, batch):
      del params
      n = jnp.sum(batch["_mask"].astype(jnp.float32))
      return {"log10_loss": log10_loss * n, "n": n}  # summed over batches: divided back below

    return {"eval": evaluation.Evaluator(
        prepare=lambda params: jnp.log10(self.loss(jnp.asarray(params["w"]))),
        step=step, finalize=lambda out: {"log10_loss": float(out["log10_loss"] / out["n"])})}


def get_config(arg: str = ""):
  """The loop's settings for plain gradient descent on this problem; `arg`: total steps."""
  from vit_jax import configs  # pylint: disable=g-import-not-at-top
  c = configs.get_config("vit.py")  # Fashion-MNIST input keys; its model is not built
  c.task = f"{os.path.abspath(__file__)}:LeastSquaresTask"
  c.total_steps = int(arg or 20)
  c.optimizer, c.momentum, c.decay_type = "sgd", 0.0, "constant"
  c.base_lr, c.warmup_steps, c.grad_norm_clip, c.weight_decay = 0.1, 0, 0.0, 0.0
  c.train_split, c.eval_split = "train[:64]", "test[:8]"
  c.batch, c.batch_eval = 8, 8
  c.cache_train, c.shuffle_buffer = False, 64
  c.eval_every_steps, c.log_every_steps = 5, 5
  c.checkpoint_every_steps = 10
  c.plots = False
  return c
