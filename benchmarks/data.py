"""Images per second of one loader worker for the two-view training render, on generated JPEGs
of ImageNet size (500x375) and web size (1024x768): the plain decode against the reduced-scale
JPEG decode (`TrainTransform.draft`), side by side in one run.

    python benchmarks/data.py                 # 64 images of each size, 3 rounds (about a minute)
    python benchmarks/data.py --images 128 --rounds 5

Each image goes through the real training path (`ImageFolderDataset.__getitem__`: read the file,
decode, random-resized crop, flip, one uint8 render per view) in this process on one thread,
which is what one DataLoader worker does. The views are those of the `vitb16` recipe: the
student's 224 px and the EVA02-L-14 teacher's 196 px (its 14x14 grid at patch 14). The images
are smooth random fields with a little noise, saved at JPEG quality 90 (about 4 bits a pixel,
like photographs; pure noise would decode slower than real photographs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from uta_cli.data.folders import ImageFolderDataset, index_image_folder
from uta_cli.data.pipeline import TrainTransform, View

SIZES = ((500, 375), (1024, 768))
VIEWS = [View("student", 224, (0.5,) * 3, (0.5,) * 3),
         View("teacher", 196, (0.5,) * 3, (0.5,) * 3)]


def write_jpegs(folder: str, n: int, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC))
        noisy = smooth.astype(np.int16) + rng.integers(-12, 13, smooth.shape)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, "images", f"{i:05d}.jpg"), quality=90)


class PlainTransform:
    """The same transform without its draft hook: every JPEG decoded at full size."""

    def __init__(self, transform: TrainTransform):
        self.transform = transform

    def __call__(self, img, sample_id):
        return self.transform(img, sample_id)


def images_per_s(dataset, n: int) -> float:
    """Images per CPU second of this process: what one worker with a core to itself delivers
    (wall time on a shared machine would measure the other jobs too)."""
    t = time.process_time()
    for i in range(n):
        dataset[i]
    return n / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a loader worker's share
    transform = TrainTransform(VIEWS, (0.2, 1.0), True, seed=0)
    print(f"one worker, 1 thread, images per CPU second; views {[v.size for v in VIEWS]}; "
          f"median of {args.rounds} rounds of {args.images} images, the paths interleaved")
    print(f"{'image size':>10} {'KiB':>5} {'plain img/s':>11} {'draft img/s':>11} {'gain':>6} "
          f"{'drafted':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in SIZES:
            folder = os.path.join(tmp, f"{w}x{h}")
            write_jpegs(folder, args.images, w, h)
            index = index_image_folder(folder)
            kib = statistics.mean(os.path.getsize(f) for f in index.files) / 1024
            fast = ImageFolderDataset(index, transform)
            plain = ImageFolderDataset(index, PlainTransform(transform))
            rates = {"plain": [], "draft": []}
            for _ in range(args.rounds):
                rates["plain"].append(images_per_s(plain, args.images))
                rates["draft"].append(images_per_s(fast, args.images))
            drafted = 0
            for i in range(args.images):
                img = Image.open(index.files[i])
                transform.draft(img, i)
                drafted += "uta_draft" in img.info
            p, d = statistics.median(rates["plain"]), statistics.median(rates["draft"])
            print(f"{w}x{h:<5} {kib:>5.0f} {p:>11.1f} {d:>11.1f} {d / p:>5.2f}x "
                  f"{drafted / args.images:>7.0%}")


if __name__ == "__main__":
    main()
