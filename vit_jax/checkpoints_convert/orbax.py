"""Our own training checkpoints (orbax, as `vit_jax.checkpoint` writes them) as a pretrained init.

`pretrained_path` may name a workdir, its `checkpoints/` (or `best/`) folder, or one step's
folder. Only the `params` subtree is read, as host numpy arrays, whatever mesh and sharding the
run that wrote it had (FSDP on 8 devices, tensor-parallel, replicated, pmap): the reader asks
orbax for whole arrays. The names are this codebase's own, i.e. an `.npz` of the same tree, so
the rest of `checkpoints_convert` (position-embedding resampling, head fitting) applies as is.
"""
import contextlib
import logging
import os
from typing import Dict, Optional

import jax
import numpy as np

from vit_jax.checkpoints_convert import common

METADATA = "_CHECKPOINT_METADATA"  # orbax's marker in every step folder
ITEM = "default"  # the item StandardSave writes


def _steps(folder: str):
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.exists(os.path.join(folder, n, METADATA)))


def step_dir(path: str) -> Optional[str]:
  """The step folder `path` designates (the newest step of a workdir or checkpoint folder), or
  None when `path` is not an orbax checkpoint."""
  if not os.path.isdir(path):
    return None
  if os.path.exists(os.path.join(path, METADATA)):
    return path
  for folder in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(folder) and _steps(folder):
      return os.path.join(folder, str(_steps(folder)[-1]))
  return None


class _NoItemMetadataWarning(logging.Filter):
  """A PyTreeCheckpointer opened on one item of a CheckpointManager step looks for the step's
  metadata file inside the item folder, warns that it is missing there, and reads the item
  anyway: a false alarm for every checkpoint this codebase writes."""

  def filter(self, record):
    return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def _quiet_item_metadata():
  absl_logger, f = logging.getLogger("absl"), _NoItemMetadataWarning()
  absl_logger.addFilter(f)
  try:
    yield
  finally:
    absl_logger.removeFilter(f)


def is_orbax(path: str) -> bool:
  return step_dir(path) is not None


def read_tree(path: str) -> Dict[str, object]:
  """The nested `params` tree (host numpy arrays, LoRA adapters included) of the checkpoint `path`
  designates (see module doc), e.g. to predict with a run's own model."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (slow import)
  step = step_dir(path)
  if step is None:
    raise FileNotFoundError(f"{path}: no orbax checkpoint (a workdir, its checkpoints/ folder, "
                            "or a step folder holding _CHECKPOINT_METADATA).")
  item = os.path.join(step, ITEM)
  ckptr = ocp.PyTreeCheckpointer()
  with _quiet_item_metadata():
    tree = ckptr.metadata(item)
  tree = getattr(tree, "item_metadata", tree)
  if "params" not in tree:
    raise common.CheckpointError(f"{item}: an orbax checkpoint without 'params' (found "
                                 f"{sorted(tree)}); not a vit_jax training checkpoint.")
  wanted = {"params": tree["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  with _quiet_item_metadata():
    return ckptr.restore(item, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True))["params"]


def read_params(path: str) -> Dict[str, np.ndarray]:
  """{'/'-joined param name: array} of the checkpoint `path` designates (see module doc)."""
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(read_tree(path))}
  lora = sorted(k for k in flat if k.startswith("lora/"))
  if lora:
    raise common.UnsupportedCheckpointError(
        f"{step_dir(path)}: holds LoRA adapters ({lora[0]}, ...): merge them into the base "
        "weights first (models/lora.merge_lora with the run's config.lora.alpha, then save or "
        "export the merged params), since the file does not record alpha.")
  return flat
