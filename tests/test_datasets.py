"""Image folder and tar shard readers: layouts, errors, corrupt images, rank/worker splitting."""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
import uuid
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from uta_cli.data.folders import (
    ImageFolderDataset,
    collate_skip_none,
    decode_image,
    index_image_folder,
)
from uta_cli.data.shards import TarShardDataset, expand_braces, sample_id_for
from uta_cli.errors import UtaUsageError

# ---------------------------------------------------------------------------------- helpers


def _image_bytes(seed: int, fmt: str = "PNG", size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    # Noise compresses badly, so the cut lands well inside the scan data, past the header.
    data = _image_bytes(123, "JPEG", size=32)
    return data[: int(len(data) * 0.6)]


def _to_tensor(image: Image.Image, sample_id: int) -> dict:
    # Module-level (picklable) transform; the mean tells images apart in assertions.
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return {"image": x, "seen_id": sample_id}


def _write(root, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def memroot():
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-global)."""
    fs = fsspec.filesystem("memory")
    root = f"/uta-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _shard_bytes(shard: int, n: int = 3, bad: set[int] = frozenset()) -> bytes:
    """A webdataset shard: per sample <key>.jpg/.png, .cls and .txt, members adjacent."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for j in range(n):
            key = f"s{shard:02d}/{j:04d}"  # a directory prefix is part of the key
            ext = "jpg" if j % 2 == 0 else "png"
            img = (
                b"not an image"
                if j in bad
                else _image_bytes(shard * 100 + j, ext.upper().replace("JPG", "JPEG"))
            )
            members = {
                f"{key}.{ext}": img,
                f"{key}.cls": f"{(shard + j) % 5}\n".encode(),
                f"{key}.txt": f"caption {shard}-{j}".encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _make_shards(folder, count: int, n: int = 3) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(count):
        p = os.path.join(folder, f"shard-{s:02d}.tar")
        with open(p, "wb") as f:
            f.write(_shard_bytes(s, n))
        paths.append(p)
    return paths


def _expected(paths: list[str], n: int = 3) -> dict[int, tuple[int, str]]:
    """sample_id -> (label, caption) for shards written by _make_shards."""
    out = {}
    for s, p in enumerate(paths):
        for j in range(n):
            out[sample_id_for(p, f"s{s:02d}/{j:04d}")] = ((s + j) % 5, f"caption {s}-{j}")
    return out


def _collect(loader) -> tuple[list[int], list[int], list[str], int]:
    ids, labels, captions, skipped = [], [], [], 0
    for batch in loader:
        skipped += batch["num_skipped"]
        if "sample_id" not in batch:
            continue
        ids += batch["sample_id"].tolist()
        labels += batch["label"].tolist()
        captions += list(batch.get("caption", []))
        assert batch["sample_id"].tolist() == batch["seen_id"].tolist()
    return ids, labels, captions, skipped


# ---------------------------------------------------------------------------- image folders


def test_classes_layout_sorted_and_hidden_files_ignored(tmp_path):
    for rel, seed in [("dog/b.png", 1), ("cat/z.JPEG", 2), ("cat/a.png", 3), ("cat-2/m.webp", 4)]:
        fmt = {"png": "PNG", "JPEG": "JPEG", "webp": "WEBP"}[rel.rsplit(".", 1)[1]]
        _write(tmp_path, rel, _image_bytes(seed, fmt))
    _write(tmp_path, "cat/._a.png", b"AppleDouble junk")  # macOS fork: not an image
    _write(tmp_path, ".ipynb_checkpoints/x.png", _image_bytes(9))
    _write(tmp_path, "cat/notes.txt", b"hello")

    for layout in ("auto", "classes"):
        idx = index_image_folder(str(tmp_path / "." / ""), layout)
        assert idx.root == str(tmp_path)
        assert idx.classes == ["cat", "cat-2", "dog"]
        rels = [os.path.relpath(f, tmp_path) for f in idx.files]
        # Grouped by class in class order, then by name: labels are non-decreasing.
        assert rels == ["cat/a.png", "cat/z.JPEG", "cat-2/m.webp", "dog/b.png"]
        assert idx.labels == [0, 0, 1, 2]
        assert all(os.path.isabs(f) for f in idx.files)
    assert index_image_folder(f"file://{tmp_path}") == idx


def test_flat_layout_and_auto_detection(tmp_path):
    _write(tmp_path, "top.png", _image_bytes(0))
    _write(tmp_path, "a/one.png", _image_bytes(1))
    _write(tmp_path, "a/deep/two.png", _image_bytes(2))
    idx = index_image_folder(str(tmp_path))  # an image at the root -> flat
    assert idx.classes == [] and idx.labels == [-1, -1, -1]
    assert [os.path.relpath(f, tmp_path) for f in idx.files] == [
        "a/deep/two.png",
        "a/one.png",
        "top.png",
    ]
    os.remove(tmp_path / "top.png")
    # Still flat under auto: one image sits two levels down.
    assert index_image_folder(str(tmp_path)).classes == []
    # A classes-shaped folder read as flat keeps every image, unlabelled.
    cls_root = tmp_path / "c"
    _write(cls_root, "x/1.png", _image_bytes(3))
    _write(cls_root, "y/2.png", _image_bytes(4))
    assert index_image_folder(str(cls_root)).classes == ["x", "y"]
    flat = index_image_folder(str(cls_root), "flat")
    assert flat.labels == [-1, -1] and len(flat.files) == 2


def test_memory_folder_reads_through_dataset(memroot):
    fs, root = memroot
    fs.pipe(f"{root}/b/2.png", _image_bytes(2))
    fs.pipe(f"{root}/a/1.png", _image_bytes(1))
    fs.pipe(f"{root}/a/0.jpg", _image_bytes(0, "JPEG"))
    idx = index_image_folder(f"memory://{root}")
    assert idx.root == f"memory://{root}"
    assert idx.files == [
        f"memory://{root}/a/0.jpg",
        f"memory://{root}/a/1.png",
        f"memory://{root}/b/2.png",
    ]
    assert idx.classes == ["a", "b"] and idx.labels == [0, 0, 1]
    ds = ImageFolderDataset(idx, _to_tensor)
    item = ds[2]
    assert item["sample_id"] == 2 and item["label"] == 1 and item["image"].shape == (3, 8, 8)
    expected = np.asarray(Image.open(io.BytesIO(_image_bytes(2))), dtype=np.float32)
    assert torch.equal(item["image"], torch.from_numpy(expected).permute(2, 0, 1))
    # Picklable after use (the opened filesystem is dropped, re-opened lazily).
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._fs is None and clone[0]["label"] == 0


def test_folder_errors_name_problem_and_layout(tmp_path, memroot):
    with pytest.raises(UtaUsageError, match="does not exist") as e:
        index_image_folder(str(tmp_path / "nope"))
    assert "ROOT/<class>/<image>" in str(e.value)
    _, root = memroot
    with pytest.raises(UtaUsageError, match="does not exist"):
        index_image_folder(f"memory://{root}/missing")

    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "readme.txt", b"x")
    with pytest.raises(UtaUsageError, match="No images found") as e:
        index_image_folder(str(tmp_path / "empty"))
    msg = str(e.value)
    assert ".jpeg" in msg and ".png" in msg and "'classes'" in msg and "'flat'" in msg
    assert "1 other file" in msg

    root2 = tmp_path / "cls"
    _write(root2, "cat/1.png", _image_bytes(1))
    (root2 / "dog").mkdir()
    _write(root2, "bird/readme.txt", b"no images here")
    for layout in ("auto", "classes"):
        with pytest.raises(UtaUsageError, match="without images") as e:
            index_image_folder(str(root2), layout)
        assert "'bird', 'dog'" in str(e.value)
    assert index_image_folder(str(root2), "flat").files == [str(root2 / "cat/1.png")]

    root3 = tmp_path / "mixed"
    _write(root3, "loose.png", _image_bytes(1))
    _write(root3, "cat/1.png", _image_bytes(2))
    with pytest.raises(UtaUsageError, match="'loose.png'.*'flat' layout"):
        index_image_folder(str(root3), "classes")
    with pytest.raises(UtaUsageError, match="Unknown image folder layout"):
        index_image_folder(str(root3), "imagenet")
    with pytest.raises(UtaUsageError, match="is a file, not a folder"):
        index_image_folder(str(root3 / "loose.png"))


def test_decode_image():
    pal = Image.new("P", (4, 4))
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (4, 4)
    assert decode_image(_image_bytes(0, "JPEG", 32)).size == (32, 32)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(os.urandom(256))
    truncated = _truncated_jpeg()
    Image.open(io.BytesIO(truncated))  # the header alone parses...
    with pytest.raises(ValueError, match="truncated"):  # ...but decoding the pixels fails
        decode_image(truncated)


def test_collate_skip_none():
    assert collate_skip_none([None, None]) == {"num_skipped": 2}
    out = collate_skip_none(
        [{"x": torch.ones(2), "label": 1}, None, {"x": torch.zeros(2), "label": 3}]
    )
    assert out["num_skipped"] == 1 and out["x"].shape == (2, 2)
    assert out["label"].tolist() == [1, 3]


def test_corrupt_images_skipped_and_counted_with_workers(tmp_path, caplog):
    for i in range(6):
        _write(tmp_path, f"{'ab'[i % 2]}/{i}.png", _image_bytes(i))
    _write(tmp_path, "a/bad-random.jpg", os.urandom(300))
    _write(tmp_path, "b/bad-truncated.jpg", _truncated_jpeg())
    idx = index_image_folder(str(tmp_path))
    bad = {i for i, f in enumerate(idx.files) if "bad" in f}
    assert len(idx) == 8 and len(bad) == 2
    ds = ImageFolderDataset(idx, _to_tensor)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_none)
    ids, labels, _, skipped = _collect(loader)
    assert skipped == 2
    assert sorted(ids) == [i for i in range(8) if i not in bad]
    assert labels == [idx.labels[i] for i in ids]

    # In one process: one warning naming the first bad file, not one per bad file.
    with caplog.at_level(logging.WARNING, logger="uta_cli.data.folders"):
        items = [ds[i] for i in range(len(ds))]
    assert sum(x is None for x in items) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bad-random.jpg" in warnings[0].getMessage()


# ------------------------------------------------------------------------------- tar shards


def test_expand_braces():
    assert expand_braces("s3://b/train-{0000..0002}.tar") == [
        "s3://b/train-0000.tar",
        "s3://b/train-0001.tar",
        "s3://b/train-0002.tar",
    ]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("x{1,{2..3}}y") == ["x1y", "x2y", "x3y"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{08..10}") == ["08", "09", "10"]
    assert expand_braces("{0..4..2}") == ["0", "2", "4"]
    assert expand_braces("lit{x}-{1..2}") == ["lit{x}-1", "lit{x}-2"]  # bash keeps {x}
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_sample_id_is_stable_and_non_negative():
    # A fixed value: ids must not depend on the process (Python's str hash is salted).
    assert sample_id_for("s3://b/train-0000.tar", "000001") == 180308765142580942
    ids = {sample_id_for(f"shard-{s}.tar", f"{k:04d}") for s in range(20) for k in range(50)}
    assert len(ids) == 1000 and all(0 <= i < 2**63 for i in ids)


def test_tar_shards_split_across_ranks_and_workers(tmp_path):
    paths = _make_shards(tmp_path / "shards", 8)
    expected = _expected(paths)
    assert len(expected) == 24
    per_rank = []
    for rank in range(2):
        ds = TarShardDataset(str(tmp_path / "shards"), _to_tensor, rank=rank, world_size=2, seed=3)
        ds.check_split(num_workers=2)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_none)
        ids, labels, captions, skipped = _collect(loader)
        assert skipped == 0 and len(ids) == len(set(ids)) == 12  # 2 shards per slot
        for sid, label, caption in zip(ids, labels, captions):
            assert expected[sid] == (label, caption)
        per_rank.append(ids)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(expected)

    # A second run (new worker processes) gives the same ids, in the same order.
    ds = TarShardDataset(str(tmp_path / "shards"), _to_tensor, rank=0, world_size=2, seed=3)
    again, _, _, _ = _collect(
        DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_none)
    )
    assert again == per_rank[0]


def test_tar_brace_glob_and_missing_shards(tmp_path):
    paths = _make_shards(tmp_path, 4)
    brace = TarShardDataset(str(tmp_path / "shard-{00..03}.tar"), _to_tensor)
    assert brace.shards == paths
    assert TarShardDataset(str(tmp_path / "shard-*.tar"), _to_tensor).shards == paths
    assert TarShardDataset([paths[1], paths[0]], _to_tensor).shards == [paths[1], paths[0]]
    ids = [x["sample_id"] for x in brace]
    assert sorted(ids) == sorted(_expected(paths))
    with pytest.raises(UtaUsageError, match=r"2 tar shard\(s\) do not exist.*shard-04"):
        TarShardDataset(str(tmp_path / "shard-{00..05}.tar"), _to_tensor)
    with pytest.raises(UtaUsageError, match="No tar shards match"):
        TarShardDataset(str(tmp_path / "train-*.tar"), _to_tensor)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(UtaUsageError, match="holds no tar shards"):
        TarShardDataset(str(tmp_path / "imgs"), _to_tensor)


def test_too_few_shards_is_a_usage_error(tmp_path, monkeypatch):
    paths = _make_shards(tmp_path, 3)
    ds = TarShardDataset(paths, _to_tensor, rank=1, world_size=2)
    with pytest.raises(UtaUsageError, match=r"3 tar shard\(s\).*2 process\(es\) x 2 .* = 4"):
        ds.check_split(num_workers=2)
    # Also at iteration start inside a worker, rather than silently leaving a slot without data.
    # The worker is simulated: a DataLoader whose worker raised takes ~10 s to shut down.
    with monkeypatch.context() as m:
        m.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
        with pytest.raises(UtaUsageError, match="fewer DataLoader workers"):
            next(iter(ds))
    assert len(list(ds)) == 3  # no workers: 2 slots for 3 shards, rank 1 reads shard 1 of 3
    one = TarShardDataset(paths[:1], _to_tensor, rank=0, world_size=2)
    with pytest.raises(UtaUsageError, match="at least 2 shards"):
        next(iter(one))


def test_set_epoch_changes_shard_order(tmp_path):
    paths = _make_shards(tmp_path, 8, n=1)
    ds = TarShardDataset(paths, _to_tensor, seed=0)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        order = ds.shard_order()
        assert sorted(order) == paths
        # Iteration follows the order (one sample per shard).
        seen = [x["sample_id"] for x in ds]
        assert seen == [sample_id_for(p, f"s{paths.index(p):02d}/0000") for p in order]
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    ds.set_epoch(1)
    assert ds.shard_order() == orders[1]  # deterministic per (seed, epoch)
    assert TarShardDataset(paths, _to_tensor, seed=1).shard_order(1) != orders[1]
    assert TarShardDataset(paths, _to_tensor, shuffle_shards=False).shard_order(5) == paths
    # The sample-level buffer reorders samples but keeps the set.
    buffered = TarShardDataset(paths, _to_tensor, shuffle_shards=False, shuffle_buffer=4)
    ids = [x["sample_id"] for x in buffered]
    plain = [x["sample_id"] for x in TarShardDataset(paths, _to_tensor, shuffle_shards=False)]
    assert sorted(ids) == sorted(plain) and ids != plain


def test_memory_shard_with_corrupt_image_and_damaged_shard(memroot, tmp_path, caplog):
    fs, root = memroot
    fs.pipe(f"{root}/a.tar", _shard_bytes(0, n=4, bad={1}))
    fs.pipe(f"{root}/b.tar", _shard_bytes(1, n=2))
    ds = TarShardDataset(f"memory://{root}/{{a,b}}.tar", _to_tensor, shuffle_shards=False)
    assert ds.shards == [f"memory://{root}/a.tar", f"memory://{root}/b.tar"]
    assert pickle.loads(pickle.dumps(ds)).shards == ds.shards
    # Two workers, one shard each; memory:// is process-global, so force fork explicitly.
    loader = DataLoader(
        ds,
        batch_size=4,
        num_workers=2,
        collate_fn=collate_skip_none,
        multiprocessing_context="fork",
    )
    ids, _, captions, skipped = _collect(loader)
    assert skipped == 1 and len(ids) == 5
    assert sorted(captions) == [
        "caption 0-0",
        "caption 0-2",
        "caption 0-3",
        "caption 1-0",
        "caption 1-1",
    ]
    assert sample_id_for(f"memory://{root}/a.tar", "s00/0001") not in ids

    # A shard cut short loses its tail, with a warning, and the run goes on. The cut lands
    # inside the second image's data (sample 0 takes 3 headers + 3 padded payloads = 3584 bytes).
    whole = _shard_bytes(2, n=4)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: 3584 + 512 + 100])
    with caplog.at_level(logging.WARNING, logger="uta_cli.data.shards"):
        items = list(TarShardDataset([str(cut)], _to_tensor))
    assert [x["caption"] for x in items] == ["caption 2-0"]
    assert any("cut.tar" in r.getMessage() for r in caplog.records)
