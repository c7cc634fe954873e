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
from uta_cli.io import atomic_path, url_to_fs


def local_path(path: str) -> str:
    """file:///x -> /x; anything else unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, writing=True)


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
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


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


# -- run directories at a URL -----------------------------------------------------------------
MIRRORS: dict[str, RunMirror] = {}  # local staging folder -> its mirror


def staging_root() -> str:
    root = os.environ.get("UTA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "uta")
    return os.path.join(root, "remote-runs")


class RunMirror:
    """A run directory written locally (staging) and copied to `url` after each checkpoint.

    Object stores cannot rename a folder into place, so a checkpoint is uploaded file by file
    and `checkpoints/latest` is written only after the last of them: whoever reads the URL (a
    resume, `uta zeroshot`) trusts only what `latest` names.
    """

    def __init__(self, staging: str, url: str):
        self.staging, self.url = staging, url.rstrip("/")
        self.fs, self.root = _fs(self.url)

    def _remote(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def pull(self) -> None:
        """Make the staging folder what the URL's `latest` says: that checkpoint and the logs,
        nothing else (an unfinished upload is ignored)."""
        import shutil

        pointer = self._remote("checkpoints/latest")
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)
        if not self.fs.exists(pointer):
            return
        name = self.fs.cat_file(pointer).decode().strip()
        if not name.startswith("step_") or not self.fs.exists(self._remote(f"checkpoints/{name}")):
            raise UtaUsageError(f"{self.url}/checkpoints/latest names {name!r}, which is not "
                                f"there. Use another --output-dir, or remove the run.")
        local = os.path.join(self.staging, "checkpoints", name)
        for remote_file in self.fs.find(self._remote(f"checkpoints/{name}")):
            rel = remote_file[len(self._remote(f"checkpoints/{name}")):].lstrip("/")
            os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
            self.fs.get_file(remote_file, os.path.join(local, rel))
        for entry in self.fs.ls(self.root, detail=False):
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base == "metrics.jsonl" or (base.startswith("config") and base.endswith(".yaml")):
                self.fs.get_file(entry, os.path.join(self.staging, base))
        with open(os.path.join(self.staging, "checkpoints", "latest"), "w") as f:
            f.write(name + "\n")
        best = self._remote("checkpoints/best")
        if self.fs.exists(f"{best}/meta.json"):  # a resumed run keeps competing with it
            os.makedirs(os.path.join(self.staging, "checkpoints", "best"))
            for remote_file in self.fs.ls(best, detail=False):
                base = remote_file.rstrip("/").rsplit("/", 1)[-1]
                self.fs.get_file(remote_file,
                                 os.path.join(self.staging, "checkpoints", "best", base))

    def push_logs(self) -> None:
        if not os.path.isdir(self.staging):
            return
        for base in sorted(os.listdir(self.staging)):
            path = os.path.join(self.staging, base)
            if os.path.isfile(path) and (base == "metrics.jsonl" or base.endswith(".yaml")):
                self.fs.put_file(path, self._remote(base))

    def push_best(self, folder: str) -> None:
        """checkpoints/best (evaluation and export only; resuming uses `latest`): its files
        replace the previous best's, meta.json last."""
        files = sorted(os.listdir(folder), key=lambda n: n == "meta.json")
        for name in files:
            if os.path.isfile(os.path.join(folder, name)):
                self.fs.put_file(os.path.join(folder, name),
                                 self._remote(f"checkpoints/best/{name}"))

    def push_checkpoint(self, folder: str) -> None:
        """The checkpoint's files, then the logs, then `latest`; then old remote checkpoints
        that the local folder pruned."""
        name = os.path.basename(folder)
        upload(folder, f"{self.url}/checkpoints/{name}")
        self.push_logs()
        self.fs.pipe_file(self._remote("checkpoints/latest"), (name + "\n").encode())
        kept = set(os.listdir(os.path.dirname(folder)))
        for entry in self.fs.ls(self._remote("checkpoints"), detail=False):
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("step_") and base not in kept:
                self.fs.rm(entry, recursive=True)


def mirror_run(url: str) -> str:
    """The local staging folder of a run directory at `url` (pulled from it, then mirrored)."""
    import atexit
    import hashlib

    staging = os.path.join(staging_root(), hashlib.sha1(url.encode()).hexdigest()[:16])
    mirror = RunMirror(staging, url)
    try:
        mirror.pull()
    except OSError as e:
        raise UtaUsageError(f"Cannot read the run directory {url}: {e}") from None
    MIRRORS[os.path.abspath(staging)] = mirror
    atexit.register(mirror.push_logs)  # records written after the last checkpoint
    return staging


def mirror_of(run_dir: str) -> RunMirror | None:
    return MIRRORS.get(os.path.abspath(run_dir))
