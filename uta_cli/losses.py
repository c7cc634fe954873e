"""Token-wise cosine alignment with the teacher (docs/method.md §1, §3): UTA's objective, and
masked image modelling's (EVA-02: the masked tokens regress the teacher's) for comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_targets(teacher_tokens: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Pick the teacher's CLS and the tokens at the student's visible positions.

    teacher_tokens: (B, 1 + N, E); keep_idx: (B, K) -> (B, 1 + K, E).
    """
    patches = teacher_tokens[:, 1:]
    index = keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([teacher_tokens[:, :1], patches.gather(1, index)], dim=1)


def token_alignment_loss(student: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """1 - cosine per token, averaged over CLS and the visible tokens, in fp32.

    Returns the loss plus detached mean cosines for CLS and for patch tokens, which tell apart
    "the global embedding is learned" from "the dense tokens are learned".
    """
    cos = F.cosine_similarity(student.float(), target.float(), dim=-1, eps=1e-6)  # (B, 1 + K)
    loss = (1.0 - cos).mean()
    return {"loss": loss, "cls_cos": cos[:, 0].mean().detach(),
            "patch_cos": cos[:, 1:].mean().detach()}


def masked_token_loss(student: torch.Tensor, target: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked image modelling's loss as EVA-02: 1 - cosine on the masked patch tokens only, fp32.

    student, target: (B, 1 + N, E), CLS first; mask: (B, N) bool, True = masked. The mean runs
    over every masked token of the batch. cls_cos and patch_cos (over the masked tokens) are
    reported for comparison with UTA; the CLS token is not trained.
    """
    cos = F.cosine_similarity(student.float(), target.float(), dim=-1, eps=1e-6)  # (B, 1 + N)
    weight = mask.to(cos.dtype)
    n_masked = weight.sum().clamp(min=1.0)
    patch_cos = (cos[:, 1:] * weight).sum() / n_masked
    return {"loss": 1.0 - patch_cos, "cls_cos": cos[:, 0].mean().detach(),
            "patch_cos": patch_cos.detach()}


TARGET_NORMS = ("none", "layernorm")


def normalize_targets(tokens: torch.Tensor, how: str) -> torch.Tensor:
    """align.target_norm applied to teacher tokens (..., E), CLS and patches alike.

    "layernorm": LayerNorm over each token's channels without parameters (MaskAlign's `whiten`
    targets), eps 1e-6, in fp32. Under the cosine loss its scale drops out, so what it changes
    is the per-token mean: every target is centred across its channels.
    """
    if how == "none":
        return tokens
    if how == "layernorm":
        return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=1e-6)
    raise ValueError(f"unknown target norm {how!r}; expected one of {', '.join(TARGET_NORMS)}")


def mean_over_layers(per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several teacher blocks' losses -> their mean; the cosines reported are the last block's
    (the head zero-shot uses), so they stay comparable with a single-block run."""
    out = dict(per_layer[-1])
    out["loss"] = torch.stack([d["loss"] for d in per_layer]).mean()
    return out
