"""The teacher's last-layer CLS-to-patch attention, for teacher-attention masks (UMT, MILAN,
MaskAlign; docs/method.md §9): only the CLS row of q k^T, recomputed from the last block's
attention input, so the tower keeps its fused attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from uta_cli.errors import UtaUsageError


def attention_problem(attn: nn.Module, kind: str) -> str:
    """Why the CLS row of this attention layer cannot be read ('' if it can). kind: "native"
    (an open_clip ViT) or "timm" (a timm trunk, as EVA-CLIP's)."""
    if kind == "native":
        return "" if isinstance(attn, nn.MultiheadAttention) else \
            f"its last block attends with {type(attn).__name__}, not nn.MultiheadAttention"
    needed = ("num_heads", "q_norm", "k_norm", "scale")
    has_proj = getattr(attn, "qkv", None) is not None or hasattr(attn, "q_proj")
    if has_proj and all(hasattr(attn, a) for a in needed):
        return ""
    return f"its last block's attention {type(attn).__name__} is not timm's Attention layout"


def cls_patch_attention(attn: nn.Module, captured: dict, kind: str) -> torch.Tensor:
    """(B, N) attention of the CLS query over the patch keys, heads averaged, recomputed from the
    last block's attention input (captured by a pre-hook): only the CLS row of q k^T, so the
    tower's fused attention stays on. Covers nn.MultiheadAttention (open_clip ViTs) and timm's
    Attention / EvaAttention (EVA-CLIP and other timm towers, RoPE and q/k norms included)."""
    args, kwargs = captured["args"], captured["kwargs"]
    if kind == "native":
        if not isinstance(attn, nn.MultiheadAttention):
            raise UtaUsageError(
                f"mask.strategy attention reads the CLS row of the teacher's last attention, "
                f"which this tower computes with {type(attn).__name__} (not "
                f"nn.MultiheadAttention). Use another mask.strategy with this teacher.")
        x = args[0] if args else kwargs["query"]
        if not attn.batch_first:
            x = x.transpose(0, 1)
        d, heads = attn.embed_dim, attn.num_heads
        if attn._qkv_same_embed_dim:
            wq, wk = attn.in_proj_weight[:d], attn.in_proj_weight[d:2 * d]
        else:
            wq, wk = attn.q_proj_weight, attn.k_proj_weight
        bias = attn.in_proj_bias
        bq, bk = (bias[:d], bias[d:2 * d]) if bias is not None else (None, None)
        q = F.linear(x[:, :1], wq, bq).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = F.linear(x, wk, bk).unflatten(-1, (heads, -1)).transpose(1, 2)
        scale, prefix = q.shape[-1] ** -0.5, 1
    else:
        x = args[0] if args else kwargs["x"]
        rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
        heads = attn.num_heads
        if getattr(attn, "qkv", None) is not None:
            w = attn.qkv.weight
            inner = w.shape[0] // 3
            if getattr(attn, "q_bias", None) is not None:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            else:
                bias = attn.qkv.bias
            bq = bias[:inner] if bias is not None else None
            bk = bias[inner:2 * inner] if bias is not None else None
            q = F.linear(x[:, :1], w[:inner], bq)
            k = F.linear(x, w[inner:2 * inner], bk)
        else:
            q, k = attn.q_proj(x[:, :1]), attn.k_proj(x)
        q = attn.q_norm(q.unflatten(-1, (heads, -1)).transpose(1, 2))
        k = attn.k_norm(k.unflatten(-1, (heads, -1)).transpose(1, 2))
        prefix = getattr(attn, "num_prefix_tokens", 1)
        if rope is not None:  # the CLS query is a prefix token: RoPE turns the patch keys only
            half = getattr(attn, "rotate_half", False)
            k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope,
                                                                  half=half)], dim=2)
        scale = attn.scale
    row = ((q.float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, T)
    return row.mean(dim=1)[:, 0, prefix:]
