"""Image readers over fsspec: image folders (class or flat layout) and webdataset tar shards.

Both readers are used by pre-training (labels ignored) and by zero-shot evaluation (labels used).
Paths may be local or any fsspec URL (file://, memory://, s3://, gs://, ...). Bad input raises
`UtaUsageError` with the problem and the fix; corrupt images never crash a run: the datasets yield
None for them and `collate_skip_none` counts them per batch as `num_skipped`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.utils.data
from PIL import Image

from uta_cli.errors import UtaUsageError
from uta_cli.io import is_local, url_to_fs

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageFolderIndex",
    "TarShardDataset",
    "collate_skip_none",
    "decode_image",
    "expand_braces",
    "expand_shard_urls",
    "index_image_folder",
    "sample_id_for",
]

log = logging.getLogger(__name__)

# Matched case-insensitively (ImageNet ships `.JPEG`).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Image fields recognised inside webdataset shards (the part of the member name after the key).
TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

Transform = Callable[[Image.Image, int], dict[str, Any]]

_LAYOUT_HELP = (
    "Expected layouts: 'classes' (ImageNet style) ROOT/<class>/<image>, for example "
    "val/n01440764/ILSVRC2012_val_00000293.JPEG, one sub-folder per class; or 'flat': images "
    "anywhere under ROOT (labels are -1). Image extensions looked for (any case): "
    + ", ".join(IMAGE_EXTENSIONS)
    + "."
)
# Folder entries that are never data: dot-files (.DS_Store, ._x.jpg AppleDouble forks,
# .ipynb_checkpoints) and the folder macOS adds to zip archives.
_IGNORED_NAMES = ("__MACOSX",)


# --------------------------------------------------------------------------------------------
# fsspec helpers


def _to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local files stay plain absolute paths (readable by anything); other filesystems get their
    # protocol back so each entry can be opened on its own.
    if is_local(fs):
        return os.path.normpath(path)
    return fs.unstrip_protocol(path)


def _is_ignored(rel_parts: list[str]) -> bool:
    return any(p.startswith(".") or p in _IGNORED_NAMES for p in rel_parts)


def _has_image_ext(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------
# image folders


@dataclass
class ImageFolderIndex:
    """A listed image folder: full file URLs in a fixed order, with their labels."""

    root: str  # normalised URL or path
    files: list[str] = field(default_factory=list)  # full fsspec URLs/paths, sorted
    labels: list[int] = field(default_factory=list)  # -1 for the flat layout
    classes: list[str] = field(default_factory=list)  # sorted class folder names ([] for flat)

    def __len__(self) -> int:
        return len(self.files)


def index_image_folder(url: str, layout: str = "auto") -> ImageFolderIndex:
    """List the images of a folder (local path or fsspec URL).

    layout: "classes" (url/<class>/<image>; images deeper inside a class folder also count for
    that class), "flat" (all images under url, labels -1) or "auto" (classes when every image
    sits exactly one folder below url, flat otherwise).
    """
    if layout not in ("auto", "classes", "flat"):
        raise UtaUsageError(
            f"Unknown image folder layout {layout!r}. Use one of: auto, classes, flat."
        )
    fs, path = url_to_fs(url)
    path = path.rstrip("/") or "/"
    if is_local(fs):
        path = os.path.normpath(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UtaUsageError(
            f"Image folder {url!r} does not exist. Check the path or URL (and credentials for an "
            f"object store). {_LAYOUT_HELP}"
        ) from None
    except OSError as e:
        raise UtaUsageError(
            f"Cannot read image folder {url!r}: {e}. Check the path and access."
        ) from None
    if info.get("type") != "directory":
        hint = (
            " It looks like a tar shard: pass it as tar shards instead."
            if url.endswith(TAR_SUFFIXES)
            else ""
        )
        raise UtaUsageError(f"{url!r} is a file, not a folder of images.{hint} {_LAYOUT_HELP}")

    # One recursive listing: a walk per folder costs one request per class on object stores.
    try:
        entries = fs.find(path, withdirs=True, detail=True)
    except OSError as e:
        raise UtaUsageError(
            f"Cannot list image folder {url!r}: {e}. Check the path and access."
        ) from None
    prefix = path.rstrip("/") + "/"
    images: list[tuple[list[str], str]] = []  # (relative parts, fs path)
    subdirs: set[str] = set()
    n_other = 0
    for name, meta in entries.items():
        if not name.startswith(prefix):
            continue  # the root itself
        parts = name[len(prefix) :].strip("/").split("/")
        if _is_ignored(parts):
            continue
        if meta.get("type") == "directory":
            subdirs.add(parts[0])
            continue
        if len(parts) > 1:
            subdirs.add(parts[0])
        if _has_image_ext(parts[-1]):
            images.append((parts, name))
        else:
            n_other += 1

    root = _to_url(fs, path)
    if not images:
        other = ""
        if n_other:
            other = f" It holds {n_other} other file(s)"
            if any(n.endswith(TAR_SUFFIXES) for n in entries):
                other += ", including .tar files: pass those as tar shards instead"
            other += "."
        raise UtaUsageError(f"No images found in {url!r}.{other} {_LAYOUT_HELP}")

    if layout == "auto":
        one_level = all(len(parts) == 2 for parts, _ in images)
        layout = "classes" if one_level and subdirs else "flat"

    # Sorting by path components keeps each folder's files together and is the same on every
    # filesystem and every run.
    images.sort(key=lambda item: item[0])
    if layout == "flat":
        return ImageFolderIndex(
            root=root,
            files=[_to_url(fs, p) for _, p in images],
            labels=[-1] * len(images),
            classes=[],
        )

    at_root = [parts[0] for parts, _ in images if len(parts) == 1]
    if at_root:
        raise UtaUsageError(
            f"{len(at_root)} image(s) in {url!r} sit directly in the root folder (for example "
            f"{at_root[0]!r}), but the 'classes' layout needs every image inside a class "
            f"sub-folder. Move them into class folders, or use the 'flat' layout. {_LAYOUT_HELP}"
        )
    with_images = {parts[0] for parts, _ in images}
    empty = sorted(subdirs - with_images)
    if empty:
        shown = ", ".join(repr(e) for e in empty[:5]) + (
            f" and {len(empty) - 5} more" * (len(empty) > 5)
        )
        raise UtaUsageError(
            f"Class folder(s) without images in {url!r}: {shown}. Every class folder needs at "
            "least one image (a missing class would shift the label of every class after it): "
            f"add images, or remove the folder. {_LAYOUT_HELP}"
        )
    classes = sorted(subdirs)
    class_index = {c: i for i, c in enumerate(classes)}
    return ImageFolderIndex(
        root=root,
        files=[_to_url(fs, p) for _, p in images],
        labels=[class_index[parts[0]] for parts, _ in images],
        classes=classes,
    )


def folder_classname(folder: str) -> str:
    """A class folder's name as a class name: underscores as spaces."""
    return folder.replace("_", " ").strip()


def match_classnames(names: list[str], folders: list[str], source: str,
                     shown: int = 5) -> tuple[list[str], str]:
    """Class names from a file, put in label order (the folders' sorted order), plus a line to
    print. When the file lists exactly the folder names (after `_` -> space) in another order,
    each name goes to its folder's label; when it lists other names, they keep the file's order
    and the first pairings are shown so a wrong order is seen. Equal lengths are assumed (a
    length mismatch is the caller's error)."""
    keys = [folder_classname(n) for n in names]
    by_folder = [folder_classname(f) for f in folders]
    if keys == by_folder:
        return list(names), ""
    if sorted(keys) == sorted(by_folder) and len(set(keys)) == len(keys):
        where = {k: i for i, k in enumerate(keys)}
        return ([names[where[k]] for k in by_folder],
                f"class names in {source} are the folder names in another order: mapped by name "
                f"(label i = folder i of the sorted folders).")
    pairs = ", ".join(f"{f!r} -> {n!r}" for f, n in zip(folders[:shown], names[:shown]))
    return (list(names),
            f"class names in {source} are not the folder names: paired in file order with the "
            f"sorted folders ({pairs}{', ...' if len(names) > shown else ''}). Check that line "
            f"i names folder i.")


def decode_image(data: bytes, draft: Callable[[Image.Image], None] | None = None
                 ) -> Image.Image:
    """Decode image bytes to an RGB PIL image; ValueError on corrupt or truncated data.

    draft: called on the opened image before its pixels are decoded (a training transform
    asking a JPEG for a reduced-scale decode).
    """
    try:
        img = Image.open(io.BytesIO(data))
        if draft is not None:
            draft(img)
        # Image.open only reads the header: load() decodes the pixels, so a truncated file
        # fails here rather than inside a transform.
        img.load()
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # avoids PIL's warning for palette + transparency
        return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from e


def _draft_hook(transform: Any, sample_id: int) -> Callable[[Image.Image], None] | None:
    """The transform's reduced-scale JPEG decode for this sample, if it has one (training)."""
    draft = getattr(transform, "draft", None)
    return None if draft is None else functools.partial(draft, sample_id=sample_id)


class _WarnOnce:
    """Warn about the first bad item in each process only (each DataLoader worker is one)."""

    def __init__(self) -> None:
        self._pid: int | None = None

    def __call__(self, msg: str, *args: Any) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            log.warning(
                msg + " (further bad images in this process are skipped silently and counted)",
                *args,
            )
        else:
            log.debug(msg, *args)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Map-style dataset over an `ImageFolderIndex`; None for images that cannot be read."""

    def __init__(self, index: ImageFolderIndex, transform: Transform) -> None:
        self.index = index
        self.transform = transform
        self._warn = _WarnOnce()
        # The filesystem is opened lazily in each process: clients of object stores hold
        # sessions and threads that must not be shared across fork or pickled to workers.
        self._fs: fsspec.AbstractFileSystem | None = None
        self._fs_pid: int | None = None

    def __len__(self) -> int:
        return len(self.index.files)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None
        state["_fs_pid"] = None
        return state

    def _filesystem(self) -> fsspec.AbstractFileSystem:
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, _ = url_to_fs(self.index.root)
            self._fs_pid = os.getpid()
        return self._fs

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        url = self.index.files[i]
        try:
            fs = self._filesystem()
            data = fs.cat_file(fs._strip_protocol(url))
            image = decode_image(data, _draft_hook(self.transform, i))
        except (OSError, ValueError) as e:
            self._warn("Skipping unreadable image %s: %s", url, e)
            return None
        return {"sample_id": i, "label": self.index.labels[i], **self.transform(image, i)}


# --------------------------------------------------------------------------------------------
# tar shards

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
                out.extend(_to_url(fs, p) for p in found)
            elif not url.endswith(TAR_SUFFIXES) and fs.isdir(path):
                found = sorted(p for p in fs.find(path) if p.endswith(TAR_SUFFIXES))
                if not found:
                    raise UtaUsageError(
                        f"Folder {url!r} holds no tar shards (*.tar, *.tar.gz, *.tgz). For a "
                        "folder of images use the image-folder reader instead."
                    )
                out.extend(_to_url(fs, p) for p in found)
            else:
                # Remote shards are not checked one by one here (a request each); a missing one
                # is reported when it is opened.
                if local and not os.path.isfile(path):
                    missing.append(url)
                out.append(_to_url(fs, path))
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


def _split_member(name: str) -> tuple[str, str] | None:
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
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise UtaUsageError(f"Invalid rank {rank} for world size {world_size}.")
        self.shards = expand_shard_urls(urls)
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        # Optional sample-level shuffle inside each slot (0 = tar order); buffers raw bytes.
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self._warn = _WarnOnce()

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
        shards = self.shards_for(worker_id, num_workers)
        records = self._records(shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"uta-samples-{self.seed}-{self.epoch}-{self.rank}-{worker_id}")
            records = _shuffled(records, self.shuffle_buffer, rng)
        for shard, key, fields in records:
            yield self._decode(shard, key, fields)

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
                    split = _split_member(member.name)
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
        try:
            image = decode_image(fields[image_field], _draft_hook(self.transform, sample_id))
        except ValueError as e:
            self._warn("Skipping corrupt image %r in %s: %s", key, shard, e)
            return None
        label = -1
        if "cls" in fields:
            try:
                label = int(fields["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                self._warn("Skipping sample %r in %s: .cls is not an integer", key, shard)
                return None
        caption = fields["txt"].decode("utf-8", errors="replace").strip() if "txt" in fields else ""
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


# --------------------------------------------------------------------------------------------
# collation


def collate_skip_none(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """default_collate over the non-None items, plus "num_skipped" (the number of None items).

    When every item is None the batch is just {"num_skipped": n}; the caller skips the step.
    """
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return {"num_skipped": skipped}
    out = torch.utils.data.default_collate(kept)
    out["num_skipped"] = skipped
    return out
