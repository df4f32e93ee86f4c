"""LoRA for any model, as a transform of its params tree: adapters live beside the base weights and
are folded into the targeted kernels before `model.apply`, so no Flax module changes.

  params = lora.add_lora(params, rank=8, targets=r"(.*/)?(query|value)/kernel", rng=key)
  out = model.apply({"params": lora.merge_lora(params, alpha=16.0)}, x)   # in loss_fn / eval
  export = lora.merge_lora(params, alpha=16.0)   # the base tree, adapters folded in

Layout: `params["lora"][<escaped path>] = {"a": [fan_in, rank], "b": [rank, fan_out]}`, where
the escaped path is the kernel's '/'-joined path with '/' -> '.' (e.g.
`img.Transformer.encoderblock_3.MultiHeadDotProductAttention_1.query.kernel`): one flat level of
legal, readable Flax/orbax keys, so `optim` groups match them with `lora/.*`. The merged kernel is
`W + (alpha / rank) * (A @ B).reshape(W.shape)`, i.e. `x W + s (x A) B` as in the LoRA paper
(Hu et al. 2021), with B = 0 at init so the adapted model starts as the base model.

Cost: unlike a fused LoRA layer, the backward pass still forms the full kernel gradient dL/dW'
(dA and dB are computed from it), so step compute and activation memory are those of full
fine-tuning; what LoRA saves here is the optimizer state and the trainable set (the base params
sit in a frozen optax group, `configs.param_groups.lora()`), and the adapter-only checkpoints.
"""
import math
import re
import zlib
from typing import Any, Dict, Optional, Tuple

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LORA_KEY = "lora"
DEFAULT_ALPHA = 16.0  # config.lora.alpha's default (configs/common.py); pass the run's own
# Attention projections keep DenseGeneral layouts (models/vit.py `_Projection.in_axes`): q/k/v
# [width, heads, head_dim] have one input axis, `out` [heads, head_dim, width] two.
_QKV = ("query", "key", "value")


def escape(path: str) -> str:
  """'img/Transformer/.../query/kernel' -> 'img.Transformer....query.kernel' (a single key)."""
  return path.replace("/", ".")


def unescape(key: str) -> str:
  """Inverse of `escape` (Flax module and param names contain no '.')."""
  return key.replace(".", "/")


def kernel_in_axes(path: str, shape: Tuple[int, ...]) -> int:
  """How many leading axes of the kernel at `path` are its input (fan_in) axes.

  Dense [in, out] and attention q/k/v [width, heads, head_dim]: 1; attention `out`
  [heads, head_dim, width]: 2; a conv kernel [kh, kw, c_in, c_out] (the patch embedding): 3,
  flattened in the order the model's patch GEMM uses. Other layouts raise: guessing the split
  would silently build a different low-rank factorisation.
  """
  parent = path.split("/")[-2] if "/" in path else ""
  ndim = len(shape)
  if ndim == 2:
    return 1
  if ndim == 3 and parent in _QKV:
    return 1
  if ndim == 3 and parent == "out":
    return 2
  if ndim == 4:
    return 3
  raise ValueError(
      f"LoRA target {path!r} has shape {tuple(shape)}: expected a Dense kernel [in, out], an "
      f"attention query/key/value [width, heads, head_dim] or out [heads, head_dim, width] "
      f"kernel, or a conv kernel [kh, kw, in, out].")


def _fan_in_out(path: str, shape: Tuple[int, ...]) -> Tuple[int, int]:
  k = kernel_in_axes(path, shape)
  return math.prod(shape[:k]), math.prod(shape[k:])


def _flat(params) -> Dict[str, Any]:
  """'/'-joined path -> leaf (dicts and FrozenDicts alike)."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(_unfreeze(params)).items()}


def _unfreeze(params):
  return flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params


def kernel_paths(params) -> list:
  """'/'-joined paths of the base tree's kernels (leaves named `kernel`; the `lora` subtree is
  not part of the base tree)."""
  return [p for p in _flat(base_params(params)) if p.rsplit("/", 1)[-1] == "kernel"]


def base_params(params) -> PyTree:
  """`params` without its `lora` subtree (same container type)."""
  if LORA_KEY not in params:
    return params
  rest = {k: v for k, v in params.items() if k != LORA_KEY}
  return flax.core.freeze(rest) if isinstance(params, flax.core.FrozenDict) else rest


def init_lora(params, *, rank: int, targets: str, rng: jax.Array,
              dtype: Optional[Any] = None) -> Dict[str, Dict[str, jnp.ndarray]]:
  """The adapters for every kernel whose '/'-joined path `re.fullmatch`es `targets`.

  Args:
    params: the model's params tree (arrays or `jax.eval_shape` output; only shapes and dtypes
      are read). An existing `lora` subtree is ignored.
    rank: the adapters' rank r (>= 1).
    targets: regex `re.fullmatch`ed on the kernels' '/'-joined paths, e.g.
      `configs.param_groups.LORA_TARGETS` (every attention query and value kernel).
    rng: PRNG key. Each target's A is drawn from `fold_in(rng, crc32(path))`, so its init does not
      depend on which other kernels are targeted.
    dtype: the adapters' dtype; None: each kernel's own.

  Returns:
    {escaped path: {"a": [fan_in, rank] ~ N(0, 1/fan_in), "b": [rank, fan_out] zeros}}. B = 0
    makes the merged model equal the base model at init (LoRA paper, peft).
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f"LoRA rank={rank!r}: expected an integer >= 1 (config.lora.rank 0 means "
                     "LoRA is off; do not call init_lora then).")
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise ValueError(f"LoRA targets: bad regex {targets!r}: {e}") from e
  flat = _flat(base_params(params))
  kernels = [p for p in flat if p.rsplit("/", 1)[-1] == "kernel"]
  hits = [p for p in kernels if pattern.fullmatch(p)]
  if not hits:
    raise ValueError(f"LoRA targets {targets!r} match no kernel; the kernel paths are: {kernels}")
  lora = {}
  for path in hits:
    w = flat[path]
    fan_in, fan_out = _fan_in_out(path, w.shape)
    dt = jnp.dtype(dtype or w.dtype)
    key = jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    a = jax.random.normal(key, (fan_in, rank), jnp.float32) / np.sqrt(fan_in)
    lora[escape(path)] = {"a": a.astype(dt), "b": jnp.zeros((rank, fan_out), dt)}
  return lora


def add_lora(params, *, rank: int, targets: str, rng: jax.Array,
             dtype: Optional[Any] = None) -> PyTree:
  """`{**params, "lora": init_lora(params, ...)}` (same container type as `params`)."""
  if LORA_KEY in params:
    raise ValueError(f"params already hold a {LORA_KEY!r} subtree with "
                     f"{len(params[LORA_KEY])} adapters; merge_lora them first to stack another.")
  lora = init_lora(params, rank=rank, targets=targets, rng=rng, dtype=dtype)
  out = {**_unfreeze(params), LORA_KEY: lora}
  return flax.core.freeze(out) if isinstance(params, flax.core.FrozenDict) else out


def add_lora_from_config(params, lora_config, rng: jax.Array) -> Tuple[PyTree, Optional[str]]:
  """A task's init: adapters per `config.lora` (rank, targets) when its rank is > 0.

  Returns (params, a one-line description for the log, or None when LoRA is off)."""
  if not lora_config.rank:
    return params, None
  params = add_lora(params, rank=lora_config.rank, targets=lora_config.targets, rng=rng)
  return params, (f"LoRA rank {lora_config.rank} on {len(params[LORA_KEY])} kernels: "
                  f"{lora_param_count(params):,} trainable adapter params")


def merge_lora(params, alpha: float = DEFAULT_ALPHA) -> PyTree:
  """The base tree, each adapted kernel W replaced by W + (alpha / rank) (A @ B).reshape(W.shape).

  Pure and traceable (call it inside the jitted loss); gradients reach A and B through it. The
  update is computed in W's dtype. Without a `lora` key it returns `params` unchanged. Used for
  export too: the result is a plain params tree for the unmodified model.
  """
  if LORA_KEY not in params:
    return params
  adapters = params[LORA_KEY]
  base = _unfreeze(base_params(params))
  flat = traverse_util.flatten_dict(base)
  for name, ab in adapters.items():
    path = unescape(name)
    key = tuple(path.split("/"))
    if key not in flat:
      raise KeyError(f"params['{LORA_KEY}'][{name!r}] adapts {path!r}, which is not in the base "
                     f"params; its kernels are: {kernel_paths(base)}")
    if set(ab) != {"a", "b"}:
      raise ValueError(f"params['{LORA_KEY}'][{name!r}]: expected keys ['a', 'b'], found "
                       f"{sorted(ab)}.")
    w, a, b = flat[key], ab["a"], ab["b"]
    fan_in, fan_out = _fan_in_out(path, w.shape)
    rank = a.shape[-1]
    if a.shape != (fan_in, rank) or b.shape != (rank, fan_out):
      raise ValueError(f"params['{LORA_KEY}'][{name!r}] for kernel {tuple(w.shape)}: expected "
                       f"a [{fan_in}, r] and b [r, {fan_out}], found a {tuple(a.shape)} and b "
                       f"{tuple(b.shape)}.")
    delta = a.astype(w.dtype) @ b.astype(w.dtype)
    flat[key] = w + (jnp.asarray(alpha / rank, w.dtype) * delta).reshape(w.shape)
  merged = traverse_util.unflatten_dict(flat)
  return flax.core.freeze(merged) if isinstance(params, flax.core.FrozenDict) else merged


def lora_param_count(params) -> int:
  """Number of scalars in the `lora` subtree (0 without one)."""
  if LORA_KEY not in params:
    return 0
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params[LORA_KEY])))
