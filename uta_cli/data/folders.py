"""Image folders over fsspec (class or flat layout), and what they share with the tar-shard
reader (shards.py): image decoding, skipping corrupt images, collation.

Both readers are used by pre-training (labels ignored) and by zero-shot evaluation (labels used).
Paths may be local or any fsspec URL (file://, memory://, s3://, gs://, ...). Bad input raises
`UtaUsageError` with the problem and the fix; corrupt images never crash a run: the datasets yield
None for them and `collate_skip_none` counts them per batch as `num_skipped`.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.utils.data
from PIL import Image

from uta_cli.errors import UtaUsageError
from uta_cli.io import is_local, url_of, url_to_fs

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageFolderIndex",
    "collate_skip_none",
    "decode_image",
    "index_image_folder",
]

log = logging.getLogger(__name__)

# Matched case-insensitively (ImageNet ships `.JPEG`).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Tar shards (read by shards.py; named here too, so a folder of them gets a hint).
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
# folder entries


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

    root = url_of(fs, path)
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
            files=[url_of(fs, p) for _, p in images],
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
        files=[url_of(fs, p) for _, p in images],
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


def draft_hook(transform: Any, sample_id: int) -> Callable[[Image.Image], None] | None:
    """The transform's reduced-scale JPEG decode for this sample, if it has one (training)."""
    draft = getattr(transform, "draft", None)
    return None if draft is None else functools.partial(draft, sample_id=sample_id)


def encoded_hook(transform: Any, data: bytes, sample_id: int) -> dict | None:
    """The transform's encoded form of this sample (a JPEG left for the device to decode, with
    its crop drawn), or None: decode it here."""
    encoded = getattr(transform, "encoded", None)
    return None if encoded is None else encoded(data, sample_id)


class WarnOnce:
    """Warn about the first bad item in each process only (each DataLoader worker is one)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._pid: int | None = None

    def __call__(self, msg: str, *args: Any) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.log.warning(
                msg + " (further bad images in this process are skipped silently and counted)",
                *args,
            )
        else:
            self.log.debug(msg, *args)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Map-style dataset over an `ImageFolderIndex`; None for images that cannot be read."""

    def __init__(self, index: ImageFolderIndex, transform: Transform) -> None:
        self.index = index
        self.transform = transform
        self._warn = WarnOnce(log)
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
            encoded = encoded_hook(self.transform, data, i)
            if encoded is not None:
                return {"sample_id": i, "label": self.index.labels[i], **encoded}
            image = decode_image(data, draft_hook(self.transform, i))
        except (OSError, ValueError) as e:
            self._warn("Skipping unreadable image %s: %s", url, e)
            return None
        return {"sample_id": i, "label": self.index.labels[i], **self.transform(image, i)}


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
    decode = None
    if any("jpeg" in b for b in kept):  # data.decode gpu: some samples are still encoded
        common = set.intersection(*(set(b) for b in kept)) - {"jpeg", "box", "flip"}
        decode = [{k: v for k, v in b.items() if k not in common} for b in kept]
        kept = [{k: v for k, v in b.items() if k in common} for b in kept]
    out = torch.utils.data.default_collate(kept)
    if decode is not None:
        out["decode"] = decode  # per sample: jpeg bytes, box, flip; or its decoded views
    out["num_skipped"] = skipped
    return out
