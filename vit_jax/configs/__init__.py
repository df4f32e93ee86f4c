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
    spec_ = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
