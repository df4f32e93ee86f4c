"""Timing shared by the PyTorch peers (peer_timm.py, peer_open_clip.py); imports nothing of ours."""
import time


def time_step(fn, inputs, steps: int, repeats: int, sync=lambda: None):
  """(best seconds per step over `repeats` windows of `steps` calls, warm-up seconds) of
  `fn(*inputs)`; the first call (torch.compile's compilation) is the warm-up."""
  t0 = time.perf_counter()
  fn(*inputs)
  sync()
  warmup = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      fn(*inputs)
    sync()
    best = min(best, (time.perf_counter() - t0) / steps)
  return best, warmup
