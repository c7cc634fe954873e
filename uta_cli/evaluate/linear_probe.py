"""Linear probe on frozen image embeddings, CLIP_benchmark's protocol.

Features: each model's L2-normalised image embedding (the zero-shot preprocessing) of the train
and test images. A linear layer is trained with AdamW and a cosine learning-rate schedule on
shuffled mini-batches; its L2 weight (AdamW's weight decay) is chosen on a validation part of
the train set: 7 values spaced evenly in log10 over [1e-6, 1e2], then around the best one on a
97-value grid with step spans 8, 4, 2, 1 (CLIP_benchmark's search; the CLIP paper's A.3 with
AdamW instead of L-BFGS). The final layer is trained on train + validation with the chosen weight
and scored on the test images: top-1, top-5, mean per-class recall.

Everything is a function of (features, labels, seed): the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.zeroshot import classification_metrics

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
_INITIAL = list(range(0, 97, 16))  # the 7 values of logspace(-6, 2, 7) on that grid


@dataclass
class ProbeConfig:
    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    val_proportion: float = 0.2  # of the train features, for the weight-decay search
    seed: int = 0


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                cfg: ProbeConfig) -> torch.nn.Linear:
    """AdamW, cosine schedule without warm-up, one step per mini-batch, seeded shuffles."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    probe = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(x) / cfg.batch_size)
    total, step = cfg.epochs * per_epoch, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for s in range(0, len(x), cfg.batch_size):
            for group in opt.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * cfg.lr
            idx = order[s:s + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(probe(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    return probe.eval()


def _top1(probe: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((probe(x).argmax(1) == y).float().mean())


def search_weight_decay(x_train, y_train, x_val, y_val, num_classes: int, cfg: ProbeConfig,
                        log=None) -> tuple[float, dict[float, float]]:
    """The validation search of the L2 weight; returns it and every (weight, val top-1) tried."""
    tried: dict[int, float] = {}

    def peak(indices: list[int]) -> int:
        best, best_acc = 0, 0.0  # as CLIP_benchmark: the first strictly better one wins
        for i in indices:
            if i not in tried:
                tried[i] = _top1(train_probe(x_train, y_train, num_classes, WEIGHT_DECAYS[i],
                                             cfg), x_val, y_val)
                if log is not None:
                    log(f"weight decay {WEIGHT_DECAYS[i]:.2e}: validation top-1 {tried[i]:.4f}")
            if best_acc < tried[i]:
                best, best_acc = i, tried[i]
        return best

    best = peak(_INITIAL)
    span = 8
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[best], {WEIGHT_DECAYS[i]: a for i, a in sorted(tried.items())}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, cfg: ProbeConfig | None = None,
                 log=None) -> dict:
    """lp_acc1, lp_acc5, lp_mean_per_class_recall on the test features, the chosen weight
    decay and the search. Features are L2-normalised here (as CLIP_benchmark's)."""
    cfg = cfg or ProbeConfig()
    if len(train_x) < 2 or len(test_x) < 1:
        raise UtaUsageError("The linear probe needs at least 2 train and 1 test image.")
    if not 0 < cfg.val_proportion < 1:
        raise UtaUsageError("The probe's validation proportion must be in (0, 1).")
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    train_y, test_y = train_y.long(), test_y.long()
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(round(len(train_x) * cfg.val_proportion)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    if len(fit_idx) == 0:
        raise UtaUsageError("Too few train images to hold out a validation part for the probe.")
    wd, tried = search_weight_decay(train_x[fit_idx], train_y[fit_idx], train_x[val_idx],
                                    train_y[val_idx], num_classes, cfg, log)
    probe = train_probe(train_x, train_y, num_classes, wd, cfg)
    with torch.no_grad():
        logits = probe(test_x)
    top = logits.topk(min(5, num_classes), dim=-1).indices.cpu()
    m = classification_metrics(test_y.cpu(), top, num_classes)
    return {"lp_acc1": m["acc1"], "lp_acc5": m["acc5"],
            "lp_mean_per_class_recall": m["mean_per_class_recall"],
            "num_samples": m["num_samples"], "num_train": len(train_x),
            "weight_decay": wd, "weight_decay_search": tried, "epochs": cfg.epochs,
            "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "val_proportion": cfg.val_proportion, "normalized": True}
