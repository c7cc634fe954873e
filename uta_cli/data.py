"""Data pipeline: sources, transforms with one crop for several views, per-rank sampling, masks.

Every random choice is a pure function of (seed, epoch, sample id): the crop and flip of an image,
its mask, and the order of an epoch. So a run resumed at step s sees exactly the batches an
uninterrupted run would, ranks see disjoint samples, and the number of workers changes nothing.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from uta_cli.datasets import (
    ImageFolderDataset,
    TarShardDataset,
    collate_skip_none,
    index_image_folder,
)
from uta_cli.errors import UtaUsageError
from uta_cli.masking import MaskSpec, generate_masks, keep_indices, validate_mask_spec

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class View:
    """One network's view of the crop: its input size and normalisation."""

    name: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def normalize(images: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float. Done per batch, on the device: cheaper than per
    image in the loader, and uint8 moves 4x fewer bytes to the GPU."""
    mean = torch.tensor(view.mean, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(view.std, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


def _render(img: Image.Image, views: list[View], box: tuple[int, ...] | None,
            flip: bool) -> dict[str, torch.Tensor]:
    """Each view of one crop as uint8 CHW; views of equal size and resampling share one render."""
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple[int, str], torch.Tensor] = {}
    for view in views:
        key = (view.size, view.interpolation)
        if key not in done:
            if box is None:  # resize the short side, centre crop
                scale = view.size / min(img.width, img.height)
                w = max(view.size, round(img.width * scale))
                h = max(view.size, round(img.height * scale))
                left, top = (w - view.size) // 2, (h - view.size) // 2
                im = img.resize((w, h), _RESAMPLE[view.interpolation])
                im = im.crop((left, top, left + view.size, top + view.size))
            else:
                im = img.resize((view.size, view.size), _RESAMPLE[view.interpolation], box=box)
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            done[key] = _to_uint8_tensor(im)
        out[view.name] = done[key]
    return out


def sample_rng(seed: int, epoch: int, sample_id: int) -> random.Random:
    """A generator keyed by (seed, epoch, sample id); cheaper to seed than NumPy's (4x)."""
    return random.Random(f"{seed}/{epoch}/{sample_id}")


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            rng: random.Random,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop parameters, drawn from an explicit generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: central square crop
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class TrainTransform:
    """Random-resized crop + flip, drawn once per image, rendered once per view (uint8)."""

    def __init__(self, views: list[View], crop_scale: tuple[float, float], hflip: bool,
                 seed: int):
        self.views, self.crop_scale, self.hflip, self.seed = views, tuple(crop_scale), hflip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, img: Image.Image, sample_id: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, self.epoch, int(sample_id))
        box = random_resized_crop_box(img.width, img.height, self.crop_scale, rng)
        flip = self.hflip and rng.random() < 0.5
        return _render(img, self.views, box, flip)


class EvalTransform:
    """Resize the short side, centre crop (the zero-shot protocol, docs/method.md §6)."""

    def __init__(self, views: list[View]):
        self.views = views

    def set_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, img: Image.Image, sample_id: int) -> dict[str, torch.Tensor]:
        return _render(img, self.views, None, False)


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
    """Collates (dropping unreadable images) and adds the visible-token indices of each sample."""

    def __init__(self, spec: MaskSpec | None, grid: tuple[int, int], seed: int):
        self.spec, self.grid, self.seed = spec, tuple(grid), seed
        self.epoch = 0
        if spec is not None:
            validate_mask_spec(spec, self.grid)

    def __call__(self, items: list[dict | None]) -> dict:
        batch = collate_skip_none(items)
        if self.spec is not None and "sample_id" in batch:
            ids = batch["sample_id"].numpy().astype(np.int64)
            masks = generate_masks(self.spec, self.grid, self.seed, self.epoch, ids)
            batch["keep_idx"] = torch.from_numpy(keep_indices(masks))
        return batch


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


class Source:
    """A training or evaluation source bound to its transform, mask collator and rank."""

    def __init__(self, dataset, transform, collator: MaskCollator, batch_size: int,
                 num_workers: int, seed: int, rank: int, world: int, samples_per_epoch: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        self.dataset, self.transform, self.collator = dataset, transform, collator
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.drop_last = drop_last  # training: equal batches; evaluation: every image
        self.iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        self.samples_per_epoch = samples_per_epoch if self.iterable else len(dataset)
        if self.iterable:
            dataset.check_split(num_workers)  # fail now, not inside a worker process

    def steps_per_epoch(self, world: int, global_micro_batch: int) -> int:
        if self.iterable and self.samples_per_epoch <= 0:
            raise UtaUsageError("Tar shards have no length: set data.samples_per_epoch to the "
                                "number of images in one pass (or use schedule.steps).")
        return self.samples_per_epoch // world // global_micro_batch

    def _endless(self, epoch: int, loader_kwargs: dict) -> Iterator[dict]:
        """A stream of one epoch's shard order that starts over (in a new order) when this rank's
        shards run out, so a rank with fewer samples never leaves the others waiting in an
        all-reduce; the engine ends the epoch after `steps_per_epoch` steps on every rank."""
        for repeat in itertools.count():
            self.dataset.set_epoch(epoch + repeat * 1_000_003)
            yield from DataLoader(self.dataset, **loader_kwargs)

    def batches(self, epoch: int, skip: int = 0) -> Iterable[dict]:
        """Batches of one epoch for this rank, starting after `skip` batches."""
        self.transform.set_epoch(epoch)
        self.collator.epoch = epoch
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                      collate_fn=self.collator, pin_memory=torch.cuda.is_available(),
                      drop_last=self.drop_last, persistent_workers=False)
        if self.iterable:
            return itertools.islice(self._endless(epoch, common), skip, None)
        if self.shuffle:
            order = epoch_order(len(self.dataset), self.seed, epoch, self.rank, self.world)
        else:
            order = list(range(self.rank, len(self.dataset) - len(self.dataset) % self.world,
                               self.world))
        return DataLoader(self.dataset, sampler=order[skip * self.batch_size:], **common)


def open_dataset(source: str, fmt: str, transform, rank: int = 0, world: int = 1,
                 seed: int = 0):
    """An image folder (class folders or flat) or tar shards; labels are kept when present."""
    kind = detect_format(source, fmt)
    if kind == "demo":
        raise UtaUsageError("The demo source is built by uta_cli.demo, not opened from a path.")
    if kind == "tar":
        return TarShardDataset(source, transform, rank=rank, world_size=world, seed=seed)
    if not source:
        raise UtaUsageError("data.source is empty. Point it at an image folder, an fsspec URL or "
                            "tar shards, e.g. --set data.source=/data/imagenet/train")
    return ImageFolderDataset(index_image_folder(source), transform)
