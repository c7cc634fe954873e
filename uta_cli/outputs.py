"""Outputs anywhere fsspec reaches: local paths, file:// and object stores (s3://, gs://,
memory:// in tests).

A file appears whole or not at all: locally it is written under a temporary name and renamed;
on an object store the object only exists once its upload completes (on close). Object stores
have no atomic rename of folders, so run directories are written locally and mirrored
(`RunMirror`): a checkpoint's files first, `latest` last.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import fsspec

from uta_cli.errors import UtaUsageError


def local_path(path: str) -> str:
    """file:///x -> /x; anything else unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:  # unknown protocol, missing s3fs/gcsfs
        raise UtaUsageError(f"Cannot write to {url}: {e}. Object stores need their fsspec "
                            f"package (pip install 'uta[s3]' or 'uta[gcs]').") from None


@contextlib.contextmanager
def open_output(path: str, mode: str = "w", **kwargs) -> Iterator:
    """Open `path` (local, file:// or an fsspec URL) for writing, whole or not at all."""
    path = local_path(path)
    if is_remote(path):
        fs, target = _fs(path)
        try:
            f = fs.open(target, mode, **kwargs)
        except OSError as e:
            raise UtaUsageError(f"Cannot write {path}: {e}") from None
        with f:
            yield f
        return
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UtaUsageError(f"Cannot create the folder {parent}: {e}") from None
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def upload(local: str, url: str) -> None:
    """Copy a finished local file or folder to `url` (a folder's files first, recursively)."""
    fs, target = _fs(url)
    try:
        if os.path.isdir(local):
            for root, _, files in os.walk(local):
                for name in sorted(files):
                    src = os.path.join(root, name)
                    rel = os.path.relpath(src, local).replace(os.sep, "/")
                    fs.put_file(src, f"{target.rstrip('/')}/{rel}")
        else:
            fs.put_file(local, target)
    except OSError as e:
        raise UtaUsageError(f"Cannot upload {local} to {url}: {e}") from None
