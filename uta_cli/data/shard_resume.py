"""Resuming a tar-shard stream mid-epoch without decoding what lies before the resume point.

Tar shards have no random access, so a resume at batch k replays the DataLoader's round-robin
over its workers on record counts (read from the tar headers, nothing decoded), then starts each
worker after the records its batches used: whole shards are passed over unopened. With the
sample shuffle (data.shuffle_buffer) a worker replays its interleaving and buffer draws on raw
records (read, never decoded) up to that point instead.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import torch
import torch.utils.data
from torch.utils.data import DataLoader

from uta_cli.data.shards import split_member
from uta_cli.io import url_to_fs


def tar_stream(tar, epoch: int, skip: int, batch_size: int, num_workers: int,
               loader_kwargs: dict) -> Iterator[dict]:
    """Batches of a tar-shard dataset for one epoch: its shard order, started over (in a new
    order) when this rank's shards run out, so a rank with fewer samples never leaves the others
    waiting in an all-reduce; the engine ends the epoch after `steps_per_epoch` steps on every
    rank. The first `skip` batches are passed over at the level of raw tar records (no
    decoding); the batches after them are exactly those an uninterrupted stream yields."""
    workers = max(1, num_workers)
    for repeat in itertools.count():
        tar.set_epoch(epoch + repeat * 1_000_003)
        dataset = tar
        if skip > 0:
            used, counts, done, turn = plan_tar_skip(
                [dataset.shards_for(w, workers) for w in range(workers)],
                batch_size, skip, functools.partial(count_tar_records, dataset))
            if done < skip:  # this whole pass lies before the resume point
                skip -= done
                continue
            dataset, skip = _ResumedTarShards(tar, used, counts, turn), 0
        yield from DataLoader(dataset, **loader_kwargs)


def count_tar_records(tar, shard: str) -> int:
    """The number of samples `tar` (a TarShardDataset) reads from `shard`, nothing decoded.

    A plain tar is counted from its member headers alone, seeking past the data; a compressed,
    damaged or unusual one (anything the header walk does not follow exactly) is counted by
    `tar`'s own reader, so the count is always what training reads."""
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
        if self.tar.shuffle_buffer > 1:
            # The shuffle's draws depend on the record count only: replay them on raw records
            # (read, not decoded) and start after those this worker's batches used.
            stream = self.tar.sample_stream(shards, worker)
            for shard, key, fields in itertools.islice(stream, self.used[worker], None):
                yield self.tar._decode(shard, key, fields)
            return
        drop, first = self.used[worker], 0
        known = self.counts[worker]
        while first < len(known) and drop >= known[first]:
            drop -= known[first]
            first += 1
        for shard, key, fields in itertools.islice(self.tar._records(shards[first:]), drop, None):
            yield self.tar._decode(shard, key, fields)
