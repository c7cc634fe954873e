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
from timm.models.vitamin import VitCfg, VitConvCfg

# real trunk name -> what changes (head dim kept: 64 for B and L, 112 for E)
SHRINK = {
    "eva02_base_patch16_clip_224": dict(depth=2, embed_dim=192, num_heads=3),
    "eva02_large_patch14_clip_224": dict(depth=2, embed_dim=256, num_heads=4),
    "eva02_enormous_patch14_clip_224": dict(depth=2, embed_dim=448, num_heads=4),
    # the trunks of refused families (test_teacher_families), at their real structure
    "vit_base_patch16_siglip_224": dict(depth=1, embed_dim=64, num_heads=1),
    "vit_pe_core_base_patch16_224": dict(depth=1, embed_dim=64, num_heads=1),
    "vit_medium_patch16_gap_256": dict(depth=1, embed_dim=64, num_heads=1),
    "fastvit_mci1": dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64)),
    "swin_base_patch4_window7_224": dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
    "vitamin_small_224": dict(embed_dim=64, depth=1, num_heads=1, embed_cfg=VitCfg(
        embed_dim=(16, 32, 64), depths=(1, 1, 1), stem_width=16,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")),
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


def register_shrunk_model(model: str, folder) -> str:
    """Register the shrunk config with open_clip as `<model>-shrunk`, so that it is usable by
    name (teacher.model) with a weights file, as the real EVA02-* models are."""
    name = f"{model}-shrunk"
    path = os.path.join(folder, f"{name}.json")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(shrunk_config(model), f)
    open_clip.add_model_config(path)
    return name


def to_eva_clip_native(clip: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip EVA02-* state dict in BAAI's native EVA-CLIP layout (EVA02_CLIP_*_s*B.pt):
    the image trunk's names as the EVA-CLIP code has them, RoPE tables stored in the tower and in
    every block (one shared module there), text tower and logit_scale unchanged."""
    out = {}
    trunk_state = clip.visual.trunk.state_dict()
    swiglu = any(".mlp.fc1_g." in k for k in trunk_state)
    for k, v in trunk_state.items():
        k = k.replace(".attn.q_proj.bias", ".attn.q_bias").replace(".attn.v_proj.bias",
                                                                    ".attn.v_bias")
        k = k.replace(".attn.norm.", ".attn.inner_attn_ln.")
        if swiglu:
            for new, old in ((".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."),
                             (".mlp.norm.", ".mlp.ffn_ln."), (".mlp.fc2.", ".mlp.w3.")):
                k = k.replace(new, old)
        out["visual." + k] = v.clone()
    trunk = clip.visual.trunk
    if getattr(trunk, "rope", None) is not None:
        grid = trunk.patch_embed.grid_size
        head_dim = trunk.embed_dim // trunk.blocks[0].attn.num_heads
        cos, sin = torch.rand(2, grid[0] * grid[1], head_dim)  # dropped on load (timm
        # recomputes RoPE), so their values do not matter
        for prefix in ["visual."] + [f"visual.blocks.{i}.attn." for i in range(len(trunk.blocks))]:
            out[prefix + "rope.freqs_cos"], out[prefix + "rope.freqs_sin"] = cos, sin
    for k, v in clip.state_dict().items():
        if not k.startswith("visual."):
            out[k] = v.clone()
    return out
