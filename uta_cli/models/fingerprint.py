"""The whole-file fingerprint of a teacher's weights (SHA-256 of every byte), recorded beside the
cheap one (size, first and last MiB) so that a resume can tell two files apart that share their
size and ends. Large files are hashed once per machine: by local rank 0, cached by (real path,
size, modification time) under the uta cache folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from uta_cli.io import atomic_write_json, cache_root

log = logging.getLogger(__name__)

# Below this size every process hashes the file itself (well under a second); above it, the
# hash is cached per machine and read by local rank 0 only.
CACHE_FROM_BYTES = 256 << 20
# How long the other processes of a machine wait for local rank 0's hash before hashing the
# file themselves: a minute plus the time to read the file at 50 MB/s (a slow network disk).
_WAIT_BASE_S, _WAIT_BYTES_PER_S = 60.0, 50e6


def sha256_of_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_entry(path: str, st: os.stat_result) -> str:
    real = os.path.realpath(path)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return os.path.join(cache_root(), "fingerprints", f"{key}.json")


def _read(entry: str) -> str:
    try:
        with open(entry, encoding="utf-8") as f:
            return str(json.load(f).get("sha256") or "")
    except (OSError, ValueError):
        return ""


def whole_file_sha256(path: str) -> str:
    """'sha256:<hex>' of the whole file at `path`."""
    st = os.stat(path)
    if st.st_size < CACHE_FROM_BYTES:
        return "sha256:" + sha256_of_file(path)
    entry = _cache_entry(path, st)
    digest = _read(entry)
    if not digest and int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        # Another process of this machine (local rank 0) is hashing it: wait for its entry.
        deadline = time.monotonic() + _WAIT_BASE_S + st.st_size / _WAIT_BYTES_PER_S
        while not digest and time.monotonic() < deadline:
            time.sleep(0.2)
            digest = _read(entry)
        if not digest:
            log.warning("local rank 0 did not hash %s in time; hashing it here", path)
    if digest:
        return "sha256:" + digest
    digest = sha256_of_file(path)
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        atomic_write_json(entry, {"path": os.path.realpath(path), "size": st.st_size,
                                  "mtime_ns": st.st_mtime_ns, "sha256": digest})
    except OSError as e:  # a read-only cache costs time, not correctness
        log.warning("cannot cache the fingerprint of %s (%s)", path, e)
    return "sha256:" + digest
