"""The optimizer as one optax transformation: schedules, parameter groups, freezing, clipping, decay.

`make_optimizer(config, params)` puts everything that decides who learns how fast into `tx`, so
the train step stays `grads -> tx.update -> optax.apply_updates`. Norms for logging are
`optax.global_norm(grads)` / `optax.global_norm(params)`; accumulation and early stopping live in
train.py.
"""
import dataclasses
import math
import re
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[Any], jnp.ndarray]

DECAY_TYPES = ("cosine", "linear", "rsqrt", "constant")
OPTIMIZERS = ("sgd", "adamw", "adafactor")
# What a `config.param_groups` entry's dict may set; anything else is a typo and an error.
GROUP_KEYS = ("name", "lr_mult", "frozen", "weight_decay", "base_lr", "warmup_steps",
              "decay_type", "linear_end")
# wd_mask='default' leaves these undecayed: decaying them pulls LayerNorm towards zero output and
# shrinks embeddings that carry no "capacity" (the usual BERT/ViT/timm practice).
NO_DECAY_REGEX = r"(.*/)?(bias|scale|pos_embedding|cls)"
# Layer 0 for layer-wise decay: patch embedding, class token, position embedding.
STEM_REGEX = r"(.*/)?(embedding|cls|posembed_input)(/.*)?"
_BLOCK_REGEX = re.compile(r"(^|.*/)encoderblock_(\d+)/.*")


def param_paths(params) -> List[str]:
  """'/'-joined paths of the leaves of `params`, in `jax.tree.leaves` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def path_str(key_path) -> str:
  """'/'-joined names of a `jax.tree_util` key path: 'Transformer/encoder_norm/scale'."""
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def _map_paths(fn: Callable[[str], Any], tree):
  """A tree like `tree` with `fn(path)` at each leaf (leaves may be arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), tree)


def tree_bytes(tree) -> int:
  """Bytes held by the array leaves of `tree` (works on arrays and `jax.eval_shape` output).

  A pmap-replicated tree counts every replica (its leaves carry the device axis).
  """
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "shape"):
      x = np.asarray(x)
    total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
  return int(total)


def create_learning_rate_schedule(total_steps: int, base_lr: float, decay_type: str,
                                  warmup_steps: int, linear_end: float = 0.0) -> Schedule:
  """Linear warmup from 0 to `base_lr` over `warmup_steps`, then `decay_type` until `total_steps`.

  As upstream vision_transformer's `create_learning_rate_schedule`, with big_vision's `rsqrt`
  (timescale = warmup_steps, so the decay continues smoothly from the warmup peak). `linear_end`
  is a fraction of `base_lr` (upstream: an absolute LR), so groups with different multipliers all
  end at the same fraction of their own peak. Returns `step -> lr` (float32), traceable.
  """
  if decay_type not in DECAY_TYPES:
    raise ValueError(f"decay_type={decay_type!r}: expected one of {DECAY_TYPES}.")
  if warmup_steps < 0 or total_steps < 0:
    raise ValueError(f"warmup_steps={warmup_steps} and total_steps={total_steps} must be >= 0.")
  # max(.., 1): a run shorter than its warmup (a smoke test) is legal and just stays in warmup.
  decay_steps = max(total_steps - warmup_steps, 1)
  timescale = max(warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if decay_type == "cosine":
      lr = base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay_type == "linear":
      lr = base_lr * (linear_end + (1.0 - linear_end) * (1.0 - progress))
    elif decay_type == "rsqrt":
      shift = timescale - warmup_steps
      lr = jnp.where(step > warmup_steps, base_lr / jnp.sqrt((step + shift) / timescale),
                     base_lr)
    else:
      lr = jnp.full_like(step, base_lr)
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    return jnp.asarray(lr, jnp.float32)

  return schedule


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """One entry of `config.param_groups`, with the config's defaults filled in."""
  name: str
  regex: str
  frozen: bool
  lr_mult: float
  weight_decay: float
  base_lr: float
  warmup_steps: int
  decay_type: str
  linear_end: float


def parse_param_groups(config) -> List[ParamGroup]:
  """`config.param_groups` (None: one group 'default' over '.*') as `ParamGroup`s."""
  entries = config.param_groups
  if not entries:
    entries = [(".*", {"name": "default"})]
  groups = []
  for i, entry in enumerate(entries):
    if isinstance(entry, str) or len(entry) != 2:
      raise ValueError(f"config.param_groups[{i}] = {entry!r}: expected a (regex, dict) pair.")
    regex, opts = entry
    opts = dict(opts or {})
    unknown = sorted(set(opts) - set(GROUP_KEYS))
    if unknown:
      raise ValueError(f"config.param_groups[{i}] ({regex!r}) has unknown keys {unknown}; "
                       f"allowed: {GROUP_KEYS}.")
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f"config.param_groups[{i}]: bad regex {regex!r}: {e}") from e
    groups.append(ParamGroup(
        name=str(opts.get("name", f"group{i}")),
        regex=regex,
        frozen=bool(opts.get("frozen", False)),
        lr_mult=float(opts.get("lr_mult", 1.0)),
        weight_decay=float(opts.get("weight_decay", config.weight_decay or 0.0)),
        base_lr=float(opts.get("base_lr", config.base_lr)),
        warmup_steps=int(opts.get("warmup_steps", config.warmup_steps)),
        decay_type=opts.get("decay_type", config.decay_type),
        linear_end=float(opts.get("linear_end", config.linear_end)),
    ))
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(f"config.param_groups: group names must be unique, found {names}.")
  return groups


def assign_groups(groups: Sequence[ParamGroup], params) -> Dict[str, ParamGroup]:
  """path -> its group: the first whose regex `re.fullmatch`es the path.

  Raises ValueError, listing the paths, when a parameter matches no group or a group gets no
  parameter (its regex matches nothing, or only what earlier groups already took).
  """
  paths = param_paths(params)
  assignment, unmatched = {}, []
  for path in paths:
    group = next((g for g in groups if re.fullmatch(g.regex, path)), None)
    if group is None:
      unmatched.append(path)
    else:
      assignment[path] = group
  if unmatched:
    raise ValueError(
        f"config.param_groups {[g.regex for g in groups]} leave {len(unmatched)} parameters "
        f"unmatched (add a final ('.*', {{}}) group?): {unmatched}")
  for g in groups:
    if not any(a is g for a in assignment.values()):
      hits = [p for p in paths if re.fullmatch(g.regex, p)]
      why = (f"only matches paths taken by earlier groups: {hits}" if hits else
             f"matches no parameter; the parameters are: {paths}")
      raise ValueError(f"config.param_groups: group {g.name!r} with regex {g.regex!r} {why}")
  return assignment


def num_blocks(params) -> int:
  """Number of `encoderblock_{i}` blocks in `params` (the depth for layer-wise decay)."""
  ids = [int(m.group(2)) for m in map(_BLOCK_REGEX.fullmatch, param_paths(params)) if m]
  if not ids:
    raise ValueError("layerwise_lr_decay needs `encoderblock_{i}` parameters; found none in "
                     f"{param_paths(params)}")
  return max(ids) + 1


def layer_id(path: str, depth: int) -> int:
  """BEiT/MAE layer ids: stem (embedding, cls, posemb) 0, encoderblock_i i+1, the rest depth+1."""
  m = _BLOCK_REGEX.fullmatch(path)
  if m:
    return int(m.group(2)) + 1
  if re.fullmatch(STEM_REGEX, path):
    return 0
  return depth + 1


def _direction(config) -> optax.GradientTransformation:
  """The optimizer's update direction, before weight decay and learning rate."""
  dtype = jnp.dtype(config.optim_dtype)
  if config.optimizer == "sgd":
    if not config.momentum:
      return optax.identity()
    # Upstream fine-tuning: optax.sgd(momentum=0.9, accumulator_dtype='bfloat16').
    return optax.trace(decay=config.momentum, accumulator_dtype=dtype)
  if config.optimizer == "adamw":
    return optax.scale_by_adam(b1=config.b1, b2=config.b2, mu_dtype=dtype)
  if config.optimizer == "adafactor":
    # optax.adafactor with its defaults (factored second moments, update clipping at block RMS 1,
    # relative step size), spelled out without its LR and weight decay, which optax.adafactor
    # applies unscaled by the LR; here decay is decoupled and scaled by the LR as for the others.
    return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                       optax.scale_by_param_block_rms())
  raise ValueError(f"config.optimizer={config.optimizer!r}: expected one of {OPTIMIZERS}.")


def make_optimizer(config, params) -> Tuple[optax.GradientTransformation, Dict[str, Schedule]]:
  """The whole optimizer as one optax transformation, and the LR schedule of each group.

  Args:
    config: reads the keys of `configs.common.add_optim_keys` and `total_steps`.
    params: the model's param tree (arrays or `jax.eval_shape` output); only paths are used.

  Returns:
    tx: `optax.GradientTransformation` doing, per step: zero frozen grads; clip the global norm
      (of the trainable grads only); per group, the optimizer direction, decoupled weight decay
      `lr * wd * param` on the `wd_mask` leaves, and `-lr(step)`. The step count lives in the
      optimizer state, so it is traceable under jit and pmap and resumes with the checkpoint.
      Frozen groups get `optax.set_to_zero()` and hold no optimizer state.
    schedules: group name -> `step -> lr` (base_lr * lr_mult, for logging 'lr/<name>'); frozen
      groups are left out. With layer-wise decay a leaf's LR is its group's times
      `layerwise_lr_decay ** (depth + 1 - layer_id)`, so the logged value is the head's.
  """
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.optimizer={config.optimizer!r}: expected one of {OPTIMIZERS}.")
  if config.wd_mask not in ("default", "all"):
    raise ValueError(f"config.wd_mask={config.wd_mask!r}: expected 'default' or 'all'.")
  groups = parse_param_groups(config)
  assignment = assign_groups(groups, params)
  decay = config.layerwise_lr_decay
  depth = num_blocks(params) if decay is not None else None

  def label(path: str) -> str:
    g = assignment[path]
    if g.frozen or depth is None:
      return g.name
    return f"{g.name}/layer_{layer_id(path, depth)}"

  def wd_mask(tree):
    if config.wd_mask == "all":
      return _map_paths(lambda p: True, tree)
    return _map_paths(lambda p: re.fullmatch(NO_DECAY_REGEX, p) is None, tree)

  schedules = {}
  for g in groups:
    if not g.frozen:
      schedules[g.name] = create_learning_rate_schedule(
          config.total_steps, g.base_lr * g.lr_mult, g.decay_type, g.warmup_steps, g.linear_end)

  transforms = {}
  for path in param_paths(params):
    g, name = assignment[path], label(path)
    if name in transforms:
      continue
    if g.frozen:
      transforms[name] = optax.set_to_zero()
      continue
    lr = schedules[g.name]
    if depth is not None:
      factor = float(decay) ** (depth + 1 - layer_id(path, depth))
      lr = lambda step, lr=lr, factor=factor: lr(step) * factor
    parts = [_direction(config)]
    if g.weight_decay:
      # The mask is a function of paths because inside multi_transform the group sees a tree
      # whose other groups' leaves are masked out.
      parts.append(optax.add_decayed_weights(g.weight_decay, mask=wd_mask))
    parts.append(optax.scale_by_learning_rate(lr))
    transforms[name] = optax.chain(*parts)

  chain = []
  frozen = {p for p, g in assignment.items() if g.frozen}
  if config.grad_norm_clip:
    if frozen:
      # Frozen grads must not enter the global norm, or they would shrink the trainable updates.
      chain.append(optax.masked(optax.set_to_zero(), lambda t: _map_paths(frozen.__contains__, t)))
    chain.append(optax.clip_by_global_norm(config.grad_norm_clip))
  # Labels from paths, not a fixed tree: works for dict and FrozenDict params alike.
  chain.append(optax.multi_transform(transforms, lambda t: _map_paths(label, t)))
  return optax.chain(*chain), schedules
