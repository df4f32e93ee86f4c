"""WiSE-FT (Wortsman et al. 2022): evaluate weight-space mixes of zero-shot and fine-tuned params.

  params = interpolate(zero_shot, finetuned, alpha=0.5)   # (1 - alpha) * zs + alpha * ft
  rows = sweep(config, zero_shot, finetuned, [0, 0.5, 1], reference={"eval_split": "train"})

CLI (the fine-tuned params: the latest checkpoint of a run's workdir; the zero-shot params:
--zeroshot, else the config's pretrained_path, else the run's step-0 init):

  python -m vit_jax.evaluation.wise_ft --config=vit_jax/configs/clip.py:b32,captions \
      --workdir=DIR [--zeroshot=PATH] --alphas=0,0.25,0.5,0.75,1 \
      [--reference=dataset=fashion_mnist,data_source=idx,data_dir=/d,eval_split=test,...]

The target set is the config's eval split; `--reference` (config overrides, `KEY=VALUE` joined
by commas, dotted keys for sections, values read as Python literals where they parse) names a
second eval set, e.g. another dataset for robustness under distribution shift.
"""
import ast
import copy
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp

from vit_jax.models import lora

PyTree = Any


def _paths(tree: PyTree) -> Tuple[List[str], List[Any], Any]:
  """('/'-joined leaf paths, leaves, treedef) of `tree`, in traversal order."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat]
  return paths, [leaf for _, leaf in flat], treedef


def _merged(params: PyTree, lora_alpha: Optional[float], which: str) -> PyTree:
  if lora.LORA_KEY not in params:
    return params
  if lora_alpha is None:
    raise ValueError(f"The {which} params hold a {lora.LORA_KEY!r} subtree: pass lora_alpha "
                     "(config.lora.alpha) so its adapters are merged before interpolating.")
  return lora.merge_lora(params, alpha=lora_alpha)


def interpolate(zero_shot_params: PyTree, finetuned_params: PyTree, alpha: float, *,
                lora_alpha: Optional[float] = None) -> PyTree:
  """`(1 - alpha) * zero_shot + alpha * finetuned`, leaf by leaf (WiSE-FT's weight-space mix).

  alpha 0 gives the zero-shot params, 1 the fine-tuned ones (both exactly); values outside
  [0, 1] extrapolate. A tree with a `lora` subtree (models/lora.py) is first merged with
  `lora.merge_lora(params, alpha=lora_alpha)` (lora_alpha = config.lora.alpha), so a LoRA run
  mixes with a plain pretrained tree. Each leaf is mixed in at least float32 and returned in the
  fine-tuned leaf's dtype, in the fine-tuned tree's structure.

  Raises ValueError naming the first path present in one tree only, or the first path whose
  shapes differ.
  """
  zs = _merged(zero_shot_params, lora_alpha, "zero-shot")
  ft = _merged(finetuned_params, lora_alpha, "fine-tuned")
  zs_paths, zs_leaves, _ = _paths(zs)
  ft_paths, ft_leaves, ft_def = _paths(ft)
  if zs_paths != ft_paths:
    only_zs = [p for p in zs_paths if p not in set(ft_paths)]
    only_ft = [p for p in ft_paths if p not in set(zs_paths)]
    where = (f"{only_zs[0]!r} is only in the zero-shot params" if only_zs else
             f"{only_ft[0]!r} is only in the fine-tuned params" if only_ft else
             "the same paths come in a different order")
    raise ValueError(f"WiSE-FT needs two params trees of the same structure: {where} "
                     f"({len(only_zs)} path(s) only in zero-shot, {len(only_ft)} only in "
                     "fine-tuned).")
  for path, a, b in zip(zs_paths, zs_leaves, ft_leaves):
    if tuple(a.shape) != tuple(b.shape):
      raise ValueError(f"WiSE-FT: {path!r} has shape {tuple(a.shape)} in the zero-shot params "
                       f"and {tuple(b.shape)} in the fine-tuned params.")

  def mix(a, b):
    # bf16 params are mixed in float32: (1 - alpha) and alpha would lose digits in bf16.
    dt = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return ((1 - alpha) * a.astype(dt) + alpha * b.astype(dt)).astype(b.dtype)

  return jax.tree_util.tree_unflatten(ft_def, [mix(a, b) for a, b in zip(zs_leaves, ft_leaves)])


def override_config(config, overrides: Dict[str, Any]):
  """A copy of `config` with dotted `KEY: value` overrides; an unknown key raises KeyError."""
  out = copy.deepcopy(config)
  for key in overrides:
    node, parts = out, key.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node.keys():
        raise KeyError(f"Config override {key!r}: the config has no key "
                       f"{'.'.join(parts[:i + 1])!r}.")
      node = node[part]
  out.update_from_flattened_dict(dict(overrides))
  return out


def parse_overrides(specs: Sequence[str]) -> Dict[str, Any]:
  """['eval_split=test,dataset=x', 'zeroshot.classnames=("a", "b")'] -> {key: value}.

  A comma starts a new override only where `KEY=` follows it, so tuple values keep theirs.
  Values are Python literals where they parse (1000, True, ("a", "b")), else strings.
  """
  out = {}
  for spec in specs:
    for item in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", spec):
      if not item.strip():
        continue
      if "=" not in item:
        raise ValueError(f"Override {item!r} in {spec!r}: expected KEY=VALUE.")
      key, value = (s.strip() for s in item.split("=", 1))
      try:
        out[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        out[key] = value
  return out


def _eval_set(config, backend):
  """(compiled evaluators, eval data) of `config`'s task on `config.eval_split`."""
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  evaluators = train.compile_evaluators(train.get_task(config).evaluators(), backend)
  data = input_pipeline.make_eval_data(config, split=config.eval_split,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  return evaluators, data


def sweep(config, zero_shot_params: PyTree, finetuned_params: PyTree, alphas: Sequence[float],
          reference: Optional[Dict[str, Any]] = None, *, print_table: bool = True) -> List[dict]:
  """Evaluates `interpolate(zero_shot, finetuned, alpha)` for each alpha.

  Args:
    config: the run's config: its task's evaluators (`train.get_task(config).evaluators()`) on
      `config.eval_split`, its back-end (`parallel.get_backend(config)`), `config.lora.alpha`.
    zero_shot_params, finetuned_params: one logical copy of each params tree (host arrays, or
      global arrays as `backend.get_state` gives), same structure and shapes (LoRA merged).
    alphas: mixing coefficients; 0 is the zero-shot model, 1 the fine-tuned one.
    reference: config overrides (`{"eval_split": "test", "dataset": ..., ...}`) that make a second
      eval set, evaluated with the same params; None: the target set only.
    print_table: print the table (`format_table`) when done (on process 0).
  Returns:
    One row per alpha: `{"alpha": a, "target": {metric: value}, "reference": {...}}` (the last
    only with `reference`), metrics named as `train.evaluate` names them.
  """
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  backend = parallel.get_backend(config)
  sets = {"target": _eval_set(config, backend)}
  if reference:
    sets["reference"] = _eval_set(override_config(config, reference), backend)
  rows = []
  for alpha in alphas:
    params = backend.put_state(interpolate(zero_shot_params, finetuned_params, float(alpha),
                                           lora_alpha=config.lora.alpha))
    row = {"alpha": float(alpha)}
    for name, (evaluators, data) in sets.items():
      row[name] = train.evaluate(evaluators, params, data, backend)
    logging.info("WiSE-FT alpha=%g: %s", alpha, row)  # progress: a sweep of a big model is long
    rows.append(row)
  if print_table and jax.process_index() == 0:
    print(format_table(rows), flush=True)
  return rows


def format_table(rows: Sequence[dict]) -> str:
  """alpha, then every metric of every eval set ("target zeroshot/top1", ...), one row per alpha."""
  sets = [k for k in rows[0] if k != "alpha"]
  cols = [(s, m) for s in sets for m in rows[0][s]]
  headers = ["alpha"] + [f"{s} {m}" for s, m in cols]
  # Counts (num_examples, ...) come back as floats from the evaluators' sums.
  fmt = lambda m, v: f"{int(v)}" if m.rsplit("/", 1)[-1].startswith("num_") else f"{float(v):.4f}"
  cells = [[f"{r['alpha']:g}"] + [fmt(m, r[s][m]) for s, m in cols] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
  line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))
  return "\n".join([line(headers)] + [line(c) for c in cells])


def load_params(config, workdir: str, zeroshot_path: Optional[str] = None
                ) -> Tuple[PyTree, PyTree, str, str]:
  """(zero-shot params, fine-tuned params, what the zero-shot params are, what the fine-tuned
  are) for the run of `config` in `workdir`.

  Fine-tuned: the latest checkpoint in `workdir`, restored into a state template from
  `train.create_train_state`. Zero-shot: `zeroshot_path` (any file `checkpoints_convert.load_model`
  reads, loaded as the task loads `config.pretrained_path`), else the config's `pretrained_path`,
  else the run's step-0 init (same seed and shapes as training's).
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir}: no such directory.")
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    step = ckpt.latest_step()
    if step is None:  # before the (slow) init: a wrong workdir fails at once
      raise FileNotFoundError(f"workdir {workdir}: no checkpoint in {ckpt.directory}.")
    # init_params reads only the image shape; the eval split has the training's.
    batch = next(iter(input_pipeline.make_eval_data(config, split=config.eval_split)))
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))  # as train_and_evaluate
    state, _, _ = train.create_train_state(config, train.get_task(config), init_rng, batch)
    finetuned = ckpt.restore(step, state).params
  finally:
    ckpt.close()
  ft_what = f"step {step} of {ckpt.directory}"
  if zeroshot_path:
    zs_task = train.get_task(override_config(config, {"pretrained_path": zeroshot_path}))
    return zs_task.init_params(init_rng, batch), finetuned, zeroshot_path, ft_what
  if config.get("pretrained_path"):
    return state.params, finetuned, f"config.pretrained_path {config.pretrained_path}", ft_what
  return (state.params, finetuned, f"the run's step-0 init (seed {config.seed}; no --zeroshot "
          "and no config.pretrained_path)", ft_what)


def _define_flags():
  # Defined when run as a script only: vit_jax.main defines --config and --workdir too, and both
  # modules may be imported in one process (tests).
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The run's config: path/to/config.py[:ARG], as "
                                  "given to vit_jax.main.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The fine-tuning run's workdir: its latest checkpoint is "
                      "the fine-tuned model.")
  flags.DEFINE_string("zeroshot", None, "Zero-shot params: a pretrained file or HF directory "
                      "(default: config.pretrained_path, else the run's step-0 init).")
  flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1"], "Mixing coefficients: 0 is the "
                    "zero-shot model, 1 the fine-tuned one.")
  flags.DEFINE_multi_string("reference", None, "Config overrides for a second eval set: "
                            "KEY=VALUE[,KEY=VALUE...], e.g. eval_split=test,dataset=...")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  train._quiet_library_logs()  # pylint: disable=protected-access
  train._hide_accelerators_from_tf()  # pylint: disable=protected-access
  alphas = [float(a) for a in f.alphas]
  reference = parse_overrides(f.reference or [])
  override_config(f.config, reference)  # a misspelt key fails now, not after loading the params
  zs, ft, zs_what, ft_what = load_params(f.config, f.workdir, f.zeroshot)
  print(f"fine-tuned params: {ft_what}\nzero-shot params: {zs_what}", flush=True)
  if reference:
    print(f"reference set: {reference}", flush=True)
  sweep(f.config, zs, ft, alphas, reference)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import app as absl_app  # pylint: disable=g-import-not-at-top
  _define_flags()
  absl_app.run(main)
