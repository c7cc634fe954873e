"""Data pipeline: sources, transforms with one crop for several views, per-rank sampling, masks.

Every random choice is a pure function of (seed, epoch, sample id): the crop and flip of an image,
its mask, and the order of an epoch. So a run resumed at step s sees exactly the batches an
uninterrupted run would, ranks see disjoint samples, and the number of workers changes nothing.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from uta_cli.datasets import (
    ImageFolderDataset,
    collate_skip_none,
    index_image_folder,
)
from uta_cli.errors import UtaUsageError
from uta_cli.masking import MaskSpec, generate_masks, keep_indices, validate_mask_spec
from uta_cli.tar_shards import TarShardDataset

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class View:
    """One network's view of the crop: its input size and normalisation."""

    name: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    # Evaluation only (training crops are random): open_clip's resize_mode, i.e. how the image
    # meets the square input: shortest side + centre crop, longest side + centre pad, or squash.
    resize_mode: str = "shortest"
    fill: int = 0  # the padding value of resize_mode "longest"


RESIZE_MODES = ("shortest", "longest", "squash")


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def normalize(images: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float. Done per batch, on the device: cheaper than per
    image in the loader, and uint8 moves 4x fewer bytes to the GPU. The arithmetic is
    torchvision's ToTensor + Normalize, `(x / 255 - mean) / std` in fp32, so the values are
    bit-identical to open_clip's preprocess."""
    mean = torch.tensor(view.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(view.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return images.float().div(255).sub_(mean).div_(std)


def eval_resize_crop(img: Image.Image, size: int, interpolation: str = "bicubic",
                     resize_mode: str = "shortest", fill: int = 0) -> Image.Image:
    """The evaluation resize and crop with the arithmetic of open_clip's preprocess (torchvision
    Resize, CenterCrop; open_clip's ResizeKeepRatio, CenterCropOrPad), pixel for pixel:

    - shortest: the short side becomes `size`, the long side `int(size * long / short)`
      (truncated, as torchvision's Resize), then a centre crop whose offset is
      `int(round((side - size) / 2))` (Python's round: halves to even).
    - longest: both sides scaled by `size / long` and rounded, then padded with `fill` to a
      square (left/top get the smaller half) and centre-cropped.
    - squash: resized to size x size, the aspect ratio ignored.
    """
    resample = _RESAMPLE[interpolation]
    w, h = img.size
    if resize_mode == "squash":
        return img.resize((size, size), resample) if (w, h) != (size, size) else img
    if resize_mode == "longest":
        ratio = max(h / size, w / size)
        nh, nw = round(h / ratio), round(w / ratio)
    elif resize_mode == "shortest":
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        nw, nh = (size, new_long) if w <= h else (new_long, size)
    else:
        raise UtaUsageError(f"resize_mode {resize_mode!r} is not one of: "
                            f"{', '.join(RESIZE_MODES)}.")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if nw < size or nh < size:  # only "longest" can leave a side short: pad, centred
        left, top = max(size - nw, 0) // 2, max(size - nh, 0) // 2
        canvas = Image.new(img.mode, (max(nw, size), max(nh, size)), (fill,) * len(img.getbands()))
        canvas.paste(img, (left, top))
        img, (nw, nh) = canvas, canvas.size
        if (nw, nh) == (size, size):
            return img
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _render(img: Image.Image, views: list[View], box: tuple[int, ...] | None,
            flip: bool) -> dict[str, torch.Tensor]:
    """Each view of one crop as uint8 CHW; views of equal size and resampling share one render."""
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple[int, str], torch.Tensor] = {}
    for view in views:
        key = (view.size, view.interpolation, view.resize_mode, view.fill)
        if key not in done:
            if box is None:  # evaluation: exactly open_clip's preprocess
                im = eval_resize_crop(img, view.size, view.interpolation, view.resize_mode,
                                      view.fill)
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


_DRAFT_KEY = "uta_draft"  # in a drafted image's info: (full size, scale)


class TrainTransform:
    """Random-resized crop + flip, drawn once per image, rendered once per view (uint8)."""

    def __init__(self, views: list[View], crop_scale: tuple[float, float], hflip: bool,
                 seed: int):
        self.views, self.crop_scale, self.hflip, self.seed = views, tuple(crop_scale), hflip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draw(self, width: int, height: int, sample_id: int) -> tuple[tuple[int, ...], bool]:
        rng = sample_rng(self.seed, self.epoch, int(sample_id))
        box = random_resized_crop_box(width, height, self.crop_scale, rng)
        return box, self.hflip and rng.random() < 0.5

    def draft(self, img: Image.Image, sample_id: int) -> None:
        """Ask a JPEG, opened but not yet decoded, to decode at 1/2, 1/4 or 1/8 scale (DCT
        scaling: 2-3x faster) when this sample's crop stays at least as large as the largest
        view at that scale, so every view is still a downscale. Other images are untouched."""
        if img.format != "JPEG":
            return
        (left, top, right, bottom), _ = self._draw(img.width, img.height, sample_id)
        room = min(right - left, bottom - top) / max(v.size for v in self.views)
        scale = next((s for s in (8, 4, 2) if s <= room), 1)
        if scale > 1:
            full = img.size
            drafted = img.draft("RGB", (img.width // scale, img.height // scale))
            if drafted is not None and img.size != full:  # (mode, (0, 0, W / s, H / s))
                img.info[_DRAFT_KEY] = (full, round(full[0] / drafted[1][2]))

    def __call__(self, img: Image.Image, sample_id: int) -> dict[str, torch.Tensor]:
        (width, height), scale = img.info.get(_DRAFT_KEY, (img.size, 1))
        box, flip = self._draw(width, height, sample_id)  # drawn at the full size, always
        if scale > 1:  # pixel i of a 1/s DCT-scaled decode covers full pixels [i*s, (i+1)*s)
            box = tuple(c / scale for c in box)
        return _render(img, self.views, box, flip)


class EvalTransform:
    """Each view's evaluation resize and crop (`eval_resize_crop`; by default the zero-shot
    protocol of docs/method.md §6: resize the short side, centre crop), identical to open_clip's
    preprocess."""

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
            masks = generate_masks(self.spec, self.grid, self.seed, self.epoch, ids)
            batch["keep_idx"] = torch.from_numpy(keep_indices(masks))
        elif self.spec is not None and "sample_id" in batch:
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


def _seed_of(*parts) -> int:
    """A 63-bit seed from its parts, stable across processes and Python versions."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def count_tar_records(tar, shard: str) -> int:
    """The number of samples `tar` (a TarShardDataset) reads from `shard`, nothing decoded.

    A plain tar is counted from its member headers alone, seeking past the data; a compressed,
    damaged or unusual one (anything the header walk does not follow exactly) is counted by
    `tar`'s own reader, so the count is always what training reads."""
    from uta_cli.io import url_to_fs
    from uta_cli.tar_shards import split_member

    fs, path = url_to_fs(shard)
    try:
        with fs.open(path, "rb") as f:
            names = _tar_member_names(f)
    except OSError:
        names = None
    if names is None:
        return sum(1 for _ in tar._read_shard(shard))
    count, key = 0, None
    for name in names:
        split = split_member(name)
        if split is not None and split[0] != key:
            count, key = count + 1, split[0]
    return count


_REGULAR = (b"0", b"\0", b"7")  # what tarfile's isfile() accepts (sparse files excepted)


def _tar_member_names(f) -> list[str] | None:
    """Names of the regular files of an uncompressed ustar/pax/GNU tar, from the 512-byte
    headers; None at anything else (compression, a bad checksum, truncation, sparse files)."""
    names: list[str] = []
    long_name: str | None = None
    pax_size: int | None = None
    while True:
        block = f.read(512)
        if len(block) < 512:
            return None
        if block.count(0) == 512:
            return names
        stored = block[148:156].split(b"\0", 1)[0].strip()
        checksum = sum(block[:148]) + 8 * 32 + sum(block[156:])
        try:
            if int(stored or b"-1", 8) != checksum:
                return None
            size = pax_size if pax_size is not None else int(
                block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:  # base-256 sizes and the like: let tarfile read it
            return None
        kind = block[156:157]
        data_blocks = (size + 511) // 512 * 512
        if kind in (b"L", b"x"):
            data = f.read(data_blocks)[:size]
            if len(data) < size:
                return None
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                fields = _pax_fields(data)
                if fields is None:
                    return None
                if "path" in fields:
                    long_name = fields["path"]
                pax_size = int(fields["size"]) if "size" in fields else None
            continue
        if kind not in _REGULAR + (b"1", b"2", b"3", b"4", b"5", b"6", b"g"):
            return None
        name = long_name
        if name is None:  # as tarfile builds it: the ustar prefix, then the name
            name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):  # (V7 directory)
            names.append(name)
        long_name, pax_size = None, None
        f.seek(data_blocks, 1)


def _pax_fields(data: bytes) -> dict[str, str] | None:
    fields, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            return None
        record = data[space + 1:pos + length - 1]
        k, _, v = record.partition(b"=")
        fields[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def plan_tar_skip(worker_shards: list[list[str]], batch_size: int, skip: int,
                  count) -> tuple[list[int], list[list[int]], int, int]:
    """Where each DataLoader worker stands after the loader has yielded `skip` batches.

    A multi-worker loader over an iterable dataset takes batches from its workers in turn,
    passing over a worker once it has no full batch left (drop_last). Replaying that on record
    counts (`count(shard)`: read, not decoded) gives, per worker, the number of records
    its batches used. Returns (records used per worker, record counts of the shards counted per
    worker, batches replayed, the worker whose turn is next); fewer than `skip` batches replayed
    means this pass ends before `skip`.
    """
    workers = len(worker_shards)
    counts: list[list[int]] = [[] for _ in range(workers)]
    used = [0] * workers
    active = [True] * workers
    done, w = 0, 0

    def has(worker: int, need: int) -> bool:
        while sum(counts[worker]) < need and len(counts[worker]) < len(worker_shards[worker]):
            counts[worker].append(count(worker_shards[worker][len(counts[worker])]))
        return sum(counts[worker]) >= need

    while done < skip and any(active):
        if active[w]:
            if has(w, used[w] + batch_size):
                used[w] += batch_size
                done += 1
            else:
                active[w] = False
        w = (w + 1) % workers
    return used, counts, done, w


class _ResumedTarShards(torch.utils.data.IterableDataset):
    """A tar-shard dataset whose workers start after the records they used before a resume:
    whole shards are passed over unopened, the rest of a shard is read without decoding."""

    def __init__(self, tar, used: list[int], counts: list[list[int]], first_worker: int):
        self.tar, self.used, self.counts = tar, used, counts
        self.first_worker = first_worker  # whose turn it is: a new loader starts with worker 0

    def __iter__(self) -> Iterator[dict | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.first_worker) % workers
        shards = self.tar.shards_for(worker, workers)
        drop, first = self.used[worker], 0
        known = self.counts[worker]
        while first < len(known) and drop >= known[first]:
            drop -= known[first]
            first += 1
        for shard, key, fields in itertools.islice(self.tar._records(shards[first:]), drop, None):
            yield self.tar._decode(shard, key, fields)


class _ShardPass(torch.utils.data.IterableDataset):
    """One pass over some shards of a tar-shard dataset, split among the DataLoader workers."""

    def __init__(self, tar, shards: list[str]):
        self.tar, self.shards = tar, shards

    def __iter__(self) -> Iterator[dict | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard, key, fields in self.tar._records(self.shards[worker::workers]):
            yield self.tar._decode(shard, key, fields)


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
        self.samples_per_epoch = samples_per_epoch if self.iterable else len(dataset)
        if self.iterable and not evaluation:
            dataset.check_split(num_workers)  # fail now, not inside a worker process

    def steps_per_epoch(self, world: int, global_micro_batch: int) -> int:
        if self.iterable and self.samples_per_epoch <= 0:
            raise UtaUsageError("Tar shards have no length: set data.samples_per_epoch to the "
                                "number of images in one pass (or use schedule.steps).")
        return self.samples_per_epoch // world // global_micro_batch

    def _loader_kwargs(self, epoch: int) -> dict:
        # An explicit generator: creating the loader draws nothing from the global RNG, so
        # dropout and drop path do not depend on when (or whether, after a resume) it was made.
        return dict(batch_size=self.batch_size, num_workers=self.num_workers,
                    collate_fn=self.collator, pin_memory=torch.cuda.is_available(),
                    drop_last=self.drop_last, persistent_workers=False,
                    generator=torch.Generator().manual_seed(
                        _seed_of("loader", self.seed, epoch, self.rank)))

    def _tar_stream(self, epoch: int, skip: int, loader_kwargs: dict) -> Iterator[dict]:
        """A stream of one epoch's shard order that starts over (in a new order) when this rank's
        shards run out, so a rank with fewer samples never leaves the others waiting in an
        all-reduce; the engine ends the epoch after `steps_per_epoch` steps on every rank.
        The first `skip` batches are passed over at the level of raw tar records (no decoding);
        the batches after them are exactly those an uninterrupted stream yields."""
        workers = max(1, self.num_workers)
        for repeat in itertools.count():
            self.dataset.set_epoch(epoch + repeat * 1_000_003)
            dataset = self.dataset
            if skip > 0 and self.dataset.shuffle_buffer > 1:  # a sample shuffle: replay it
                stream = iter(DataLoader(dataset, **loader_kwargs))
                skip -= sum(1 for _ in itertools.islice(stream, skip))
                yield from stream
                continue
            if skip > 0:
                used, counts, done, turn = plan_tar_skip(
                    [dataset.shards_for(w, workers) for w in range(workers)],
                    self.batch_size, skip, functools.partial(count_tar_records, dataset))
                if done < skip:  # this whole pass lies before the resume point
                    skip -= done
                    continue
                dataset, skip = _ResumedTarShards(self.dataset, used, counts, turn), 0
            yield from DataLoader(dataset, **loader_kwargs)

    def batches(self, epoch: int, skip: int = 0) -> Iterable[dict]:
        """Batches of one epoch for this rank, starting after `skip` batches."""
        self.transform.set_epoch(epoch)
        self.collator.epoch = epoch
        common = self._loader_kwargs(epoch)
        if self.iterable:
            return self._tar_stream(epoch, skip, common)
        if self.shuffle:
            order = epoch_order(len(self.dataset), self.seed, epoch, self.rank, self.world)
        else:
            order = list(range(self.rank, len(self.dataset) - len(self.dataset) % self.world,
                               self.world))
        return DataLoader(self.dataset, sampler=order[skip * self.batch_size:], **common)

    def one_pass(self) -> Iterator[dict]:
        """Evaluation: this rank's share of the data, each sample once, in a fixed order.

        Folders and in-memory data: samples rank, rank + world, ...; tar shards: shards rank,
        rank + world, ..., read by min(num_workers, those shards) workers, so fewer shards than
        processes x workers is fine (a process without a shard reads nothing). With `limit`,
        each process reads at most its share, ceil(limit / world), of a tar-shard source.
        """
        self.transform.set_epoch(0)
        self.collator.epoch = 0
        kwargs = {**self._loader_kwargs(0), "drop_last": False}
        if not self.iterable:
            yield from DataLoader(self.dataset, sampler=range(self.rank, len(self.dataset),
                                                              self.world), **kwargs)
            return
        mine = self.dataset.shards[self.rank::self.world]
        if not mine:
            return
        kwargs["num_workers"] = min(self.num_workers, len(mine))
        left = math.ceil(self.limit / self.world) if self.limit > 0 else None
        for batch in DataLoader(_ShardPass(self.dataset, mine), **kwargs):
            if left is not None:
                if left <= 0:
                    return
                n = len(batch.get("sample_id", ()))
                if n > left:
                    batch = {k: (v[:left] if isinstance(v, (torch.Tensor, list)) else v)
                             for k, v in batch.items()}
                left -= n
            yield batch


def open_dataset(source: str, fmt: str, transform, rank: int = 0, world: int = 1,
                 seed: int = 0):
    """An image folder (class folders or flat) or tar shards; labels are kept when present."""
    kind = detect_format(source, fmt)
    if kind == "demo":
        raise UtaUsageError("The demo source is built by uta_cli.demo_data, not opened from a "
                            "path.")
    if kind == "tar":
        return TarShardDataset(source, transform, rank=rank, world_size=world, seed=seed)
    if not source:
        raise UtaUsageError("data.source is empty. Point it at an image folder, an fsspec URL or "
                            "tar shards, e.g. --set data.source=/data/imagenet/train")
    return ImageFolderDataset(index_image_folder(source), transform)
