"""The UTA student: a timm ViT that runs on kept (visible) tokens only, plus a head to CLIP space.

Masked tokens are dropped before the first block (no [MASK] token), which is where UTA's FLOP
saving over masked image modelling comes from (docs/method.md §1, §5).
"""

from __future__ import annotations

import torch
from timm.layers import apply_keep_indices_nlc
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


class UTAStudent(nn.Module):
    """timm trunk + final norm + linear head mapping every token to the teacher's embed_dim."""

    def __init__(self, cfg: StudentConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trunk = build_trunk(cfg)
        self.head = nn.Linear(cfg.width, embed_dim)
        self.embed_dim = embed_dim
        self.grid_size = tuple(self.trunk.patch_embed.grid_size)
        self.num_prefix_tokens = self.trunk.num_prefix_tokens
        self.is_eva = isinstance(self.trunk, Eva)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations: the
        student then holds one block's activations plus each block's input (timm's flag)."""
        self.trunk.set_grad_checkpointing(enable)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_tokens(self, images: torch.Tensor,
                       keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Trunk tokens after the final norm, (B, prefix + K, width).

        keep_idx: (B, K) positions of visible patches in the flattened grid, or None for all.
        The CLS token is always kept; RoPE is gathered at the kept positions.
        """
        trunk = self.trunk
        x = trunk.patch_embed(images)
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

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Every token projected into the joint space, (B, prefix + K, embed_dim)."""
        return self.head(self.forward_tokens(images, keep_idx))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS output on the full image: a CLIP image embedding (not normalised)."""
        return self.forward(images)[:, 0]


def student_from_checkpoint(ckpt_dir: str, fmt: str = "auto", teacher_weights: str = ""
                            ) -> tuple[UTAStudent, dict]:
    """Rebuild the student of a uta checkpoint folder (or run directory) with its weights.

    A released UTA file (uta_*.pt) is detected (fmt "auto") or forced (fmt "uta-release"); its
    meta then carries `bundled_text`, the release's own text tower (a ReleaseTextTower). A
    contrastive-tuning checkpoint likewise carries its tuned text tower (a CLIPTeacher) there, so
    zero-shot and export score the student with the text side it was tuned with;
    teacher_weights says where that checkpoint's teacher lives now, if it moved.
    """
    from uta_cli import checkpoint as ckpt
    from uta_cli.errors import UtaUsageError
    from uta_cli.models import release

    if release.resolve_format(ckpt_dir, fmt) == "uta-release":
        rel = release.load_release(ckpt_dir)
        return rel.student, dict(rel.meta, bundled_text=rel.text_tower)
    folder = ckpt.resolve_checkpoint(ckpt_dir)
    meta = ckpt.load_meta(folder)
    if meta.get("task") == "uta-contrastive":
        from uta_cli.tasks.contrastive import tuned_clip_from_checkpoint

        student, tuned, meta = tuned_clip_from_checkpoint(folder, teacher_weights)
        return student, dict(meta, bundled_text=tuned)
    if "student" not in meta or "embed_dim" not in meta:
        raise UtaUsageError(f"{folder} is a '{meta.get('task')}' checkpoint, not a UTA student.")
    cfg = StudentConfig(**meta["student"])
    model = UTAStudent(cfg, int(meta["embed_dim"]))
    model.load_state_dict(ckpt.load_weights(folder))
    meta["checkpoint_dir"] = folder
    return model.eval(), meta
