"""Public checkpoints <-> this codebase's Flax params (ViT, CLIP and OWL-ViT).

Reads upstream vision_transformer / AugReg / big_vision `.npz`, HF transformers ViT and timm
`vit_*`, HF transformers `CLIPModel` (safetensors or weights-only torch pickles), OpenAI CLIP
`.pt` (TorchScript archives, read without running them) and open_clip state dicts, HF
`OwlViTForObjectDetection`/`Owlv2ForObjectDetection` and scenic OWL-ViT msgpack checkpoints;
writes upstream `.npz` and HF directories. Importing this package (and reading
`.npz`/`.safetensors` and TorchScript archives) needs no torch.

  params = load(path, model_config, image_size=384)        # ViT, any format, auto-detected
  model, params = load_model(path, image_size=..., context_length=...)   # ViT or CLIP
  model, params = load_model("ViT-B-32.pt")    # OpenAI; open_clip LAION: hidden_act="gelu"
  params = load_for_finetune(config, params)               # the training loop's init hook
  export_npz(params, "out.npz", model_config); export_hf(params, model_config, "out_dir")
  export_hf_clip(params, clip_config, "out_dir")           # HF CLIPModel directory
  model, params = load_model("owlvit-base-patch32/")       # OWL-ViT (HF or scenic msgpack)
  params = load_backbone("clip-dir/", owl_config, 768, params)   # CLIP towers, fresh heads
  export_hf_owl_vit(params, owl_config, "out_dir")         # HF OwlViT/Owlv2 detector directory
"""
from vit_jax.checkpoints_convert.clip import export_hf_clip
from vit_jax.checkpoints_convert.clip import hf_clip_state_dict
from vit_jax.checkpoints_convert.clip import translate_hf_clip
from vit_jax.checkpoints_convert.common import Checkpoint
from vit_jax.checkpoints_convert.common import CheckpointError
from vit_jax.checkpoints_convert.common import CheckpointMismatchError
from vit_jax.checkpoints_convert.common import UnsafeCheckpointError
from vit_jax.checkpoints_convert.common import UnsupportedCheckpointError
from vit_jax.checkpoints_convert.core import fit
from vit_jax.checkpoints_convert.core import load
from vit_jax.checkpoints_convert.core import load_for_finetune
from vit_jax.checkpoints_convert.core import load_model
from vit_jax.checkpoints_convert.core import pretrained_path
from vit_jax.checkpoints_convert.core import read
from vit_jax.checkpoints_convert.npz import export_npz
from vit_jax.checkpoints_convert.owl_vit import export_hf_owl_vit
from vit_jax.checkpoints_convert.owl_vit import load_backbone
from vit_jax.checkpoints_convert.posemb import resample_posemb
from vit_jax.checkpoints_convert.torch import export_hf
