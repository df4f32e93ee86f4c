"""Orbax checkpoints: atomic sharded save every N steps, keep-N, resume from the latest readable.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint intact and the partial one is ignored on restore.
Arrays are saved as they are laid out (each process writes the shards it holds) and restored
into whatever layout the caller asks for: a run saved with FSDP on 8 devices resumes on 4, or on
one with replicated params. A checkpoint damaged after it was written (a truncated or missing
file) is detected on restore: `restore_latest` moves it aside and falls back to the next older
one, and raises `CheckpointReadError` (step, file, what to do) when none is readable.
"""
import gc
import json
import os
import sys
import time
from typing import Any, List, Optional, Tuple

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from vit_jax import files

PyTree = Any
FILES_MANIFEST = "vit_jax_files.json"  # {relative path: size} of a step, written after the save


class CheckpointReadError(RuntimeError):
  """A checkpoint that exists but cannot be read back."""


def _files(step_dir: epath.Path) -> dict:
  """{path relative to `step_dir`: size} of every file below it (local or GCS)."""
  out, todo = {}, [step_dir]
  while todo:
    for f in todo.pop().iterdir():
      if f.is_dir():
        todo.append(f)
      elif f.name != FILES_MANIFEST:
        out[str(f.relative_to(step_dir))] = f.stat().length
  return out


def _root_cause(e: BaseException) -> BaseException:
  """The innermost exception of a chain: orbax wraps tensorstore's message (which names the
  array and the file) in a generic one that prints the whole TensorStore spec."""
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return e


class _QuietUnraisable:
  """Orbax's reads are asyncio coroutines; when one fails, its siblings are collected after the
  event loop closed and Python prints each as 'Exception ignored ... Event loop is closed' (a
  few hundred lines). Those say nothing the raised error does not: hide them during a restore."""

  def __enter__(self):
    self.hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    return self

  def __exit__(self, *exc):
    if exc[0] is not None:
      gc.collect()  # the failed read's coroutines go now, while their messages are hidden
    sys.unraisablehook = self.hook


class Checkpointer:
  """One orbax CheckpointManager over `workdir/<name>`. State trees are global jax arrays."""

  def __init__(self, workdir: str, *, keep: int = 2, name: str = "checkpoints"):
    self.directory = os.path.join(os.path.abspath(workdir), name) if "://" not in workdir else (
        os.path.join(workdir, name))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def save(self, step: int, state: PyTree, *, metrics: Optional[dict] = None) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      # Sizes of the committed files: a later truncation is then named file by file on restore.
      step_dir = self.step_dir(step)
      files.write_atomic(step_dir / FILES_MANIFEST, json.dumps(_files(step_dir), sort_keys=True))
    logging.info("Saved checkpoint for step %d to %s", step, self.directory)

  def check_files(self, step: int) -> None:
    """Raises CheckpointReadError if a file of `step` is missing or has changed size since it was
    written (nothing to check for checkpoints written before the manifest existed)."""
    step_dir = self.step_dir(step)
    manifest = step_dir / FILES_MANIFEST
    if not manifest.exists():
      return
    want, found = json.loads(manifest.read_text()), _files(step_dir)
    for rel, size in sorted(want.items()):
      if rel not in found:
        raise CheckpointReadError(f"{step_dir / rel}: missing (written with {size} bytes).")
      if found[rel] != size:
        raise CheckpointReadError(f"{step_dir / rel}: {found[rel]} bytes, written with {size} "
                                  "(truncated or overwritten).")

  def restore(self, step: int, target: PyTree) -> PyTree:
    """Restores `step` into the structure, shapes, dtypes and shardings of `target` (arrays or
    ShapeDtypeStructs with a `sharding`); raises CheckpointReadError on unreadable files."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    self.check_files(step)
    try:
      with _QuietUnraisable():
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
      cause = _root_cause(e)
      if not _is_damage(cause):
        raise  # e.g. a model that does not fit the checkpoint: the caller's error, not damage
      raise CheckpointReadError(f"{self.step_dir(step)}: {type(cause).__name__}: "
                                f"{str(cause)[:600]}") from None
    logging.info("Restored checkpoint for step %d from %s", step, self.directory)
    return state

  def restore_latest(self, target: PyTree) -> Tuple[int, PyTree]:
    """(step, state) of the newest checkpoint that reads back; broken newer ones are moved to
    `corrupt_<step>_<time>` beside them (kept, not deleted) with the reason logged."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    failures = []
    for step in reversed(steps):
      try:
        state = self.restore(step, target)
      except CheckpointReadError as e:
        failures.append((step, str(e)))
        logging.warning("Checkpoint for step %d cannot be read back: %s", step, e)
        continue
      for bad, why in failures:
        self._quarantine(bad, why)
      if failures:
        self.manager.reload()
        logging.warning("Resuming from the older checkpoint for step %d instead of step %d.",
                        step, failures[0][0])
      return step, state
    bad, why = failures[0]
    raise CheckpointReadError(
        f"Cannot resume from {self.directory}: the checkpoint for step {bad} is unreadable "
        f"({why}), and no older checkpoint reads back either "
        f"({len(failures) - 1} others tried). Restore the file from a backup, or move "
        f"{self.step_dir(bad)} away to start from the next older one (or from scratch if there "
        "is none).")

  def _quarantine(self, step: int, why: str) -> None:
    if jax.process_index() != 0:
      return
    src = self.step_dir(step)
    dst = src.parent / f"corrupt_{step}_{time.strftime('%Y%m%d-%H%M%S')}"
    src.rename(dst)
    (dst / "WHY.txt").write_text(why + "\n")
    logging.warning("Moved the unreadable checkpoint %s to %s.", src, dst)

  def close(self) -> None:
    self.manager.close()


# What tensorstore's errors start with when a file is short, missing or garbled.
_DAMAGE = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT",
           "UNKNOWN", "INTERNAL")


def _is_damage(cause: BaseException) -> bool:
  """Whether the root cause of a failed restore is unreadable data (not a caller error)."""
  if isinstance(cause, (OSError, json.JSONDecodeError, EOFError)):
    return True
  return str(cause).startswith(_DAMAGE)
