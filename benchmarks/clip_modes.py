"""Trainable parameters and optimizer-state bytes of each CLIP adaptation mode, from shapes only.

    python benchmarks/clip_modes.py --model b32

For each recipe of configs/clip.py (full, lit, locked_text, lora) it builds the real train state
(params, LoRA adapters, the optax state of optim.make_optimizer with its frozen groups) with
`jax.eval_shape`, so nothing is allocated, and prints what trains and what the optimizer holds.
"""
import argparse

import jax
import numpy as np

from vit_jax import optim
from vit_jax import train
from vit_jax.configs import clip as clip_config


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="b32")
  ap.add_argument("--lora-rank", type=int, default=8)
  args = ap.parse_args()
  print(f"CLIP {args.model}, AdamW (two fp32 moments per trained param)")
  print(f"{'mode':<13}{'params':>14}{'trainable':>14}{'optimizer state':>18}")
  for recipe in clip_config.RECIPES:
    config = clip_config.get_config(f"{args.model},captions,{recipe}")
    if recipe == "lora":
      config.lora.rank = args.lora_rank
    size = config.model.image_size
    batch = {"image": np.zeros((1, size, size, 3), np.float32)}
    task = train.get_task(config)
    state = jax.eval_shape(lambda rng: train.create_train_state(config, task, rng, batch)[0],
                           jax.random.PRNGKey(0))
    groups = optim.assign_groups(optim.parse_param_groups(config), state.params)
    sizes = dict(zip(optim.param_paths(state.params),
                     (int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))))
    total = sum(sizes.values())
    trainable = sum(n for path, n in sizes.items() if not groups[path].frozen)
    print(f"{recipe:<13}{total:>14,}{trainable:>14,}"
          f"{optim.tree_bytes(state.opt_state) / 2**20:>15,.1f} MiB", flush=True)


if __name__ == "__main__":
  main()
