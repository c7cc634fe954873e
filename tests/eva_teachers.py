"""EVA-CLIP teachers at random init, small enough for a 2-core CPU.

The real configs are open_clip's EVA02-* (a CustomTextCLIP whose image tower is a timm `Eva`
trunk). EVA02-B-16 builds in seconds and is used as is; EVA02-L-14 and EVA02-E-14-plus are
shrunk here: the same timm entry point (patch size, RoPE / post-norm, SwiGLU, head structure,
224 px, ref_feat_shape) with 2 blocks and a narrower width at the real head dimension, registered
with timm under `<name>_shrunk` and written as an open_clip `local-dir:` folder whose config is
the real one with that trunk name and a 1-layer text tower. Registration lives in this process
only, so these teachers are used in-process.
"""

from __future__ import annotations

import copy
import json
import os

import open_clip
import timm
import torch
from safetensors.torch import save_file
from timm.models import register_model

# real trunk name -> what changes (head dim kept: 64 for B and L, 112 for E)
SHRINK = {
    "eva02_base_patch16_clip_224": dict(depth=2, embed_dim=192, num_heads=3),
    "eva02_large_patch14_clip_224": dict(depth=2, embed_dim=256, num_heads=4),
    "eva02_enormous_patch14_clip_224": dict(depth=2, embed_dim=448, num_heads=4),
    # SigLIP's trunk (attention-pool head), for the refusal test only
    "vit_base_patch16_siglip_224": dict(depth=1, embed_dim=64, num_heads=1),
}


def _register(real: str, overrides: dict) -> str:
    def entry(pretrained: bool = False, **kwargs):
        return timm.create_model(real, pretrained=False, **{**overrides, **kwargs})

    entry.__name__ = f"{real}_shrunk"
    entry.__module__ = __name__
    register_model(entry)
    return entry.__name__


SHRUNK_NAMES = {real: _register(real, o) for real, o in SHRINK.items()}


def shrunk_config(model: str) -> dict:
    """open_clip's config of `model` with the shrunk trunk and a one-layer text tower."""
    cfg = copy.deepcopy(open_clip.get_model_config(model))
    vision = cfg["vision_cfg"]
    vision["timm_model_name"] = SHRUNK_NAMES[vision["timm_model_name"]]
    cfg["text_cfg"].update(width=64, heads=1, layers=1)
    return cfg


def write_open_clip_folder(path, model_cfg: dict, seed: int = 0) -> str:
    """A random-weight open_clip model saved as a `local-dir:` folder."""
    torch.manual_seed(seed)
    clip = _build(model_cfg)
    os.makedirs(path, exist_ok=True)
    size = model_cfg["vision_cfg"].get("image_size", 224)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg,
                   "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                                      "std": list(open_clip.OPENAI_DATASET_STD),
                                      "interpolation": "bicubic"}}, f)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              os.path.join(path, "open_clip_model.safetensors"))
    return str(path)


def _build(model_cfg: dict) -> torch.nn.Module:
    cfg = copy.deepcopy(model_cfg)
    if cfg.pop("custom_text", False):
        return open_clip.CustomTextCLIP(**cfg)
    return open_clip.CLIP(**cfg)


def shrunk_teacher_folder(path, model: str, seed: int = 0) -> str:
    return write_open_clip_folder(path, shrunk_config(model), seed)
