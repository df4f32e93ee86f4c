"""Test setup: 8 fake CPU devices (before jax initialises), quiet TF, no network."""
import os

# LLVM's optimisation of XLA:CPU's emitted kernels off: the suite's tiny models spend most of their
# time compiling, and this cuts compile time ~2-3x (the end-to-end detection test: 61 s -> 41 s);
# results change at float32 rounding only (HLO passes, fusion and layouts are unchanged).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run in parallel processes (pytest-xdist): one intra-op thread each keeps 2 cores busy
# without oversubscription.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
