"""The UTA student: a timm ViT that runs on kept (visible) tokens only, plus a head to CLIP space.

Masked tokens are dropped before the first block (no [MASK] token), which is where UTA's FLOP
saving over masked image modelling comes from (docs/method.md §1, §5). For the comparison with
masked image modelling the same student can also carry a learned [MASK] embedding and run on
every token (`mask=`).
"""

from __future__ import annotations

import torch
from timm.layers import apply_keep_indices_nlc, trunc_normal_
from timm.models import checkpoint
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from uta_cli.recipe import StudentConfig


def build_trunk(cfg: StudentConfig) -> nn.Module:
    """A timm trunk with no classifier; its final norm is the student's final norm."""
    common = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                  depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                  drop_path_rate=cfg.drop_path, num_classes=0, global_pool="token")
    if cfg.family == "eva":
        # EVA-02 style, as the released UTA models (uta-release-format): SwiGLU with sub-LN,
        # separate q/k/v projections with q and v bias, 2-D RoPE on patch tokens, abs pos embed.
        kwargs = dict(common, swiglu_mlp=True, scale_mlp=True, qkv_fused=False, qkv_bias=True,
                      use_rot_pos_emb=True, use_abs_pos_emb=True)
        kwargs.update(cfg.timm_kwargs)
        if kwargs.get("ref_feat_shape") is not None:
            kwargs["ref_feat_shape"] = tuple(kwargs["ref_feat_shape"])
        return Eva(**kwargs)
    kwargs = dict(common)
    kwargs.update(cfg.timm_kwargs)
    return VisionTransformer(**kwargs)


MASK_TOKEN = "mask_token"  # the state-dict key of the [MASK] embedding (MIM training only)
# The state-dict prefix of the heads for teacher blocks other than the last (align.teacher_layers;
# training only: zero-shot, fine-tuning and export use `head`, the last block's).
LAYER_HEADS = "layer_heads."


class UTAStudent(nn.Module):
    """timm trunk + final norm + linear head mapping every token to the teacher's embed_dim.

    mask_token=True adds masked image modelling's learned [MASK] embedding (BEiT, EVA-02), used
    only in training with `mask=`; UTA and feature distillation students have none.
    """

    def __init__(self, cfg: StudentConfig, embed_dim: int, mask_token: bool = False,
                 extra_heads: int = 0):
        super().__init__()
        self.cfg = cfg
        self.trunk = build_trunk(cfg)
        self.head = nn.Linear(cfg.width, embed_dim)
        self.embed_dim = embed_dim
        self.grid_size = tuple(self.trunk.patch_embed.grid_size)
        self.num_prefix_tokens = self.trunk.num_prefix_tokens
        self.is_eva = isinstance(self.trunk, Eva)
        self.mask_token = None
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
            trunc_normal_(self.mask_token, std=0.02)  # as BEiT and EVA-02
        # One linear head per extra teacher block (MaskAlign's per-layer heads on the student's
        # last-layer tokens), made after everything else so the other initial weights do not move.
        self.layer_heads = nn.ModuleList(nn.Linear(cfg.width, embed_dim)
                                         for _ in range(extra_heads)) if extra_heads else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations: the
        student then holds one block's activations plus each block's input (timm's flag)."""
        self.trunk.set_grad_checkpointing(enable)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_tokens(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """Trunk tokens after the final norm, (B, prefix + K, width).

        keep_idx: (B, K) positions of visible patches in the flattened grid, or None for all.
        The CLS token is always kept; RoPE is gathered at the kept positions.
        mask: (B, N) bool, True = masked: every token enters, the masked patch embeddings
        replaced by the [MASK] embedding before position embeddings are added (BEiT, EVA-02).
        """
        trunk = self.trunk
        x = trunk.patch_embed(images)
        if mask is not None:
            x = self.apply_mask_token(x, mask)
        rope = None
        if self.is_eva:
            x, rope = trunk._pos_embed(x)  # private in timm; equivalence is tested
        else:
            x = trunk._pos_embed(x)
            x = trunk.patch_drop(x)
        if keep_idx is not None:
            n_pre = self.num_prefix_tokens
            patches = x[:, n_pre:]
            index = keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
            x = torch.cat([x[:, :n_pre], patches.gather(1, index)], dim=1)
            if rope is not None:
                # (N, dim) -> (B, K, dim) -> (B, 1, K, dim): one table per sample, shared by heads
                rope = apply_keep_indices_nlc(x, rope, keep_idx).unsqueeze(1)
        x = trunk.norm_pre(x)
        recompute = trunk.grad_checkpointing and torch.is_grad_enabled()
        for blk in trunk.blocks:
            kwargs = {"rope": rope} if self.is_eva else {}
            # the per-sample RoPE table is an input of each checkpointed block, so the
            # recomputation sees the same kept positions
            x = checkpoint(blk, x, **kwargs) if recompute else blk(x, **kwargs)
        return trunk.norm(x)

    def apply_mask_token(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, width) patch embeddings with the masked ones replaced by [MASK]."""
        if self.mask_token is None:
            raise ValueError("This student has no [MASK] embedding; build it with "
                             "mask_token=True to run masked image modelling.")
        if mask.shape != patches.shape[:2]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; the student expects "
                             f"(batch, {patches.shape[1]}) booleans (True = masked).")
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, all_heads: bool = False) -> torch.Tensor:
        """Every token projected into the joint space, (B, prefix + K, embed_dim).

        all_heads: (L, B, prefix + K, embed_dim), the layer heads' outputs then `head`'s, in the
        order of the teacher blocks they align with (a keyword, so it passes through DDP)."""
        tokens = self.forward_tokens(images, keep_idx, mask)
        if not all_heads:
            return self.head(tokens)
        heads = [*(self.layer_heads or ()), self.head]
        return torch.stack([h(tokens) for h in heads])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS output on the full image: a CLIP image embedding (not normalised)."""
        # a copy, not a view of the token output (FSDP warns of in-place ops on views)
        return self.forward(images)[:, 0].clone()


def fit_training_parts(state: dict[str, torch.Tensor], student: UTAStudent
                       ) -> dict[str, torch.Tensor]:
    """`state` made to fit `student`, for the parts only training uses: a MIM checkpoint's [MASK]
    embedding and a multi-layer run's layer heads are dropped for a student without them
    (zero-shot, fine-tuning, export), and a student started from a checkpoint without them
    keeps its fresh ones."""
    state = dict(state)
    if student.mask_token is None:
        state.pop(MASK_TOKEN, None)
    elif MASK_TOKEN not in state:
        state[MASK_TOKEN] = student.mask_token.detach().clone()
    own = {k: v for k, v in student.state_dict().items() if k.startswith(LAYER_HEADS)}
    for key in [k for k in state if k.startswith(LAYER_HEADS) and k not in own]:
        del state[key]
    for key, value in own.items():
        state.setdefault(key, value.detach().clone())
    return state


