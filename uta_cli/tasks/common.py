"""Pieces shared by tasks."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def decay_groups(model: nn.Module, weight_decay: float,
                 no_decay_names: Iterable[str] = ()) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings and tokens (as timm, MAE)."""
    skip = set(no_decay_names)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name in skip or leaf in skip or name.endswith(
                ("pos_embed", "cls_token", "positional_embedding", "class_embedding")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
