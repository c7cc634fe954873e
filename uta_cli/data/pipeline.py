"""Data pipeline: sources (a dataset bound to its transform, mask collator and rank), per-rank
sampling, masks. Views and transforms live in transforms.py, resuming tar shards mid-epoch in
shard_resume.py; the names of transforms.py are importable from here too.

Every random choice is a pure function of (seed, epoch, sample id): the crop and flip of an image,
its mask, and the order of an epoch. So a run resumed at step s sees exactly the batches an
uninterrupted run would, ranks see disjoint samples, and the number of workers changes nothing.
"""

from __future__ import annotations

import itertools
import os
import random
import zlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from uta_cli.data.folders import (
    ImageFolderDataset,
    collate_skip_none,
    index_image_folder,
)
from uta_cli.data.shard_resume import count_tar_records, tar_stream
from uta_cli.data.shard_writer import manifest_samples
from uta_cli.data.shards import TarShardDataset
from uta_cli.data.transforms import (
    RESIZE_MODES,
    EvalTransform,
    TrainTransform,
    View,
    eval_resize_crop,
    normalize,
)
from uta_cli.errors import UtaUsageError
from uta_cli.masks.generate import (
    DEVICE_STRATEGIES,
    MaskSpec,
    attention_noise,
    generate_masks,
    keep_indices,
    validate_mask_spec,
)

__all__ = [  # the pipeline's public names, those of transforms.py included
    "RESIZE_MODES", "ArrayImageDataset", "EvalTransform", "MaskCollator", "Source",
    "TrainTransform", "View", "detect_format", "epoch_order", "eval_resize_crop", "normalize",
    "open_dataset",
]


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 (N, H, W, 3), e.g. the generated demo data."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform,
                 captions: list[str] | None = None):
        self.images, self.labels, self.captions = images, labels, captions
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"sample_id": i, "label": int(self.labels[i]),
                **self.transform(Image.fromarray(self.images[i]), i)}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item


class MaskCollator:
    """Collates (dropping unreadable images) and adds the visible-token indices of each sample.

    `key_view`: key each mask by the pixels of that view instead of the sample id (validation:
    the same images get the same masks whether they come from a folder or tar shards, in any
    order and on any number of processes)."""

    def __init__(self, spec: MaskSpec | None, grid: tuple[int, int], seed: int,
                 key_view: str = ""):
        self.spec, self.grid, self.seed = spec, tuple(grid), seed
        self.key_view = key_view
        self.epoch = 0
        if spec is not None:
            validate_mask_spec(spec, self.grid)

    def __call__(self, items: list[dict | None]) -> dict:
        batch = collate_skip_none(items)
        if self.spec is not None and self.key_view and self.key_view in batch:
            ids = np.array([zlib.crc32(img.numpy().tobytes()) for img in batch[self.key_view]],
                           dtype=np.int64)
            self._add_masks(batch, ids)
        elif self.spec is not None and "sample_id" in batch:
            self._add_masks(batch, batch["sample_id"].numpy().astype(np.int64))
        return batch

    def _add_masks(self, batch: dict, ids: np.ndarray) -> None:
        if self.spec.strategy in DEVICE_STRATEGIES:
            # drawn on the device from the teacher's attention; here only each sample's noise
            n = self.grid[0] * self.grid[1]
            batch["mask_noise"] = torch.from_numpy(
                attention_noise(self.seed, self.epoch, ids, n))
        else:
            masks = generate_masks(self.spec, self.grid, self.seed, self.epoch, ids)
            batch["keep_idx"] = torch.from_numpy(keep_indices(masks))


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's share of a seeded permutation; equal length on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world
    return perm[: per_rank * world][rank::world].tolist()


def detect_format(source: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if source == "demo":
        return "demo"
    s = source.rstrip("/")
    if s.endswith(".tar") or "{" in s or s.endswith(".tar}"):
        return "tar"
    if os.path.isdir(s) and any(f.endswith(".tar") for f in os.listdir(s)) and not any(
            os.path.isdir(os.path.join(s, f)) for f in os.listdir(s)):
        return "tar"
    return "folder"


def _seed_of(*parts) -> int:
    """A 63-bit seed from its parts, stable across processes and Python versions."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class _ShardPass(torch.utils.data.IterableDataset):
    """One pass over some shards of a tar-shard dataset, split among the DataLoader workers;
    of a shard with a cap, only its first `cap` records are read (None: all of them)."""

    def __init__(self, tar, shards: list[tuple[str, int | None]]):
        self.tar, self.shards = tar, shards

    def __iter__(self) -> Iterator[dict | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard, cap in self.shards[worker::workers]:
            for _, key, fields in itertools.islice(self.tar._read_shard(shard), cap):
                yield self.tar._decode(shard, key, fields)


def first_records(tar, limit: int) -> list[tuple[str, int | None]]:
    """The shards that hold the first `limit` samples of `tar` in shard-list order, as
    (shard, records to read; None = all): the same list on every process, whatever their
    number, so a limited validation set is one set. Records are counted from the tar headers
    (nothing decoded), shard by shard until `limit` is reached."""
    out: list[tuple[str, int | None]] = []
    left = limit
    for shard in tar.shards:
        n = count_tar_records(tar, shard)
        out.append((shard, None if n <= left else left))
        left -= min(n, left)
        if left <= 0:
            break
    return out


class Source:
    """A training or evaluation source bound to its transform, mask collator and rank."""

    def __init__(self, dataset, transform, collator: MaskCollator, batch_size: int,
                 num_workers: int, seed: int, rank: int, world: int, samples_per_epoch: int = 0,
                 shuffle: bool = True, drop_last: bool = True, evaluation: bool = False,
                 limit: int = 0):
        self.dataset, self.transform, self.collator = dataset, transform, collator
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.drop_last = drop_last  # training: equal batches; evaluation: every image
        self.limit = limit  # evaluation on tar shards: at most this many images (0 = all)
        self.iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        # data.decode gpu: a decode.DeviceDecoder turning each batch's JPEG bytes into views
        self.device_decode = None
        self.samples_per_epoch = samples_per_epoch if self.iterable else len(dataset)
        if self.iterable and not evaluation:
            dataset.check_split(num_workers)  # fail now, not inside a worker process

    def steps_per_epoch(self, world: int, global_micro_batch: int) -> int:
        if self.iterable and self.samples_per_epoch <= 0:
            raise UtaUsageError("Tar shards have no length: set data.samples_per_epoch to the "
                                "number of images in one pass (or use schedule.steps).")
        return self.samples_per_epoch // world // global_micro_batch

    def order_change_problem(self, skip: int) -> str:
        """Why a resume `skip` samples into an epoch cannot go on with another number of
        processes, loader workers or batch size ("" if it can): tar shards are dealt to
        processes and loader workers whole, and workers take turns batch by batch, so the rest
        of the epoch would differ. (Image folders are sampled by index: any launch goes on.)"""
        if self.iterable and skip > 0:
            return ("tar shards are dealt to processes and loader workers shard by shard, and "
                    "the workers take turns batch by batch, so another number of processes, "
                    "loader workers or batch size would read another rest of this epoch; resume "
                    "with the checkpoint's processes, data.num_workers and data.batch_size (a "
                    "change is fine from a checkpoint at an epoch boundary)")
        return ""

    def _loader_kwargs(self, epoch: int) -> dict:
        # An explicit generator: creating the loader draws nothing from the global RNG, so
        # dropout and drop path do not depend on when (or whether, after a resume) it was made.
        return dict(batch_size=self.batch_size, num_workers=self.num_workers,
                    collate_fn=self.collator, pin_memory=torch.cuda.is_available(),
                    drop_last=self.drop_last, persistent_workers=False,
                    generator=torch.Generator().manual_seed(
                        _seed_of("loader", self.seed, epoch, self.rank)))

    def batches(self, epoch: int, skip: int = 0) -> Iterable[dict]:
        """Batches of one epoch for this rank, starting after `skip` batches."""
        self.transform.set_epoch(epoch)
        self.collator.epoch = epoch
        common = self._loader_kwargs(epoch)
        if self.iterable:
            batches = tar_stream(self.dataset, epoch, skip, self.batch_size, self.num_workers,
                                 common)
        else:
            if self.shuffle:
                order = epoch_order(len(self.dataset), self.seed, epoch, self.rank, self.world)
            else:
                order = list(range(self.rank, len(self.dataset) - len(self.dataset) % self.world,
                                   self.world))
            batches = DataLoader(self.dataset, sampler=order[skip * self.batch_size:], **common)
        if self.device_decode is not None:  # in this process, when the engine asks
            return map(self.device_decode, batches)
        return batches

    def one_pass(self) -> Iterator[dict]:
        """Evaluation: this rank's share of the data, each sample once, in a fixed order.

        Folders and in-memory data: samples rank, rank + world, ...; tar shards: shards rank,
        rank + world, ..., read by min(num_workers, those shards) workers, so fewer shards than
        processes x workers is fine (a process without a shard reads nothing). With `limit`, a
        tar-shard source is its first `limit` samples in shard-list order (`first_records`),
        those shards dealt to the processes as above: one validation set for any number of
        processes (a folder's limit is applied by the caller, its first `limit` images).
        """
        self.transform.set_epoch(0)
        self.collator.epoch = 0
        kwargs = {**self._loader_kwargs(0), "drop_last": False}
        if not self.iterable:
            yield from DataLoader(self.dataset, sampler=range(self.rank, len(self.dataset),
                                                              self.world), **kwargs)
            return
        shards = first_records(self.dataset, self.limit) if self.limit > 0 else \
            [(s, None) for s in self.dataset.shards]
        mine = shards[self.rank::self.world]
        if not mine:
            return
        kwargs["num_workers"] = min(self.num_workers, len(mine))
        yield from DataLoader(_ShardPass(self.dataset, mine), **kwargs)


def epoch_samples(source: str, configured: int) -> int:
    """data.samples_per_epoch, or where it is 0 and the source is a split written by
    `uta shards` (OUT/<split>), the sample count in its manifest."""
    return configured or manifest_samples(source)


def open_dataset(source: str, fmt: str, transform, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle_buffer: int = 0, interleave: int = 8):
    """An image folder (class folders or flat) or tar shards; labels are kept when present.
    shuffle_buffer / interleave: tar shards' sample shuffle (TarShardDataset.sample_stream)."""
    kind = detect_format(source, fmt)
    if kind == "demo":
        raise UtaUsageError("The demo source is built by uta_cli.data.demo, not opened from a "
                            "path.")
    if kind == "tar":
        return TarShardDataset(source, transform, rank=rank, world_size=world, seed=seed,
                               shuffle_buffer=shuffle_buffer, interleave=interleave)
    if not source:
        raise UtaUsageError("data.source is empty. Point it at an image folder, an fsspec URL or "
                            "tar shards, e.g. --set data.source=/data/imagenet/train")
    return ImageFolderDataset(index_image_folder(source), transform)
