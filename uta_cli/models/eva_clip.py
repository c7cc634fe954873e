"""Teacher weight files: open_clip's layout, and BAAI's native EVA-CLIP layout converted to it.

BAAI publishes EVA-CLIP as flat `torch.save` mappings (EVA02_CLIP_L_psz14_s4B.pt style):
`visual.*` in the EVA-CLIP code's names (`attn.q_bias`, `attn.inner_attn_ln`, `mlp.w1/w2/w3`,
`mlp.ffn_ln`, RoPE tables), `text.*` (an open_clip TextTransformer) and `logit_scale`. open_clip's
EVA02-* models hold the image side as a timm `Eva` trunk (`visual.trunk.*`); timm's own EVA
checkpoint filter (`timm.models.eva.checkpoint_filter_fn`) does that renaming, and is used here
as is. The text side and logit_scale need no renaming.

A released UTA file has the same `visual.*` / `text.*` / `logit_scale` outline; `file_layout`
tells them apart by architecture: EVA-CLIP's vision blocks have an inner attention LayerNorm
(B/L) or a plain fc1/fc2 MLP (E), which UTA's released students do not.
"""

from __future__ import annotations

import torch
from timm.models.eva import checkpoint_filter_fn
from torch import nn

from uta_cli.errors import UtaUsageError

EVA_CLIP_MARKS = ("visual.blocks.0.attn.inner_attn_ln.weight", "visual.blocks.0.mlp.fc1.weight")
UTA_RELEASE_MARK = "visual.blocks.0.mlp.w1.weight"  # SwiGLU with no inner attention LN


def file_layout(state: dict) -> str:
    """'open_clip', 'eva-clip' (BAAI native), 'uta-release' or 'unknown', from the key names."""
    if any(k.startswith("visual.trunk.") or k.startswith("visual.transformer.") for k in state):
        return "open_clip"
    native = "visual.pos_embed" in state and "visual.blocks.0.norm1.weight" in state and \
        "logit_scale" in state and any(k.startswith("text.") for k in state)
    if not native:
        return "unknown"
    if any(k in state for k in EVA_CLIP_MARKS):
        return "eva-clip"
    return "uta-release" if UTA_RELEASE_MARK in state else "unknown"


def eva_clip_to_open_clip(state: dict[str, torch.Tensor], clip: nn.Module
                          ) -> dict[str, torch.Tensor]:
    """A native EVA-CLIP mapping renamed onto an open_clip EVA02-* model (timm-trunk tower)."""
    trunk = getattr(clip.visual, "trunk", None)
    if trunk is None:
        raise UtaUsageError("A native EVA-CLIP file needs an EVA02-* / EVA01-* teacher.model "
                            "(open_clip's timm-tower EVA configs); this teacher has a "
                            f"{type(clip.visual).__name__} image tower.")
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    out = {"visual.trunk." + k: v for k, v in checkpoint_filter_fn(visual, trunk).items()}
    persistent = set(clip.state_dict())
    for k, v in state.items():
        if k.startswith("visual."):
            continue
        if k.startswith("text.") and k not in persistent and k.endswith("attn_mask"):
            continue  # a buffer open_clip rebuilds (not persistent there)
        out[k] = v
    return out


def _listing(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), with missing, unexpected and wrong-shape keys by name."""
    want = model.state_dict()
    missing = set(want) - set(state)
    unexpected = set(state) - set(want)
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(want[k].shape)})" for k in want
             if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{name}: {_listing(keys)}" for name, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("wrong shapes", wrong)) if keys]
        raise UtaUsageError(f"{what} (strict load refused): {'; '.join(parts)}.")
    model.load_state_dict(state, strict=True)
