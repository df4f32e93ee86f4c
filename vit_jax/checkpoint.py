"""Orbax checkpoints: atomic save every N steps, keep-N, resume from the latest, best-so-far.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint intact and the partial one is ignored on restore.
"""
import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """One orbax CheckpointManager over `workdir/<name>`. State trees are global jax arrays."""

  def __init__(self, workdir: str, *, keep: int = 2, name: str = "checkpoints"):
    self.directory = os.path.join(os.path.abspath(workdir), name)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, *, metrics: Optional[dict] = None) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    logging.info("Saved checkpoint for step %d to %s", step, self.directory)

  def restore(self, step: int, target: PyTree) -> PyTree:
    """Restores `step` into the structure, shapes, dtypes and shardings of `target`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    logging.info("Restored checkpoint for step %d from %s", step, self.directory)
    return state

  def close(self) -> None:
    self.manager.close()
