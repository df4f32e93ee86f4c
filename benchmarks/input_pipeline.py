"""Input-pipeline throughput: our tf.data pipeline vs torchvision + DataLoader, same JPEGs, one run.

Chain: decode -> inception_crop(224) (RandomResizedCrop) -> flip -> randaug(2, 15) -> value range
-> mixup(0.2), on the photos that ship with scikit-image (re-encoded as JPEG, repeated), and the same
chain without RandAugment. torchvision runs in its own Python (it cannot import beside this venv's
torch), in a subprocess:

  python benchmarks/input_pipeline.py --torch-python /work/tv-venv/bin/python

(/work/tv-venv: `python3 -m venv /work/tv-venv && /work/tv-venv/bin/pip install torch==2.14.1
torchvision==0.29.1 pillow`.) Needs `pip install scikit-image` here (for its photos only).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

CHAINS = {  # name -> randaug (num_layers, magnitude) or None
    "decode>inception_crop(224)>flip>randaug(2,15)>mixup": (2, 15),
    "decode>inception_crop(224)>flip>mixup (no randaug)": None,
}
NUM_CLASSES = 10
MIXUP_ALPHA = 0.2


def write_jpegs(root: str, count: int) -> list[tuple[str, int]]:
  """`count` JPEGs (scikit-image's photos, re-encoded at quality 90, cycled) in root/CLASS/."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("skimage")
  if spec is None:
    sys.exit("needs scikit-image's photos: pip install scikit-image")
  data = os.path.join(os.path.dirname(spec.origin), "data")
  photos = sorted(f for f in os.listdir(data) if f.endswith((".png", ".jpg")))
  encoded = []
  for name in photos:
    image = Image.open(os.path.join(data, name)).convert("RGB")
    path = os.path.join(root, "_src.jpg")
    image.save(path, "JPEG", quality=90)
    with open(path, "rb") as f:
      encoded.append(f.read())
  os.remove(path)
  files = []
  for i in range(count):
    label = i % NUM_CLASSES
    path = os.path.join(root, f"class{label}", f"{i:05d}.jpg")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(encoded[i % len(encoded)])
    files.append((path, label))
  return files


def bench_tf(root: str, randaug, batch: int, batches: int, threads: int) -> float:
  """images/s of our pipeline (vit_jax.input_pipeline) over `batches` batches after warm-up."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  config.data_source, config.data_dir, config.num_classes = "folder", root, NUM_CLASSES
  config.batch, config.input_threads, config.shuffle_buffer = batch, threads, 1000
  config.mixup_alpha = MIXUP_ALPHA
  ra = f"randaug({randaug[0]},{randaug[1]})|" if randaug else ""
  config.pp.train = (f"decode|inception_crop(224)|flip_lr|{ra}value_range(-1,1)|"
                     f"onehot({NUM_CLASSES})")
  it = input_pipeline.make_train_iterator(config)
  return _time(it, batch, batches)


def _time(it, batch, batches) -> float:
  for _ in range(3):  # warm-up: tracing, thread start, autotuning
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - start)


def bench_torch(files, randaug, batch: int, batches: int, workers: int) -> float:
  """images/s of torchvision transforms + DataLoader(workers) + v2.MixUp (run in the torch venv)."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import v2  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  steps = [v2.RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3), antialias=False),
           v2.RandomHorizontalFlip()]
  if randaug:
    steps.append(v2.RandAugment(num_ops=randaug[0], magnitude=randaug[1]))
  steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3)]
  transform = v2.Compose(steps)

  class Files(torch.utils.data.Dataset):
    def __len__(self):
      return len(files)

    def __getitem__(self, i):
      path, label = files[i]
      return transform(Image.open(path).convert("RGB")), label

  loader = torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0)
  mixup = v2.MixUp(alpha=MIXUP_ALPHA, num_classes=NUM_CLASSES)

  def batches_forever():
    while True:
      for images, labels in loader:
        yield mixup(images, labels)
  return _time(batches_forever(), batch, batches)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch-python", help="Python with torch + torchvision; omit to skip")
  parser.add_argument("--num-images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
  parser.add_argument("--threads", type=int, default=2, help="tf.data private threadpool size")
  parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
  parser.add_argument("--torch-worker", help=argparse.SUPPRESS)  # internal: JSON job for torch
  args = parser.parse_args()

  if args.torch_worker:  # in the torch venv: no TF here (importing TF before torch can crash)
    job = json.loads(args.torch_worker)
    print(json.dumps({"images_per_s": bench_torch(job["files"], job["randaug"], job["batch"],
                                                   job["batches"], job["workers"])}))
    return

  with tempfile.TemporaryDirectory() as root:
    files = write_jpegs(root, args.num_images)
    print(f"{len(files)} JPEGs in {root}; batch {args.batch}, {args.batches} timed batches; "
          f"tf.data threads {args.threads}, DataLoader workers {args.workers}; {os.cpu_count()} "
          "CPUs", flush=True)
    rows = []
    for name, randaug in CHAINS.items():
      ours = bench_tf(root, randaug, args.batch, args.batches, args.threads)
      theirs = None
      if args.torch_python:
        job = json.dumps(dict(files=files, randaug=randaug, batch=args.batch,
                              batches=args.batches, workers=args.workers))
        out = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch-worker", job],
                             check=True, capture_output=True, text=True)
        theirs = json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]
      rows.append((name, ours, theirs))
      print(f"{name}: tf.data {ours:.0f} img/s"
            + (f", torchvision {theirs:.0f} img/s, ratio {ours / theirs:.2f}x" if theirs else ""),
            flush=True)
    print("\n| chain | tf.data (ours) img/s | torchvision + DataLoader img/s | ratio |")
    print("| --- | --- | --- | --- |")
    for name, ours, theirs in rows:
      t = f"{theirs:.0f} | {ours / theirs:.2f}x" if theirs else "- | -"
      print(f"| {name} | {ours:.0f} | {t} |")


if __name__ == "__main__":
  main()
