"""CLI: python -m vit_jax.main --workdir=DIR --config=vit_jax/configs/vit.py:MODEL,DATASET [--config.key=value ...]

Multi-host: on Cloud TPU VMs and SLURM, `--jax_distributed` lets jax find the cluster itself;
elsewhere pass --coordinator_address, --num_processes and --process_id (the same command on
every host, each with its own --process_id).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config: path/to/config.py[:ARG], e.g. vit_jax/configs/vit.py:b16,cifar10",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs; a run "
                    "started in a workdir that holds checkpoints resumes from the latest.")
flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax
  if FLAGS.jax_distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from vit_jax import train
  logging.info("Config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
