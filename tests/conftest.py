"""Test setup: 8 fake CPU devices (before jax initialises), quiet TF, no network."""
import os

# LLVM's optimisation of XLA:CPU's emitted kernels off: the suite's tiny models spend most of their
# time compiling, and this cuts compile time ~2-3x (the end-to-end detection test: 61 s -> 41 s);
# results change at float32 rounding only (HLO passes, fusion and layouts are unchanged).
# Kernels from XLA:CPU's classic elemental emitters instead of its MLIR fusion emitters (as
# tests/models/test_owl_vit.py's FAST_COMPILE): the same HLO fusions, emitted without the MLIR
# pipeline, compile ~1.5-2x faster again (CLIP nano train step under FSDP: 4.4 s -> 2.8 s; the
# sharding and detection test files: 244 s -> 175 s). Subprocesses that tests start inherit
# these flags (or set TEST_XLA_FLAGS, below, themselves).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run in parallel processes (pytest-xdist): one intra-op thread each keeps 2 cores busy
# without oversubscription.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")


def compilation_cache_env(cache_dir) -> dict:
  """Environment for a `python -m vit_jax.main` subprocess that shares XLA executables, through
  JAX's persistent compilation cache in `cache_dir`, with earlier runs of the same test given the
  same directory (a reference run, then a killed and a resumed one): a hit loads the executable
  an identical compile produced, so results are unchanged; only the compiling is skipped. One
  directory per test, and per process where processes run at once (JAX writes cache files
  without a lock)."""
  return dict(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


import pytest  # noqa: E402  (after the environment above, which must precede any jax import)


@pytest.fixture(autouse=True)
def _no_end_of_run_plots(request, monkeypatch):
  """Training runs in tests skip the end-of-run plots (seconds of matplotlib each), except in
  tests/test_plots.py, whose subject they are. Subprocess runs pass --config.plots=False."""
  if request.module.__name__.rpartition(".")[2] != "test_plots":
    from vit_jax import train  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(train, "write_plots", lambda workdir: None)
