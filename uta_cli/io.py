"""Ground-floor file helpers: atomic writes, fsspec paths, the cache folder.

Atomic writes go to a temp name beside the target (same filesystem) and are renamed into place,
so a reader sees the old file or the new one, never half of one. They are local-disk only:
fsspec object stores have no atomic rename, and nothing here pretends otherwise.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator

import fsspec

from uta_cli.errors import UtaUsageError

# --------------------------------------------------------------------------------------------
# atomic writes


def remove(path: str) -> None:
    """Delete a file, link or folder if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def replace(tmp: str, final: str, aside: str | None = None) -> None:
    """Move a finished temp file or folder onto `final`. A folder cannot be replaced in one
    rename, so an existing one is moved aside (to `aside`, default `tmp`.old) first and deleted
    only after: some complete version exists at every moment."""
    if os.path.isdir(final) and not os.path.islink(final):
        old = aside or f"{tmp}.old"
        remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        remove(old)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(path: str, aside: str | None = None) -> Iterator[str]:
    """A temp path to write (a file or a folder); renamed onto `path` when the block succeeds,
    removed when it fails (Ctrl-C included). `aside`: see `replace`. The temp name is hidden and
    keeps the name's suffix last, for readers that go by it (onnxruntime, torch.export.load)."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp{os.getpid()}-{name}")
    remove(tmp)
    try:
        yield tmp
        replace(tmp, path, aside)
    finally:
        remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    # fsynced before the rename: a crash right after must not leave an empty file in place
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str, data, indent: int = 1, final_newline: bool = True) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=indent)
                      + ("\n" if final_newline else ""))


def json_safe(value):
    """`value` with NaN and infinities as None: JSON has no NaN (json.dumps would write a bare
    NaN token, which strict readers such as jq and JavaScript refuse); a meaningless metric,
    e.g. top-5 of fewer than five classes, is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# fsspec paths


def url_to_fs(url: str, writing: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's url_to_fs, with a missing backend or unknown protocol turned into usage errors."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        if writing:
            message = (f"Cannot write to {url}: {e}. Object stores need their fsspec package "
                       f"(pip install 'uta-cli[s3]' or 'uta-cli[gcs]').")
        elif isinstance(e, ImportError):
            message = (f"Reading {url!r} needs an fsspec backend that is not installed ({e}). "
                       "Install it, for example `pip install 'uta-cli[s3]'` for s3:// or "
                       "`pip install 'uta-cli[gcs]'` for gs://.")
        else:
            message = (f"Cannot read {url!r}: {e}. Use a local path or an fsspec URL such as "
                       "s3://bucket/prefix, gs://bucket/prefix or memory://path.")
        raise UtaUsageError(message) from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` on `fs` as a URL that opens on its own: local files stay plain absolute paths
    (readable by anything), other filesystems get their protocol back."""
    if is_local(fs):
        return os.path.normpath(path)
    return fs.unstrip_protocol(path)


# --------------------------------------------------------------------------------------------
# cache


def cache_root() -> str:
    """UTA_CACHE_DIR, else $XDG_CACHE_HOME/uta, else ~/.cache/uta (created)."""
    root = os.environ.get("UTA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "uta")
    os.makedirs(root, exist_ok=True)
    return root
