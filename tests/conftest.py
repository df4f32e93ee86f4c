"""Test setup: 8 fake CPU devices (before jax initialises), quiet TF, no network."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run in parallel processes (pytest-xdist): one intra-op thread each keeps 2 cores busy
# without oversubscription.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
