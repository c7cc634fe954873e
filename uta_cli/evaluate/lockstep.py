"""Evaluation passes of a sharded model (`train.sharding: fsdp`) on every process at once.

Each forward of an FSDP model is a collective (every process gathers the weights of each block
together), so a process whose share of an evaluation holds fewer batches than another's would
leave the others waiting forever. After its pass each process runs stand-in forwards on a dummy
image (results dropped) until it has run as many as the busiest process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """An FSDP2 module: its forwards are collectives."""
    return isinstance(model, FSDPModule)


def even_out_forwards(calls: int, stand_in: Callable[[], object], device: torch.device) -> int:
    """After an evaluation pass that ran `calls` forwards here: run `stand_in` (one forward of
    the sharded model on a dummy input, result dropped) until this process has run as many as
    the busiest one. Returns the number added."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    most = torch.tensor([calls], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    extra = int(most.item()) - calls
    for _ in range(extra):
        stand_in()
    return extra


class CountingCall:
    """A callable that counts how often the model it wraps was called (see even_out_forwards)."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def stand_in_forward(model: nn.Module, image_size: int, device: torch.device,
                     method: str = "") -> Callable[[], None]:
    """One no-grad forward of `model` on a black image (method: a registered forward method,
    e.g. encode_image; "" = the module call)."""
    def run() -> None:
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        with torch.no_grad():
            (getattr(model, method) if method else model)(x)
    return run
