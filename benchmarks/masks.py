"""Mask generation speed: masks per second per strategy, one CPU thread, measured in one run.

    python benchmarks/masks.py [--grid 14] [--ratio 0.5] [--batch 32 256 4096] [--seconds 1.0]

Generates batches of masks exactly as the data pipeline does (one `generate_masks` call per batch,
consecutive sample ids) until `--seconds` have passed, for each strategy and batch size, and prints
them side by side. The target is >= 5,000 masks/s per core on 14x14, and 5,000 masks of all three
strategies (what `uta inspect-mask --strategy all` draws) well under 5 s.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from uta_cli.masks.generate import STRATEGIES, MaskSpec, generate_masks


def masks_per_second(spec: MaskSpec, grid: tuple[int, int], batch: int, seconds: float) -> float:
    generate_masks(spec, grid, 0, 0, np.arange(batch))  # warm-up
    done, start, step = 0, time.perf_counter(), 0
    while True:
        ids = np.arange(step * batch, (step + 1) * batch)
        generate_masks(spec, grid, seed=0, epoch=0, sample_ids=ids)
        done += batch
        step += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def one_shot(spec: MaskSpec, grid: tuple[int, int], count: int) -> float:
    start = time.perf_counter()
    generate_masks(spec, grid, seed=0, epoch=0, sample_ids=np.arange(count))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256, 4096])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = (args.grid, args.grid)
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"grid {args.grid}x{args.grid}, ratio {args.ratio}, torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={omp}")
    head = "".join(f"{f'masks/s @ batch {b}':>22}" for b in args.batch)
    print(f"{'strategy':<16}{head}{'5000 in one call':>20}")
    total = 0.0
    for strategy in STRATEGIES:
        spec = MaskSpec(strategy=strategy, ratio=args.ratio)
        rates = [masks_per_second(spec, grid, b, args.seconds) for b in args.batch]
        shot = one_shot(spec, grid, 5000)
        total += shot
        cells = "".join(f"{rate:>22,.0f}" for rate in rates)
        print(f"{strategy:<16}{cells}{shot:>19.3f}s")
    pad = " " * (22 * len(args.batch))
    print(f"{'all three':<16}{pad}{total:>19.3f}s   (target: well under 5 s)")

if __name__ == "__main__":
    main()
