"""`uta shards`: a source (image folder, CSV/TSV list, tar shards) written as pre-resized
webdataset shards in CLIP_benchmark's layout, resumable, with a manifest of what was written.

Samples are listed in a fixed order (sorted folders, file order, tar order), optionally put in a
seeded permutation, and cut into shards of `shard_size`. Shard i of a split always holds the
same samples, so a rerun keeps the shards that exist (each was renamed into place whole) and
writes the rest; the manifest written first records the options and a fingerprint of the
listing, and a rerun with other options or another source is refused.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass

from rich.console import Console

from uta_cli.data.shard_writer import (
    FORMAT,
    MANIFEST,
    Listing,
    Ref,
    encode_image,
    list_source,
    output_url,
    read_bytes,
    write_shard,
)
from uta_cli.errors import UtaUsageError
from uta_cli.io import atomic_write_json, atomic_write_text, remove
from uta_cli.progress import progress_bar

_PROGRESS = ".progress"  # per-shard counts of an unfinished run (removed when complete)


@dataclass
class ShardOptions:
    """What decides the bytes written; a rerun must give the same (workers may differ)."""

    short_side: int = 0  # resize so the short side is this (never upscale); 0: keep
    max_side: int = 0  # or: so the long side is at most this
    quality: int = 95  # JPEG quality of re-encoded images
    shard_size: int = 1000  # samples per shard
    shuffle: bool = False  # a seeded permutation before writing
    seed: int = 0
    split: str = "train"  # the split of a source without split folders
    classnames: str = ""  # a file of class names (tar shards or lists with integer labels)


def check_options(opts: ShardOptions, workers: int) -> None:
    if opts.short_side and opts.max_side:
        raise UtaUsageError("--short-side and --max-side both given; choose one (short side "
                            "256-384 for training crops, max side for keeping whole images).")
    if opts.short_side < 0 or opts.max_side < 0:
        raise UtaUsageError("--short-side and --max-side are pixel lengths (0: keep the size).")
    if not 1 <= opts.quality <= 100:
        raise UtaUsageError(f"--quality {opts.quality} is not a JPEG quality; use 1-100 (95 "
                            f"keeps detail, 90 halves the bytes).")
    if opts.shard_size < 1 or workers < 1:
        raise UtaUsageError("--shard-size and --workers must be at least 1.")
    if not opts.split or "/" in opts.split:
        raise UtaUsageError(f"--split {opts.split!r} must be a folder name such as train.")


def _fingerprint(listing: Listing) -> str:
    h = hashlib.sha256()
    for split, refs in sorted(listing.splits.items()):
        for r in refs:
            h.update(f"{split}\0{r.where}\0{r.label}\0{r.caption}\n".encode())
    h.update("\n".join(listing.classes).encode())
    return h.hexdigest()[:16]


def plan(listing: Listing, opts: ShardOptions) -> dict[str, list[list[tuple[str, Ref]]]]:
    """Each split's shards: lists of (key, sample). Keys are the output position, zero-padded:
    no dots, sorted as written."""
    shards = {}
    for split, refs in listing.splits.items():
        order = list(range(len(refs)))
        if opts.shuffle:
            random.Random(f"uta-shards/{opts.seed}/{split}").shuffle(order)
        width = max(6, len(str(len(refs))))
        keyed = [(f"{pos:0{width}d}", refs[i]) for pos, i in enumerate(order)]
        shards[split] = [keyed[i:i + opts.shard_size]
                         for i in range(0, len(keyed), opts.shard_size)]
    return shards


def write_one(job: tuple) -> dict:
    """One shard: every image re-encoded, the unreadable skipped; the tar renamed into place,
    then its counts written beside the run."""
    out, split, index, items, opts = job
    samples, skipped = [], []
    for key, ref in items:
        try:
            jpeg = encode_image(read_bytes(ref.where), opts.short_side, opts.max_side,
                                opts.quality)
        except (OSError, ValueError) as e:
            skipped.append(f"{ref.name()}: {e}"[:300])
            continue
        samples.append((key, jpeg, ref.label, ref.caption))
    write_shard(os.path.join(out, split, f"{index}.tar"), samples)
    stats = {"split": split, "shard": index, "samples": len(samples), "skipped": len(skipped),
             "skipped_examples": skipped[:3],
             "labels": dict(Counter(str(s[2]) for s in samples if s[2] >= 0))}
    atomic_write_json(os.path.join(out, _PROGRESS, f"{split}-{index}.json"), stats)
    return stats


def _done(out: str, split: str, index: int, previous: dict) -> dict | None:
    """The counts of a finished shard (from this run's progress or a complete manifest)."""
    if not os.path.isfile(os.path.join(out, split, f"{index}.tar")):
        return None
    path = os.path.join(out, _PROGRESS, f"{split}-{index}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    shards = previous.get("splits", {}).get(split, {}).get("shard_stats", [])
    return shards[index] if index < len(shards) else None


def _check_rerun(out: str, record: dict) -> dict:
    """The existing manifest of OUT (empty for a new folder); a different run is refused."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(out) and os.listdir(out):
            raise UtaUsageError(f"{out} exists and holds files but no {MANIFEST}: it was not "
                                f"written by uta shards. Choose a new output folder.")
        return {}
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    changed = [f"{k}: {previous.get('options', {}).get(k)!r} -> {v!r}"
               for k, v in record["options"].items() if previous.get("options", {}).get(k) != v]
    for what in ("source", "fingerprint"):
        if previous.get(what) != record[what]:
            changed.append(f"{what}: {previous.get(what)!r} -> {record[what]!r}")
    if changed:
        raise UtaUsageError(
            f"{out} was written by uta shards with other settings ({'; '.join(changed)}). "
            f"Rerun with the same source and options to resume it, or write to a new folder.")
    return previous


def make_shards(src: str, out: str, opts: ShardOptions, workers: int = 1,
                command: str = "", console: Console | None = None) -> dict:
    """Write SRC as shards under OUT (see the module docstring); returns the manifest."""
    console = console or Console()
    check_options(opts, workers)
    out = output_url(out)
    listing = list_source(src, opts.split)
    if opts.classnames:
        with open(opts.classnames, encoding="utf-8") as f:
            listing.classes = [line.strip() for line in f if line.strip()]
    top = max((r.label for refs in listing.splits.values() for r in refs), default=-1)
    if listing.classes and top >= len(listing.classes):
        raise UtaUsageError(f"Label {top} needs at least {top + 1} class names; "
                            f"{opts.classnames or src} gives {len(listing.classes)}.")
    record = {"format": FORMAT, "complete": False, "source": _source_id(src),
              "options": dataclasses.asdict(opts), "fingerprint": _fingerprint(listing),
              "command": command}
    previous = _check_rerun(out, record)
    os.makedirs(os.path.join(out, _PROGRESS), exist_ok=True)
    atomic_write_json(os.path.join(out, MANIFEST), {**previous, **record, "complete": False})
    shards = plan(listing, opts)
    stats: dict[tuple[str, int], dict] = {}
    jobs = []
    for split, parts in shards.items():
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for stale in glob.glob(os.path.join(out, split, ".*.tmp*")):  # an interrupted write
            remove(stale)
        for i, items in enumerate(parts):
            done = _done(out, split, i, previous)
            if done is not None:
                stats[split, i] = done
            else:
                jobs.append((out, split, i, items, opts))
    total = sum(len(j[3]) for j in jobs)
    if stats:
        console.print(f"resuming: {len(stats)} shard(s) already written, {len(jobs)} to write")
    with progress_bar(console, True, total, "images") as advance:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                s = write_one(job)
                stats[s["split"], s["shard"]] = s
                advance(len(job[3]))
        else:
            # fork: the workers need nothing but this module, and start at once
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for s in pool.imap_unordered(write_one, jobs):
                    stats[s["split"], s["shard"]] = s
                    advance(s["samples"] + s["skipped"])
    manifest = _manifest(record, listing, shards, stats)
    for split, parts in shards.items():
        atomic_write_text(os.path.join(out, split, "nshards.txt"), f"{len(parts)}\n")
    if listing.classes:
        atomic_write_text(os.path.join(out, "classnames.txt"), "\n".join(listing.classes) + "\n")
    atomic_write_json(os.path.join(out, MANIFEST), manifest)
    remove(os.path.join(out, _PROGRESS))
    return manifest


def _source_id(src: str) -> str:
    return os.path.abspath(src) if "://" not in src and os.path.exists(src) else src


def _manifest(record: dict, listing: Listing, shards: dict, stats: dict) -> dict:
    splits = {}
    for split, parts in shards.items():
        mine = [stats[split, i] for i in range(len(parts))]
        labels: Counter = Counter()
        for s in mine:
            labels.update({int(k): v for k, v in s["labels"].items()})
        entry = {"samples": sum(s["samples"] for s in mine),
                 "skipped": sum(s["skipped"] for s in mine), "shards": len(parts),
                 "skipped_examples": [e for s in mine for e in s["skipped_examples"]][:5],
                 "shard_stats": mine}
        if labels:
            names = listing.classes
            entry["classes"] = {(names[k] if k < len(names) else str(k)): labels[k]
                                for k in sorted(labels)}
        splits[split] = entry
    return {**record, "complete": True, "kind": listing.kind, "classnames": listing.classes,
            "splits": splits}


def summary_lines(manifest: dict, out: str) -> list[str]:
    lines = []
    for split, s in manifest["splits"].items():
        skipped = f", {s['skipped']} unreadable image(s) skipped" if s["skipped"] else ""
        lines.append(f"{out}/{split}: {s['samples']} samples in {s['shards']} shard(s){skipped}")
        lines += [f"  skipped: {e}" for e in s["skipped_examples"]]
    if manifest["classnames"]:
        lines.append(f"{out}/classnames.txt: {len(manifest['classnames'])} classes")
    return lines
