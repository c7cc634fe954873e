"""The data wait of training: the share of each logging window spent waiting for the next batch,
the largest over processes (the slowest loader holds every process at the next all-reduce), and
a warning naming the remedies when it stays high.

The first window is not judged: it includes starting the loader workers and filling their
queues, which a long run pays once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

THRESHOLD = 0.10  # above this share of the step the accelerator waits for data


def largest_over_processes(value: float, device: torch.device) -> float:
    """`value` reduced with max over all processes (itself on one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class DataWaitWatch:
    """Per logging window: `window(wait_s, elapsed_s, step)` gives data_wait_frac (collective:
    every process calls it at the same steps); `warning(frac)` the one-time warning, or None."""

    def __init__(self, device: torch.device, recipe: dict | None = None,
                 threshold: float = THRESHOLD):
        self.device, self.threshold = device, threshold
        data = (recipe or {}).get("data", {})
        self.workers, self.decode = data.get("num_workers"), data.get("decode")
        self.windows = 0
        self.warned = False
        self.step, self.steps = None, 0  # the step of the previous window's end; its length

    def window(self, wait_s: float, elapsed_s: float, step: int) -> float:
        self.windows += 1
        self.steps = step - self.step if self.step is not None else 0
        self.step = step
        return round(largest_over_processes(wait_s / max(elapsed_s, 1e-9), self.device), 4)

    def warning(self, frac: float) -> str | None:
        if self.warned or self.windows < 2 or frac <= self.threshold:
            return None
        self.warned = True
        workers = f" (now {self.workers})" if self.workers is not None else ""
        decode = f" (now {self.decode})" if self.decode is not None else ""
        return (f"Training waited for data {frac:.0%} of the time in the last {self.steps} "
                f"step(s) (data_wait_frac, the slowest process; above {self.threshold:.0%} the "
                f"accelerator idles). Remedies: more loader workers, --set "
                f"data.num_workers=N{workers}, up to the cores per GPU; pre-resized shards, "
                f"uta shards SRC OUT --short-side 256, then data.source=OUT/train; GPU "
                f"decoding, --set data.decode=gpu{decode} on CUDA (docs/data.md).")
