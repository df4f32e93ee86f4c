"""vit_jax: fine-tune public ViT / CLIP / OWL-ViT checkpoints in JAX/Flax."""
from setuptools import find_packages, setup

# ONNX export (vit_jax/export.py): the converter, jax2onnx==0.17.1, is installed with --no-deps
# (README, .ci/run): its metadata pins orbax-checkpoint<0.11.37, which only its own examples use.
# These are what it imports, plus onnxruntime to run and int8-quantize the exports.
EXPORT = ["onnx>=1.20.1", "onnx-ir>=1.0", "onnxruntime>=1.24.1"]

setup(
    name="vit_jax",
    version="0.1.0",
    description="JAX/Flax ViT, CLIP and OWL-ViT training in the style of big_vision.",
    packages=find_packages(include=["vit_jax", "vit_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "etils[epath]",  # local and gs:// paths for workdirs and checkpoint manifests (orbax uses it too)
        "tensorflow-cpu>=2.21",  # the input pipeline only; JAX does the accelerator work
        "tensorboard>=2.21",  # clu's SummaryWriter needs it; tensorflow-cpu 2.21 does not pull it
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tfds download_and_prepare imports it (tfds_download=True)
        "ml-collections>=1.1.0",
        "clu>=0.0.12",
        "numpy>=2.0",
        "safetensors>=0.8.0",  # checkpoint conversion without torch
        "scipy",  # upstream's position-embedding zoom
        "absl-py",
        "tokenizers>=0.23.3",  # CLIP BPE (input_pipeline/tokenizer.py)
        "ftfy>=6.3.1",  # CLIP text clean-up, as OpenAI; pure Python
        "pycocotools>=2.0.8",  # COCO mAP (evaluation/detection.py)
        "pillow",  # detection annotation checks and PNG visualisations
        "tqdm",  # predict's progress bar (images/s)
        "matplotlib>=3.8",  # the end-of-run PNG plots (plots.py), headless through Agg
        # sweep.py: TPE, pruners, RDB storage (SQLite; PostgreSQL with a driver), heartbeats
        # through RetryHeartbeatStaleTrialCallback (4.9+).
        "optuna>=4.9",
    ],
    extras_require={
        # Parity tests against the PyTorch references. torch is pinned: this version's CPU wheel is
        # what pip finds on the project's machines; an unpinned torch pulls a multi-GB CUDA build.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "torch==2.13.0",
            "transformers==5.23.0",
            "safetensors>=0.8.0",
            "pillow",
            "instant-clip-tokenizer==0.1.1",  # independent CLIP token ids
            "scikit-image",  # bundled photos: the OWL-ViT demo set's backgrounds
            "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",  # runs notebooks/fine_tune.ipynb
            *EXPORT,
        ],
        "torch": ["torch==2.13.0", "transformers==5.23.0"],
        "export": EXPORT,
        "demo": ["scikit-image"],  # the OWL-ViT demo set (vit_jax/demos/tuxpaint_detection.py)
    },
)
