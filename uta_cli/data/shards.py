"""Webdataset tar shards over fsspec: shard lists (brace ranges, globs, folders) and the reader.

A sample is the group of adjacent members sharing a key (`x/0001.jpg`, `x/0001.cls`,
`x/0001.txt`). Shards are split across ranks and DataLoader workers; corrupt samples yield None
(counted by `collate_skip_none`), a damaged shard loses its rest, not the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data

from uta_cli.data.folders import (
    TAR_SUFFIXES,
    Transform,
    WarnOnce,
    decode_image,
    draft_hook,
    encoded_hook,
)
from uta_cli.errors import UtaUsageError
from uta_cli.io import is_local, url_of, url_to_fs

log = logging.getLogger(__name__)

# Image fields recognised inside webdataset shards (the part of the member name after the key).
TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")

_GLOB_MAGIC = re.compile(r"[*?[]")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")


def _range_items(body: str) -> list[str] | None:
    m = _RANGE.fullmatch(body)
    if not m:
        return None
    a, b = m.group(1), m.group(2)
    step = abs(int(m.group(3) or 1)) or 1
    start, stop = int(a), int(b)
    # Zero padding as in bash: a leading zero on either end pads to the wider end.
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
    width = max(len(a), len(b)) if padded else 0
    values = range(start, stop + 1, step) if start <= stop else range(start, stop - 1, -step)
    return [str(v).zfill(width) for v in values]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: "a-{000..002}.tar" and "{train,val}.tar", nested allowed.

    A brace group that is neither a range nor a comma list stays literal, as in bash.
    """
    search_from = 0
    while True:
        i = pattern.find("{", search_from)
        if i < 0:
            return [pattern]
        depth, j, commas = 0, -1, []
        for k in range(i, len(pattern)):
            c = pattern[k]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    j = k
                    break
            elif c == "," and depth == 1:
                commas.append(k)
        if j < 0:
            return [pattern]  # unbalanced: literal
        body = pattern[i + 1 : j]
        if commas:
            bounds = [i, *commas, j]
            items: list[str] | None = [
                pattern[bounds[n] + 1 : bounds[n + 1]] for n in range(len(bounds) - 1)
            ]
        else:
            items = _range_items(body)
        if items is None:
            search_from = i + 1
            continue
        head, tail = pattern[:i], pattern[j + 1 :]
        out: list[str] = []
        for item in items:
            out.extend(expand_braces(head + item + tail))
        return out


def expand_shard_urls(urls: str | list[str]) -> list[str]:
    """Turn a shard spec into a list of shard URLs.

    Each entry may use brace expansion, be a glob (`data/*.tar`, `s3://b/train-*.tar`) or a
    folder, whose .tar files are taken (sorted). Local shards are checked to exist here.
    """
    specs = [urls] if isinstance(urls, str) else list(urls)
    if not specs:
        raise UtaUsageError("No tar shards given. Pass a list, a brace pattern or a folder.")
    out: list[str] = []
    missing: list[str] = []
    for spec in specs:
        for url in expand_braces(str(spec)):
            fs, path = url_to_fs(url)
            local = is_local(fs)
            if _GLOB_MAGIC.search(path):
                found = sorted(p for p in fs.glob(path) if p.endswith(TAR_SUFFIXES))
                if not found:
                    raise UtaUsageError(
                        f"No tar shards match {url!r}. Check the pattern, for example "
                        "data/train-*.tar or s3://bucket/train-{0000..0099}.tar."
                    )
                out.extend(url_of(fs, p) for p in found)
            elif not url.endswith(TAR_SUFFIXES) and fs.isdir(path):
                found = sorted(p for p in fs.find(path) if p.endswith(TAR_SUFFIXES))
                if not found:
                    raise UtaUsageError(
                        f"Folder {url!r} holds no tar shards (*.tar, *.tar.gz, *.tgz). For a "
                        "folder of images use the image-folder reader instead."
                    )
                out.extend(url_of(fs, p) for p in found)
            else:
                # Remote shards are not checked one by one here (a request each); a missing one
                # is reported when it is opened.
                if local and not os.path.isfile(path):
                    missing.append(url)
                out.append(url_of(fs, path))
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (
            f" and {len(missing) - 3} more" * (len(missing) > 3)
        )
        raise UtaUsageError(
            f"{len(missing)} tar shard(s) do not exist: {shown}. Check the path or the brace "
            "range, for example data/train-{0000..0099}.tar."
        )
    return out


def sample_id_for(shard_url: str, key: str) -> int:
    """Stable non-negative int64 id of a sample: the same on every run, process and machine.

    (Python's hash() of a str is salted per process, so it cannot be used.)
    """
    digest = hashlib.blake2b(f"{shard_url}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def split_member(name: str) -> tuple[str, str] | None:
    """Member name -> (key, field): key up to the first dot of the basename, directory included."""
    d, base = os.path.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None  # dot-files (e.g. macOS ._ forks) and members without a field are not data
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _pick_image_field(fields: dict[str, bytes]) -> str | None:
    for f in TAR_IMAGE_FIELDS:
        if f in fields:
            return f
    # e.g. "left.jpg": take any field whose last suffix is an image type.
    for f in sorted(fields):
        if f.rsplit(".", 1)[-1] in TAR_IMAGE_FIELDS:
            return f
    return None


class TarShardDataset(torch.utils.data.IterableDataset):
    """Streams webdataset-layout tar shards, split across ranks and DataLoader workers.

    Each sample is the group of adjacent members sharing a key; it needs an image field
    (jpg/jpeg/png/webp) and may have `.cls` (integer label as text) and `.txt` (caption).
    Every (rank, worker) slot reads whole shards: after a deterministic shuffle by (seed, epoch),
    slot s = rank * num_workers + worker_id gets shards[s :: world_size * num_workers].
    With a persistent DataLoader, `set_epoch` does not reach the workers' copies; create the
    loader's iterator per epoch (the default) for shard order to change with the epoch.
    """

    def __init__(
        self,
        urls: str | list[str],
        transform: Transform,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        interleave: int = 8,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise UtaUsageError(f"Invalid rank {rank} for world size {world_size}.")
        self.shards = expand_shard_urls(urls)
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        # Sample-level shuffle inside each slot (0 = stored order): `interleave` shards read at
        # once, through a buffer of `shuffle_buffer` raw (encoded) records (`sample_stream`).
        self.shuffle_buffer = shuffle_buffer
        self.interleave = max(1, interleave)
        self.epoch = 0
        self._warn = WarnOnce(log)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check_split(self, num_workers: int) -> None:
        """Raise UtaUsageError unless every (rank, worker) slot gets at least one shard.

        __iter__ checks this too, but an error raised inside a DataLoader worker reaches the
        main process wrapped with a traceback; call this before building the loader.
        """
        workers = max(1, num_workers)
        slots = self.world_size * workers
        if len(self.shards) < slots:
            raise UtaUsageError(
                f"{len(self.shards)} tar shard(s) cannot feed {self.world_size} process(es) x "
                f"{workers} DataLoader worker(s) = {slots} reader slots; each slot reads whole "
                f"shards and needs at least one. Use at least {slots} shards (re-shard the data "
                "into smaller tars) or fewer DataLoader workers or processes."
            )

    def shard_order(self, epoch: int | None = None) -> list[str]:
        """All shards in this epoch's order (the same on every rank and worker)."""
        shards = list(self.shards)
        if self.shuffle_shards:
            # A str seed is hashed with SHA-512 by random, so the order is stable everywhere.
            e = self.epoch if epoch is None else epoch
            random.Random(f"uta-shards-{self.seed}-{e}").shuffle(shards)
        return shards

    def shards_for(self, worker_id: int = 0, num_workers: int = 1) -> list[str]:
        """The shards that one (rank, worker) slot reads this epoch."""
        self.check_split(num_workers)
        workers = max(1, num_workers)
        slot = self.rank * workers + worker_id
        return self.shard_order()[slot :: self.world_size * workers]

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard, key, fields in self.sample_stream(self.shards_for(worker_id, num_workers),
                                                     worker_id):
            yield self._decode(shard, key, fields)

    def sample_stream(self, shards: list[str], worker_id: int
                      ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """The raw (undecoded) records of one (rank, worker) slot in training order.

        With shuffle_buffer 0: stored order, shard after shard. Otherwise `interleave` shards are
        read at once, a record from each in turn, into a bounded buffer of `shuffle_buffer`
        records from which each next record is drawn at random, keyed by (seed, epoch, rank,
        worker). Why interleave rather than a bigger buffer: shards are often packed class by
        class (ImageNet has about 1,300 images a class, about one shard), and a buffer that spans
        several whole shards would hold thousands of encoded images per worker (80 workers on a
        node x 4,000 x 110 KB = 35 GB); reading 8 shards at once mixes 8 classes into every
        buffer at the cost of 8 open files. The draws depend only on the record count, never on
        the bytes, so a resume replays them on raw records without decoding (data/shard_resume).
        """
        if self.shuffle_buffer <= 1:
            return self._records(shards)
        rng = random.Random(f"uta-samples-{self.seed}-{self.epoch}-{self.rank}-{worker_id}")
        return _shuffled(self._interleaved(shards), self.shuffle_buffer, rng)

    def _interleaved(self, shards: list[str]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """Records of `shards` with `interleave` of them open at once, one record of each in
        turn; a finished shard's place goes to the next shard of the list."""
        open_ = [self._read_shard(s) for s in shards[:self.interleave]]
        following = iter(shards[self.interleave:])
        while open_:
            i = 0
            while i < len(open_):
                record = next(open_[i], None)
                if record is not None:
                    yield record
                    i += 1
                    continue
                shard = next(following, None)
                if shard is None:
                    del open_[i]
                else:
                    open_[i] = self._read_shard(shard)

    def _records(self, shards: list[str]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        for shard in shards:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: str) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        fs, path = url_to_fs(shard)  # fsspec's instance cache is per process, so fork-safe
        key: str | None = None
        fields: dict[str, bytes] = {}
        try:
            f = fs.open(path, "rb")
        except FileNotFoundError:
            raise UtaUsageError(
                f"Tar shard {shard!r} does not exist. Check the shard list or brace range."
            ) from None
        try:
            with f, tarfile.open(fileobj=f, mode="r|*") as tar:
                # Streaming mode: members are read in order, never the whole shard at once.
                for member in tar:
                    if not member.isfile():
                        continue
                    split = split_member(member.name)
                    if split is None:
                        continue
                    k, fld = split
                    if k != key:
                        if key is not None and fields:
                            yield shard, key, fields
                        key, fields = k, {}
                    fobj = tar.extractfile(member)
                    if fobj is not None:
                        fields[fld] = fobj.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            # A damaged shard loses its remaining samples, not the run.
            log.warning(
                "Tar shard %s is damaged or unreadable (%s); skipping the rest of it", shard, e
            )
            return
        if key is not None and fields:
            yield shard, key, fields

    def _decode(self, shard: str, key: str, fields: dict[str, bytes]) -> dict[str, Any] | None:
        sample_id = sample_id_for(shard, key)
        image_field = _pick_image_field(fields)
        if image_field is None:
            self._warn(
                "Skipping sample %r in %s: no image member (%s)",
                key,
                shard,
                "/".join(TAR_IMAGE_FIELDS),
            )
            return None
        label = -1
        if "cls" in fields:
            try:
                label = int(fields["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                self._warn("Skipping sample %r in %s: .cls is not an integer", key, shard)
                return None
        caption = fields["txt"].decode("utf-8", errors="replace").strip() if "txt" in fields else ""
        encoded = encoded_hook(self.transform, fields[image_field], sample_id)
        if encoded is not None:
            return {"sample_id": sample_id, "label": label, "caption": caption, **encoded}
        try:
            image = decode_image(fields[image_field], draft_hook(self.transform, sample_id))
        except ValueError as e:
            self._warn("Skipping corrupt image %r in %s: %s", key, shard, e)
            return None
        return {
            "sample_id": sample_id,
            "label": label,
            "caption": caption,
            **self.transform(image, sample_id),
        }


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Bounded-buffer shuffle of a stream (webdataset style)."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf
