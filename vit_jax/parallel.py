"""The two parallel back-ends behind one interface: "pmap" and "pjit" (jax.jit + Mesh/NamedSharding).

A train step is written once as a pure function `step(state, batch, rng, mean_fn)`; the back-end
compiles it and supplies `mean_fn`, the cross-device mean of per-device values:
- pmap: state replicated on every local device (leading device axis), the per-process batch split
  over local devices, gradients and metrics averaged with `lax.pmean` over axis "batch";
- pjit: one global program over a `Mesh` built from `config.mesh`; the batch is a global array
  sharded along the "data" axis, so a mean over the batch already is the global mean and `mean_fn`
  is the identity. Params are replicated (sharding rules come later, in this file).
Both are multi-host aware: each process feeds only its own part of the global batch.
"""
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
from jax import lax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
AXIS = "batch"  # pmap axis name


def make_mesh(mesh_spec: Sequence[Tuple[str, int]], devices=None) -> Mesh:
  """Mesh from `[(name, size), ...]`; one size may be -1 (the remaining devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  names = [str(n) for n, _ in mesh_spec]
  sizes = [int(s) for _, s in mesh_spec]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {list(mesh_spec)}: at most one axis may have size -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if devices.size % known:
    raise ValueError(f"config.mesh {list(mesh_spec)} needs a multiple of {known} devices; "
                     f"found {devices.size}.")
  sizes = [devices.size // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f"config.mesh {list(mesh_spec)} gives {int(np.prod(sizes))} devices; "
                     f"found {devices.size}.")
  return Mesh(devices.reshape(sizes), names)


def check_batch(batch_size: int, num_devices: int, what: str = "config.batch") -> None:
  if batch_size % num_devices:
    raise ValueError(f"{what}={batch_size} does not divide across {num_devices} devices: use a "
                     f"multiple of {num_devices}.")


class Backend:
  """What the training loop needs from a back-end; the two subclasses below implement it."""
  name: str

  def mean(self, tree: PyTree) -> PyTree:
    """Cross-device mean inside a compiled step (identity where the step is already global)."""
    raise NotImplementedError

  def put_state(self, tree: PyTree) -> PyTree:
    """Host/device pytree -> the placement the compiled step expects."""
    raise NotImplementedError

  def get_state(self, tree: PyTree) -> PyTree:
    """The inverse of `put_state`: one logical copy (global arrays, no device axis)."""
    raise NotImplementedError

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    """This process's numpy batch -> the global batch as the compiled step expects it."""
    raise NotImplementedError

  def compile_train_step(self, step_fn: Callable) -> Callable:
    """`step_fn(state, batch, rng) -> (state, metrics)`; state is donated."""
    raise NotImplementedError

  def compile_eval_step(self, eval_fn: Callable, reduce: str = "sum") -> Callable:
    """`eval_fn(params, batch)`. reduce="sum": it returns per-device sums and the compiled step
    their global sums (replicated); "gather": it returns per-example arrays [batch, ...] and the
    compiled step keeps them where they are (read them with `fetch_examples`)."""
    raise NotImplementedError

  def fetch_examples(self, tree: PyTree) -> PyTree:
    """Per-example outputs of a "gather" eval step -> host numpy [global batch, ...], in the
    order of the global batch (every process gets all rows)."""
    raise NotImplementedError

  def fetch(self, tree: PyTree) -> PyTree:
    """Replicated metrics -> host numpy (the only host sync; call it at log time)."""
    raise NotImplementedError


class PmapBackend(Backend):
  name = "pmap"

  def __init__(self, config):
    self.devices = jax.local_devices()
    self.n_local = len(self.devices)
    # pmap's inputs carry a leading local-device axis; this sharding puts row i on device i.
    self.stacked = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), P(AXIS))
    self.global_replicated = NamedSharding(Mesh(np.asarray(jax.devices()), (AXIS,)), P())
    check_batch(config.batch // jax.process_count(), self.n_local,
                "per-process batch (config.batch / process_count)")
    check_batch(config.batch_eval // jax.process_count(), self.n_local,
                "per-process batch_eval (config.batch_eval / process_count)")

  def mean(self, tree):
    return lax.pmean(tree, AXIS)

  def put_state(self, tree):
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (self.n_local,) + np.shape(x)),
                                 self.stacked), tree)

  def get_state(self, tree):
    first = jax.tree.map(lambda x: x[0], tree)
    if jax.process_count() == 1:
      return first
    # Device 0's copy is host-local; orbax (and every other multi-host consumer) needs global
    # arrays: make it one, fully replicated over all processes' devices.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.global_replicated, np.asarray(x)),
        first)

  def put_batch(self, batch):
    def put(x):
      x = np.asarray(x)
      x = x.reshape((self.n_local, x.shape[0] // self.n_local) + x.shape[1:])
      return jax.device_put(x, self.stacked)
    return jax.tree.map(put, batch)

  def compile_train_step(self, step_fn):
    def step(state, batch, rng):
      # Each device draws its own dropout noise; the step itself stays device-agnostic.
      rng = jax.random.fold_in(rng, lax.axis_index(AXIS))
      return step_fn(state, batch, rng)
    return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))

  def compile_eval_step(self, eval_fn, reduce="sum"):
    _check_reduce(reduce)
    if reduce == "gather":
      return jax.pmap(eval_fn, axis_name=AXIS)
    return jax.pmap(lambda p, b: lax.psum(eval_fn(p, b), AXIS), axis_name=AXIS)

  def fetch_examples(self, tree):
    # [local devices, per device, ...] -> this process's rows, then every process's, in order.
    local = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), tree)
    return _allgather_processes(local)

  def fetch(self, tree):
    return jax.device_get(jax.tree.map(lambda x: x[0], tree))


class PjitBackend(Backend):
  name = "pjit"

  def __init__(self, config):
    self.mesh = make_mesh(config.mesh)
    if "data" not in self.mesh.axis_names:
      raise ValueError(f"config.mesh {list(config.mesh)} has no 'data' axis to shard the batch.")
    n_data = self.mesh.shape["data"]
    check_batch(config.batch, n_data, "config.batch")
    check_batch(config.batch_eval, n_data, "config.batch_eval")
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))

  def mean(self, tree):
    return tree

  def put_state(self, tree):
    if jax.process_count() > 1:
      # Every process holds the full values (fresh init, or restored from a checkpoint onto its
      # own devices): build the global array from each process's copy; a device_put would be a
      # cross-host transfer, which CPU and most GPU back-ends do not do.
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)
    return jax.device_put(tree, self.replicated)

  def get_state(self, tree):
    return tree

  def put_batch(self, batch):
    # Each process holds its own rows; jax assembles the global array without gathering them.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        batch)

  def compile_train_step(self, step_fn):
    return jax.jit(step_fn, in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def compile_eval_step(self, eval_fn, reduce="sum"):
    _check_reduce(reduce)
    out = self.replicated if reduce == "sum" else self.batch_sharding
    return jax.jit(eval_fn, in_shardings=(self.replicated, self.batch_sharding),
                   out_shardings=out)

  def fetch_examples(self, tree):
    if jax.process_count() == 1:
      return jax.device_get(tree)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)

  def fetch(self, tree):
    return jax.device_get(tree)


def _check_reduce(reduce: str) -> None:
  if reduce not in ("sum", "gather"):
    raise ValueError(f"Eval step reduce={reduce!r}: expected 'sum' or 'gather'.")


def _allgather_processes(local: PyTree) -> PyTree:
  """Host numpy rows of this process -> every process's rows, concatenated by process index."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(local, tiled=True)


def get_backend(config) -> Backend:
  backends = {"pmap": PmapBackend, "pjit": PjitBackend}
  if config.parallelism not in backends:
    raise ValueError(f"config.parallelism={config.parallelism!r}: expected 'pjit' or 'pmap'.")
  return backends[config.parallelism](config)
