"""Writing webdataset tar shards: what a source holds (image folders, CSV/TSV lists, tar shards)
listed as samples, each image re-encoded at a stored size, and one shard written atomically.

The layout is CLIP_benchmark's (`OUT/<split>/0.tar` .. `N-1.tar`, `nshards.txt`,
`OUT/classnames.txt`); `OUT/manifest.json` holds the counts. `shard_manifest` finds that manifest
for a training or evaluation source given as `OUT/<split>`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

from PIL import Image

from uta_cli.data.folders import (
    TAR_SUFFIXES,
    folder_classname,
    index_image_folder,
)
from uta_cli.data.shards import _pick_image_field, expand_shard_urls, split_member
from uta_cli.errors import UtaUsageError
from uta_cli.io import is_local, url_of, url_to_fs

MANIFEST = "manifest.json"
FORMAT = "uta-shards/1"
SPLIT_NAMES = ("train", "val", "validation", "test")
LIST_SUFFIXES = (".csv", ".tsv")
_PATH_COLUMNS = ("filepath", "image", "path", "file", "filename", "file_name", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "title", "txt")
_LABEL_COLUMNS = ("label", "class", "cls", "target")


# --------------------------------------------------------------------------------------------
# samples of a source


@dataclass(frozen=True)
class Ref:
    """One sample of a source: where its image bytes are, and its label and caption."""

    where: tuple  # ("file", url) or ("tar", shard url, offset, size)
    label: int = -1
    caption: str | None = None

    def name(self) -> str:
        return self.where[1] if self.where[0] == "file" else f"{self.where[1]}@{self.where[2]}"


@dataclass
class Listing:
    """What a source holds: its samples per split and the class names (label order)."""

    kind: str  # folder | list | tar
    splits: dict[str, list[Ref]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)


def _remap(index, classes: list[str]) -> list[int]:
    where = {c: i for i, c in enumerate(classes)}
    return [where[index.classes[lab]] if lab >= 0 else -1 for lab in index.labels]


def _list_folder(src: str, split: str) -> Listing:
    fs, path = url_to_fs(src)
    subdirs = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)
                     if fs.isdir(p) and not os.path.basename(p.rstrip("/")).startswith("."))
    if subdirs and all(s in SPLIT_NAMES for s in subdirs):  # train/, val/, test/ of classes
        indexes = {s: index_image_folder(f"{src.rstrip('/')}/{s}") for s in subdirs}
    else:
        indexes = {split: index_image_folder(src)}
    classes = sorted({c for index in indexes.values() for c in index.classes})
    out = Listing("folder", classes=[folder_classname(c) for c in classes])
    for name, index in indexes.items():
        labels = _remap(index, classes)
        out.splits[name] = [Ref(("file", f), lab) for f, lab in zip(index.files, labels)]
    return out


def _column(header: list[str], options: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[o] for o in options if o in lowered), None)


def _list_table(src: str, split: str) -> Listing:
    """A CSV/TSV with a header: an image path column and a caption and/or a label column."""
    fs, path = url_to_fs(src)
    try:
        with fs.open(path, "r", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if src.lower().endswith(".tsv")
                                       else ","))
    except FileNotFoundError:
        raise UtaUsageError(f"{src} does not exist.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UtaUsageError(f"Cannot read {src}: {e}") from None
    header = list(rows[0]) if rows else []
    img_col = _column(header, _PATH_COLUMNS)
    cap_col, lab_col = _column(header, _CAPTION_COLUMNS), _column(header, _LABEL_COLUMNS)
    if img_col is None or (cap_col is None and lab_col is None):
        raise UtaUsageError(
            f"{src} needs a header row with an image path column ({', '.join(_PATH_COLUMNS)}) "
            f"and a caption column ({', '.join(_CAPTION_COLUMNS)}) and/or a label column "
            f"({', '.join(_LABEL_COLUMNS)}); it has: {', '.join(header) or 'no rows'}.")
    root = os.path.dirname(os.path.abspath(path)) if is_local(fs) else src.rsplit("/", 1)[0]
    classes: list[str] = []
    labels = [(r.get(lab_col) or "").strip() for r in rows] if lab_col else []
    if labels and not all(lab.lstrip("-").isdigit() for lab in labels):
        classes = sorted(set(labels))  # class names: labels are their sorted order
        where = {c: i for i, c in enumerate(classes)}
        labels = [str(where[lab]) for lab in labels]
    refs = []
    for i, r in enumerate(rows):
        img = (r.get(img_col) or "").strip()
        if not img:
            raise UtaUsageError(f"{src}: row {i + 2} has no image path.")
        if "://" not in img and not os.path.isabs(img):
            img = os.path.join(root, img) if is_local(fs) else f"{root}/{img}"
        cap = (r.get(cap_col) or "").strip() if cap_col else None
        refs.append(Ref(("file", img), int(labels[i]) if labels else -1, cap))
    return Listing("list", {split: refs}, classes)


def _index_tar(url: str) -> list[Ref]:
    """The samples of one uncompressed tar shard: the image member's offset and size (read by
    seeking, nothing decoded) with the .cls and .txt members' values."""
    if not url.endswith(".tar"):
        raise UtaUsageError(f"{url} is compressed; its members cannot be read in place. "
                            f"Decompress the shards (gunzip) and pass the .tar files.")
    fs, path = url_to_fs(url)
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                split = m.isfile() and split_member(m.name)
                if not split:
                    continue
                key, fld = split
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                if fld in ("cls", "txt"):
                    groups[key][fld] = tar.extractfile(m).read().decode("utf-8", "replace")
                else:
                    groups[key][fld] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise UtaUsageError(f"Cannot read tar shard {url}: {e}. Check the file.") from None
    refs = []
    for key in order:
        g = groups[key]
        image = _pick_image_field({k: v for k, v in g.items() if k not in ("cls", "txt")})
        if image is None:
            continue
        cls = g.get("cls", "").strip()
        refs.append(Ref(("tar", url, *g[image]), int(cls) if cls.lstrip("-").isdigit() else -1,
                        g["txt"].strip() if "txt" in g else None))
    return refs


def _list_tars(src: str, split: str) -> Listing:
    fs, path = url_to_fs(src)
    base = src.rstrip("/")
    if "{" not in src and fs.isdir(path) and fs.isfile(f"{path.rstrip('/')}/classnames.txt") \
            and not any(p.endswith(TAR_SUFFIXES) for p in fs.ls(path, detail=False)):
        # CLIP_benchmark's layout (or ours): split folders of shards beside classnames.txt
        with fs.open(f"{path.rstrip('/')}/classnames.txt", "r", encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
        splits = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)
                        if fs.isdir(p) and any(q.endswith(TAR_SUFFIXES)
                                               for q in fs.ls(p, detail=False)))
        out = Listing("tar", classes=classes)
        for s in splits:
            shards = expand_shard_urls(f"{base}/{s}")
            out.splits[s] = [r for u in shards for r in _index_tar(u)]
        return out
    shards = expand_shard_urls(src)
    return Listing("tar", {split: [r for u in shards for r in _index_tar(u)]})


def is_tar_source(src: str) -> bool:
    s = src.rstrip("/")
    if s.endswith(TAR_SUFFIXES) or "{" in s:
        return True
    fs, path = url_to_fs(s)
    if not fs.isdir(path):
        return False
    entries = fs.ls(path, detail=True)
    if fs.isfile(f"{path.rstrip('/')}/classnames.txt"):  # CLIP_benchmark's layout
        return any(e["type"] == "directory" and
                   any(p.endswith(TAR_SUFFIXES) for p in fs.ls(e["name"], detail=False))
                   for e in entries)
    return any(e["name"].endswith(TAR_SUFFIXES) for e in entries) and \
        not any(e["type"] == "directory" for e in entries)


def list_source(src: str, split: str = "train") -> Listing:
    """The samples of SRC: an image folder (class folders, or split folders of class folders),
    a CSV/TSV of paths with captions and/or labels, or tar shards (CLIP_benchmark's layout
    included); local or fsspec."""
    fs, path = url_to_fs(src)
    if src.lower().endswith(LIST_SUFFIXES):
        listing = _list_table(src, split)
    elif "{" not in src and not fs.exists(path):
        raise UtaUsageError(f"{src} does not exist. Give an image folder, a CSV/TSV of image "
                            f"paths, or tar shards.")
    elif is_tar_source(src):
        listing = _list_tars(src, split)
    else:
        listing = _list_folder(src, split)
    if not any(listing.splits.values()):
        raise UtaUsageError(f"{src} holds no samples.")
    return listing


def read_bytes(where: tuple) -> bytes:
    fs, path = url_to_fs(where[1])
    if where[0] == "file":
        return fs.cat_file(path)
    with fs.open(path, "rb") as f:
        f.seek(where[2])
        return f.read(where[3])


# --------------------------------------------------------------------------------------------
# images and shards


def stored_size(width: int, height: int, short_side: int = 0, max_side: int = 0
                ) -> tuple[int, int]:
    """The size an image is stored at: its short (or long) side brought down to the given
    length, the aspect ratio kept; never upscaled."""
    side, target = (min(width, height), short_side) if short_side else \
        (max(width, height), max_side)
    if not target or side <= target:
        return width, height
    if width == side:
        return target, max(1, round(height * target / width))
    return max(1, round(width * target / height)), target


def encode_image(data: bytes, short_side: int = 0, max_side: int = 0, quality: int = 95
                 ) -> bytes:
    """The image as stored: an RGB JPEG of at most the given size. An RGB JPEG that needs no
    resize keeps its bytes (no second lossy pass); anything else (PNG, CMYK, grey, larger) is
    decoded, resized with PIL's antialiased bicubic filter and encoded at `quality`. Every image
    is decoded once, so a truncated one raises ValueError here rather than in training."""
    try:
        img = Image.open(io.BytesIO(data))
        size = stored_size(img.width, img.height, short_side, max_side)
        keep = img.format == "JPEG" and img.mode == "RGB" and size == img.size
        if img.format == "JPEG" and size != img.size:
            img.draft("RGB", size)  # DCT-scaled decode, never below the stored size
        img.load()
        if keep:
            return data
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality)
        return out.getvalue()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise ValueError(f"{type(e).__name__}: {str(e).split(' <_io')[0]}") from e


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o444, 0  # the same bytes on every run
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: str, samples: list[tuple[str, bytes, int, str | None]]) -> None:
    """A tar of (key, jpeg, label, caption) samples at `path`, written to a hidden temp name and
    renamed into place: a shard that exists is complete. Label -1: no .cls; caption None: no
    .txt."""
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, label, caption in samples:
                _member(tar, f"{key}.jpg", jpeg)
                if label >= 0:
                    _member(tar, f"{key}.cls", str(label).encode())
                if caption is not None:
                    _member(tar, f"{key}.txt", caption.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# reading the manifest back


def shard_manifest(source: str) -> tuple[dict, str] | None:
    """(manifest, split) when `source` is a split folder written by `uta shards` (OUT/<split>),
    else None."""
    s = source.rstrip("/")
    if not s or s == "demo" or "{" in s or s.endswith(TAR_SUFFIXES + LIST_SUFFIXES):
        return None
    try:
        fs, path = url_to_fs(s)
        parent, split = path.rstrip("/").rsplit("/", 1) if "/" in path.rstrip("/") \
            else (".", path)
        with fs.open(f"{parent}/{MANIFEST}", "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or split not in manifest.get("splits", {}):
        return None
    return manifest, split


def manifest_samples(source: str) -> int:
    """The number of samples of a `uta shards` split folder (0 when `source` is not one)."""
    found = shard_manifest(source)
    return int(found[0]["splits"][found[1]]["samples"]) if found else 0


def manifest_classnames(source: str) -> list[str] | None:
    """The class names of a `uta shards` split folder (None when not one, or without classes)."""
    found = shard_manifest(source)
    return list(found[0].get("classnames") or []) or None if found else None


def output_url(out: str) -> str:
    fs, path = url_to_fs(out)
    if not is_local(fs):
        raise UtaUsageError(f"{out}: shards are written to a local folder (atomic renames need "
                            f"one); copy them to object storage afterwards.")
    return url_of(fs, path)
