"""Resuming mid-epoch on tar shards: time to reach batch N, skipping raw records vs decoding.

    python benchmarks/resume_skip.py [--batches 60] [--batch-size 32] [--shards 32]
                                     [--per-shard 64] [--size 384x288] [--workers 0]

Writes webdataset-layout tar shards of JPEGs into a temporary folder, builds the training data
source exactly as `uta pretrain` does (random-resized crop rendered at 224 px for the student and
the teacher, reversed-block masks on the 14x14 grid), and times, in one run, how long it takes
to get batch N of an epoch:
  - decode: read from the start of the epoch and throw away the first N batches (decoding,
    augmenting and masking every skipped image), which is what a resume did before;
  - skip:   `Source.batches(epoch, skip=N)`, which counts the tar records each loader worker
    used from the member headers, then starts the workers there: shards before the resume
    point unopened, nothing decoded before it.
Both return the same batch (checked). The target is skip >= 20x faster than decode.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from uta_cli.data.pipeline import MaskCollator, Source, TrainTransform, View, open_dataset
from uta_cli.masks.generate import MaskSpec


def write_shards(folder: str, shards: int, per_shard: int, size: tuple[int, int]) -> str:
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"train-{s:04d}.tar"), "w") as tar:
            for i in range(per_shard):
                # smooth colour fields plus noise: JPEG sizes like photos (tens of kB)
                base = rng.uniform(0, 255, 3) + 60 * np.sin(xx[..., None] / rng.uniform(8, 40)
                                                             + yy[..., None] / 23.0)
                img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=90)
                for name, data in ((f"{s:04d}_{i:05d}.jpg", buf.getvalue()),
                                   (f"{s:04d}_{i:05d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f"train-{{0000..{shards - 1:04d}}}.tar")


def build_source(urls: str, batch_size: int, workers: int) -> Source:
    views = [View("student", 224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
             View("teacher", 224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))]
    transform = TrainTransform(views, (0.2, 1.0), True, seed=0)
    dataset = open_dataset(urls, "auto", transform, rank=0, world=1, seed=0)
    collator = MaskCollator(MaskSpec(strategy="reversed-block", ratio=0.5), (14, 14), 0)
    return Source(dataset, transform, collator, batch_size, workers, 0, 0, 1,
                  samples_per_epoch=10**6)


def time_decode(source: Source, epoch: int, n: int) -> tuple[float, dict]:
    start = time.perf_counter()
    source.transform.set_epoch(epoch)
    source.collator.epoch = epoch
    source.dataset.set_epoch(epoch)
    stream = DataLoader(source.dataset, **source._loader_kwargs(epoch))
    batch = next(itertools.islice(stream, n, None))
    return time.perf_counter() - start, batch


def time_skip(source: Source, epoch: int, n: int) -> tuple[float, dict]:
    start = time.perf_counter()
    batch = next(iter(source.batches(epoch, skip=n)))
    return time.perf_counter() - start, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60, help="N: reach batch N of the epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--size", default="384x288", help="image width x height")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.size.split("x"))
    need = (args.batches + 1) * args.batch_size
    if args.shards * args.per_shard < need:
        parser.error(f"--shards x --per-shard must hold at least {need} images")
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(tmp, args.shards, args.per_shard, size)
        mb = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 2**20
        print(f"{args.shards} shards x {args.per_shard} JPEGs {args.size} ({mb:.0f} MiB), batch "
              f"{args.batch_size}, {args.workers} loader workers, 2 views at 224 px + masks; "
              f"reach batch {args.batches} ({args.batches * args.batch_size} images skipped)")
        source = build_source(urls, args.batch_size, args.workers)
        time_skip(source, 0, 1)  # warm the page cache and imports for both
        t_decode, b_decode = time_decode(source, 1, args.batches)
        t_skip, b_skip = time_skip(source, 1, args.batches)
        assert torch.equal(b_decode["sample_id"], b_skip["sample_id"])
        assert torch.equal(b_decode["student"], b_skip["student"])
        print(f"{'decode from the epoch start':<30}{t_decode:8.2f} s")
        print(f"{'skip raw tar records':<30}{t_skip:8.2f} s")
        print(f"speed-up: {t_decode / t_skip:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
