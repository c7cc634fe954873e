"""Seconds per GB of the teacher's whole-file fingerprint (SHA-256 of every byte), against the
cheap fingerprint (size, first and last MiB) and against only reading the file, side by side in
one run on one generated file.

    python benchmarks/fingerprint.py              # a 1 GiB file, 3 rounds (about 15 s)
    python benchmarks/fingerprint.py --gib 2 --rounds 5

The file is read from the page cache after the first pass (the figure is the hash's CPU cost);
on a cold network disk the read dominates, which the "read only" row shows for this disk. The
whole-file hash is computed once per machine per file (cached by path, size and modification
time; models/fingerprint.py), so this is paid once, not per process or per resume.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from uta_cli.models.fingerprint import sha256_of_file
from uta_cli.models.teacher import file_fingerprint


def read_only(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.bin")
        with open(path, "wb") as f:
            block = os.urandom(1 << 24)
            for _ in range(size // len(block)):
                f.write(block)
        size = os.path.getsize(path)
        rows = {"read only": read_only, "cheap (size, first + last MiB)": file_fingerprint,
                "whole-file SHA-256": sha256_of_file}
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.rounds):
            for name, fn in rows.items():
                t = time.perf_counter()
                fn(path)
                times[name].append(time.perf_counter() - t)
    gb = size / 1e9
    print(f"{size / (1 << 30):.2f} GiB file, median of {args.rounds} rounds")
    base = statistics.median(times["read only"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:32s} {med / gb:8.3f} s/GB   {med / base:6.2f} x read only")


if __name__ == "__main__":
    main()
