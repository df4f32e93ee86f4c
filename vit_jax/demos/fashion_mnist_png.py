r"""Writes Fashion-MNIST images as PNG files in class folders, to try `vit_jax.predict` on files.

  python -m vit_jax.demos.fashion_mnist_png --out ~/fmnist_png [--split test] [--limit N]
  -> ~/fmnist_png/<label>/<index>.png   (label 0-9 in Fashion-MNIST's order; index in the split)

The pixels are the Debian `dataset-fashion-mnist` files' own (grayscale PNG, lossless), so a
model predicts on them exactly what it predicts on the idx records, and `vit_jax.predict` reports
its top-1 against the folders (they are named by class index).
"""
import argparse
import os
import sys

import numpy as np

from vit_jax.input_pipeline import sources


def write_pngs(out: str, split: str = "test", limit: int = 0,
               data_dir: str = sources.DEFAULT_IDX_DIRS["fashion_mnist"]) -> list:
  """Writes the first `limit` (0: all) images of `split` ('train' or 'test'); returns the paths."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, labels = sources.load_idx_split(data_dir, split)
  n = len(images) if not limit else min(limit, len(images))
  paths = []
  for i in range(n):
    folder = os.path.join(out, str(int(labels[i])))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.png")
    Image.fromarray(images[i][..., 0]).save(path)
    paths.append(path)
  return paths


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="Folder to write <label>/<index>.png into.")
  parser.add_argument("--split", default="test", choices=("train", "test"))
  parser.add_argument("--limit", type=int, default=0, help="Only the first N images (0: all).")
  parser.add_argument("--data-dir", default=None, help="The idx files' folder (default: "
                      "Debian's dataset-fashion-mnist).")
  args = parser.parse_args(argv)
  kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
  paths = write_pngs(os.path.expanduser(args.out), args.split, args.limit, **kwargs)
  print(f"Wrote {len(paths)} PNG files under {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
