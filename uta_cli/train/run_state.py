"""The state one `Engine.fit` carries from step to step: the logging window, the run's
counters, and the digests and means its records report."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.distributed.tensor import DTensor

from uta_cli.progress import StepProgress
from uta_cli.train.data_wait import DataWaitWatch


@dataclass
class Window:
    """What one logging window accumulates; a fresh one starts after each log line."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # micro-steps that reported each metric
    samples: int = 0
    data_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.counts[key] = self.counts.get(key, 0) + 1


@dataclass
class Run:
    """The state of one `fit`, shared by its named steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total: int
    warmup: int
    source: str | None                 # the checkpoint resumed from, or None
    step: int
    progress: StepProgress
    after_step: Callable | None        # the task's after_optimizer_step, if it has one
    begin_step: Callable | None = None  # the task's begin_step, if it has one
    epoch: int = 0
    last_saved: int = -1               # the newest checkpoint written or resumed from
    skipped: int = 0                   # unreadable images so far
    sample_digest: int = 0             # of every sample id trained on (the end record)
    nonfinite: torch.Tensor | None = None
    window: Window = field(default_factory=Window)
    data_wait: DataWaitWatch | None = None  # data_wait_frac per window, and its warning


def digest_u64(values: torch.Tensor) -> int:
    """Order-independent digest of sample ids (sum of per-id hashes mod 2**63)."""
    ids = values.to(torch.int64).cpu()
    mixed = (ids * 0x9E3779B97F4A7C15) ^ (ids >> 17)
    return int(mixed.sum().item()) & ((1 << 63) - 1)


def weights_digest(model: nn.Module) -> str:
    """A digest of the whole weights (a sharded model's are gathered one tensor at a time, so
    every process must call it)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, DTensor):
            t = t.full_tensor()
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reduce_means(acc: Accelerator, sums: dict[str, torch.Tensor], counts: dict[str, int]
             ) -> dict[str, float]:
    """Means over all processes' micro-steps. Every process reduces the same keys (the union
    of what any process logged), so one whose window held only unreadable images (and so
    reported only `loss`) cannot leave the others in mismatched all-reduces."""
    keys = sorted(sums)
    if acc.num_processes > 1:
        keys = sorted(set().union(*gather_object([keys])))
    if not keys:
        return {}
    zero = torch.zeros((), device=acc.device)
    vec = torch.stack([sums.get(k, zero).float().reshape(()) for k in keys] +
                      [torch.tensor(float(counts.get(k, 0)), device=acc.device)
                       for k in keys])
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="sum")
    vec = vec.double().cpu()
    n = len(keys)
    return {k: float(vec[i] / vec[n + i]) for i, k in enumerate(keys) if vec[n + i] > 0}
