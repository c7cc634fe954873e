"""Images per second of one loader worker for the two-view training render, side by side in
one run: originals of ImageNet size (500x375) and web size (1024x768), decoded at full size or
at reduced scale (`TrainTransform.draft`); pre-resized shards written by `uta shards` (short
side 256 and 384, made from the 1024x768 originals) read from tar; and the tensor decode path
of `data.decode: gpu` run on the CPU.

    nice -n 10 python benchmarks/data.py      # 64 images of each kind, 3 rounds (2-3 minutes)
    python benchmarks/data.py --images 128 --rounds 5

Every row goes through the real training path in this process on one thread, which is what one
DataLoader worker does: folders through `ImageFolderDataset.__getitem__` (read the file, decode,
random-resized crop, flip, one uint8 render per view), shards through `TarShardDataset` (read
the tar, the same decode and render). The tensor rows add what the training process does with
`data.decode: gpu` (`DeviceDecoder`: `decode_jpeg` of the batch, crop, antialiased resize and
flip of tensors), here on the CPU, to the worker's share (reading bytes, the JPEG header, the
crop draw): their sum is the CPU cost of one image on that path. The "worker's share" rows are
that share alone: what a loader worker does per image when the decode runs on the GPU. The views
are those of the `vitb16` recipe: the student's 224 px and the EVA02-L-14 teacher's 196 px. The
images are smooth random fields with a little noise, saved at JPEG quality 90 (about 4 bits a
pixel, like photographs; pure noise would decode slower than real photographs).
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

from uta_cli.data.decode import DeviceDecoder
from uta_cli.data.folders import ImageFolderDataset, collate_skip_none, index_image_folder
from uta_cli.data.pipeline import TrainTransform, View
from uta_cli.data.shards import TarShardDataset
from uta_cli.workflows.shards import ShardOptions, make_shards

VIEWS = [View("student", 224, (0.5,) * 3, (0.5,) * 3),
         View("teacher", 196, (0.5,) * 3, (0.5,) * 3)]
BATCH = 32  # images per decode_jpeg call on the tensor path


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


def deferred(transform: TrainTransform) -> TrainTransform:
    tf = TrainTransform(transform.views, transform.crop_scale, transform.hflip, transform.seed)
    tf.defer_jpeg = True
    return tf


def items(dataset, n: int):
    if isinstance(dataset, TarShardDataset):
        return (item for _, item in zip(range(n), dataset))
    return (dataset[i] for i in range(n))


def images_per_s(dataset, n: int, decoder: DeviceDecoder | None = None) -> float:
    """Images per CPU second of this process: what one worker with a core to itself delivers
    (wall time on a shared machine would measure the other jobs too). With `decoder`, the
    batches are decoded and rendered here too (the tensor path's whole cost)."""
    t = time.process_time()
    batch = []
    for item in items(dataset, n):
        batch.append(item)
        if decoder is not None and len(batch) == BATCH:
            decoder(collate_skip_none(batch))
            batch = []
    if decoder is not None and batch:
        decoder(collate_skip_none(batch))
    return n / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a loader worker's share
    transform = TrainTransform(VIEWS, (0.2, 1.0), True, seed=0)
    decoder = DeviceDecoder(VIEWS, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}  # name -> (what, stored size, mean KiB, dataset, decoder)
        for w, h in ((500, 375), (1024, 768)):
            folder = os.path.join(tmp, f"{w}x{h}")
            write_jpegs(folder, args.images, w, h)
            index = index_image_folder(folder)
            kib = statistics.mean(os.path.getsize(f) for f in index.files) / 1024
            rows[f"{w}x{h} full"] = (f"{w}x{h} originals, full-size decode", f"{w}x{h}", kib,
                                     ImageFolderDataset(index, PlainTransform(transform)), None)
            rows[f"{w}x{h}"] = (f"{w}x{h} originals, reduced-scale decode", f"{w}x{h}", kib,
                                ImageFolderDataset(index, transform), None)
        for side in (256, 384):
            out = os.path.join(tmp, f"shards{side}")
            make_shards(os.path.join(tmp, "1024x768"), out,
                        ShardOptions(short_side=side, shard_size=args.images))
            kib = os.path.getsize(os.path.join(out, "train", "0.tar")) / 1024 / args.images
            stored = f"{round(1024 * side / 768)}x{side}"
            shards = os.path.join(out, "train")
            rows[f"shards{side}"] = (f"uta shards --short-side {side}, tar", stored, kib,
                                     TarShardDataset(shards, transform), None)
            if side == 256:
                rows["shards256 tensor"] = (
                    "  the same, tensor decode path on the CPU", stored, kib,
                    TarShardDataset(shards, deferred(transform)), decoder)
                rows["shards256 worker"] = (
                    "  the same, worker's share of data.decode gpu", stored, kib,
                    TarShardDataset(shards, deferred(transform)), None)
        index = rows["500x375"][3].index
        rows["500x375 tensor"] = ("500x375 originals, tensor decode path on the CPU",
                                  "500x375", rows["500x375"][2],
                                  ImageFolderDataset(index, deferred(transform)), decoder)
        rows["500x375 worker"] = ("  the same, worker's share of data.decode gpu", "500x375",
                                  rows["500x375"][2],
                                  ImageFolderDataset(index, deferred(transform)), None)
        rates: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.rounds):
            for k, (_, _, _, dataset, dec) in rows.items():
                rates[k].append(images_per_s(dataset, args.images, dec))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"one worker, 1 thread, images per CPU second; views {[v.size for v in VIEWS]}; "
              f"median of {args.rounds} rounds of {args.images} images, the rows interleaved")
        print(f"{'path':<50} {'stored':>8} {'KiB':>5} {'img/s':>7} {'vs 500x375':>10} "
              f"{'vs 1024x768':>11}")
        for k, (what, stored, kib, _, _) in rows.items():
            print(f"{what:<50} {stored:>8} {kib:>5.0f} {med[k]:>7.1f} "
                  f"{med[k] / med['500x375']:>9.2f}x {med[k] / med['1024x768']:>10.2f}x")
        print("vs: against the originals on the default path (reduced-scale decode). Targets: "
              "256-px shards >= 1.5x 500x375 and >= 2.0x 1024x768.")


if __name__ == "__main__":
    main()
