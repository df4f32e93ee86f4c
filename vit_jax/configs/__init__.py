"""Config files are Python modules with `get_config(arg)`; this loads one by `FILE:ARG`."""
import importlib
import importlib.util
import os

import ml_collections


def get_config(spec: str) -> ml_collections.ConfigDict:
  """Loads a config the way `--config=` does, for notebooks.

  `spec` is `vit.py:b16,cifar10`, `vit_jax/configs/vit.py:b16,cifar10`, `augreg.py:B_16-i21k-...`,
  or any path to a Python file defining `get_config(arg)`.
  """
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  here = os.path.dirname(__file__)
  if os.path.dirname(path) in ("", os.path.relpath(here), here) or os.path.exists(
      os.path.join(here, name + ".py")) and not os.path.exists(path):
    module = importlib.import_module(f"vit_jax.configs.{name}")
  else:
    if not os.path.exists(path):
      raise FileNotFoundError(f"Config file {path!r} (from {spec!r}) does not exist.")
    module = import_file(path)
  return module.get_config(arg) if arg else module.get_config()


def import_file(path: str):
  """The Python module in the file `path` (a config, a sweep's space, a task of your own)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (expected a Python file).")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


RUN_CONFIG = "config.json"  # a run's config, in its workdir (train.py writes it, predict reads it)


def _tuples(x):
  """JSON has no tuples; configs keep sequences as tuples (command-line settable)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `config` to `workdir/config.json` (atomically: a temporary file, then a rename)."""
  from vit_jax import files  # pylint: disable=g-import-not-at-top  (configs stay cheap to load)
  # A resumed run rewrites it.
  return files.write_atomic(os.path.join(workdir, RUN_CONFIG),
                            config.to_json_best_effort(indent=2, sort_keys=True))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` trained with (its `config.json`), locked as `get_config`'s."""
  import json  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / RUN_CONFIG
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: not a workdir of `vit_jax.main` (runs write "
                            "their config there when they start); pass --config= and "
                            "--checkpoint= instead.")
  try:
    return from_dict(json.loads(path.read_text()))
  except ValueError as e:
    raise ValueError(f"{path}: not a readable config ({e}).") from e


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """A locked config from `config.to_dict()`'s JSON (lists back to tuples), as `get_config`'s."""
  config = ml_collections.ConfigDict(_tuples(values))
  config.lock()
  return config
