"""`uta shards`: CLIP_benchmark's layout read back by the webdataset library, the stored sizes,
the manifest, resume and its refusal of other options, skipped images, the other sources, and
the output read by pretrain, finetune and zeroshot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import webdataset as wds
from conftest import cli
from PIL import Image

from uta_cli.workflows import shards as ms

COLOURS = {"blue_sky": (30, 60, 220), "green": (40, 200, 50), "red": (220, 40, 30)}


def _image(colour, w: int, h: int, rng) -> Image.Image:
    pixels = np.array(colour, np.int16) + rng.integers(-10, 11, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_source(root, per_class=(5, 2), seed=0) -> dict:
    """train/ and val/ of class folders; the colour says the class. Odd, non-square sizes,
    PNG, CMYK and grey JPEGs, one image smaller than the short side, one corrupt file."""
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in zip(("train", "val"), per_class):
        for c, colour in COLOURS.items():
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(50, 97)), int(rng.integers(41, 90))
                img = _image(colour, w, h, rng)
                if i == 1:
                    img.save(d / f"{i}.png")
                elif i == 2 and split == "train":
                    img.convert("CMYK").save(d / f"{i}.jpg", quality=95)
                elif i == 3 and split == "train":
                    img.resize((21, 17)).save(d / f"{i}.jpg", quality=95)  # below --short-side
                else:
                    img.save(d / f"{i}.jpg", quality=95)
            counts[split, c] = n
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return counts


def clip_benchmark_read(out, split):
    """Shards read as CLIP_benchmark's build_wds_dataset does: {0..N-1}.tar from nshards.txt,
    images and .cls decoded."""
    nshards = int(open(os.path.join(out, split, "nshards.txt")).read())
    urls = os.path.join(out, split, f"{{0..{nshards - 1}}}.tar")
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(
        wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
    return list(ds)


def test_layout_sizes_manifest_and_webdataset_reader(tmp_path):
    counts = make_source(tmp_path / "src")
    out = tmp_path / "out"
    r = cli("shards", tmp_path / "src", out, "--short-side", 32, "--shard-size", 4,
            "--shuffle", "--workers", 2)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["classnames.txt", "manifest.json", "train", "val"]
    assert (out / "classnames.txt").read_text().splitlines() == ["blue sky", "green", "red"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["options"]["short_side"] == 32
    assert manifest["command"].startswith("uta shards ") and "--short-side 32" in \
        manifest["command"]
    for split, n in (("train", 15), ("val", 6)):
        shards = sorted(os.listdir(out / split))
        assert shards == sorted([f"{i}.tar" for i in range(-(-(n + (split == "train")) // 4))]
                                + ["nshards.txt"])
        samples = clip_benchmark_read(out, split)
        assert len(samples) == n == manifest["splits"][split]["samples"]
        assert manifest["splits"][split]["classes"] == \
            {c.replace("_", " "): counts[split, c] for c in COLOURS}
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == n and all("." not in k for k in keys)
        names = (out / "classnames.txt").read_text().splitlines()
        for s in samples:
            assert set(s) >= {"jpg", "cls"} and "txt" not in s
            img, label = s["jpg"], s["cls"]
            assert img.mode == "RGB"
            mean = np.asarray(img, np.float32).reshape(-1, 3).mean(0)
            colour = COLOURS[names[label].replace(" ", "_")]
            assert np.abs(mean - colour).max() < 20  # the image carries its own class
            # short side 32, except the 21x17 image, which is never upscaled
            assert min(img.size) == 32 or img.size == (21, 17)
    assert manifest["splits"]["train"]["skipped"] == 1
    assert "broken.jpg" in manifest["splits"]["train"]["skipped_examples"][0]
    assert "1 unreadable image(s) skipped" in r.output
    # shuffled: the first shard mixes classes (sorted order would give one class)
    first = clip_benchmark_read(out, "train")[:4]
    assert len({s["cls"] for s in first}) > 1


def test_resume_keeps_finished_shards_and_refuses_other_options(tmp_path, monkeypatch):
    make_source(tmp_path / "src")
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    opts = ms.ShardOptions(short_side=40, shard_size=3)
    ms.make_shards(src, str(tmp_path / "ref"), opts)  # uninterrupted, for comparison

    real, calls = ms.write_one, []

    def interrupted(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job[1:3])
        return real(job)

    monkeypatch.setattr(ms, "write_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shards(src, out, opts)
    monkeypatch.setattr(ms, "write_one", real)
    kept = {name: os.stat(os.path.join(out, "train", name)).st_mtime_ns
            for name in ("0.tar", "1.tar")}
    assert not json.load(open(os.path.join(out, "manifest.json")))["complete"]

    written = []
    monkeypatch.setattr(ms, "write_one", lambda job: written.append(job[1:3]) or real(job))
    manifest = ms.make_shards(src, out, opts)
    assert ("train", 0) not in written and ("train", 1) not in written and \
        ("train", 2) in written
    for name, mtime in kept.items():
        assert os.stat(os.path.join(out, "train", name)).st_mtime_ns == mtime
    reference = json.load(open(tmp_path / "ref" / "manifest.json"))
    assert manifest["splits"] == reference["splits"]
    for split in ("train", "val"):  # the same bytes as the uninterrupted run
        for name in sorted(os.listdir(tmp_path / "ref" / split)):
            assert open(os.path.join(out, split, name), "rb").read() == \
                (tmp_path / "ref" / split / name).read_bytes(), name
    assert not os.path.exists(os.path.join(out, ".progress"))

    written.clear()  # complete: a rerun writes nothing
    ms.make_shards(src, out, opts)
    assert written == []
    r = cli("shards", src, out, "--short-side", 48, "--shard-size", 3)
    assert r.exit_code == 2 and "short_side: 40 -> 48" in r.output and \
        "Traceback" not in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = cli("shards", src, tmp_path / "other")
    assert r.exit_code == 2 and "not written by uta shards" in r.output
    r = cli("shards", src, tmp_path / "x", "--short-side", 10, "--max-side", 20)
    assert r.exit_code == 2 and "choose one" in r.output


def test_list_and_tar_sources(tmp_path):
    make_source(tmp_path / "src")
    rows = ["filepath\tcaption\tlabel"]
    for c in sorted(COLOURS):
        rows.append(f"src/val/{c}/0.jpg\ta photo of {c}\t{c}")
        rows.append(f"src/val/{c}/1.png\tanother {c}\t{c}")
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    m = ms.make_shards(str(tmp_path / "pairs.tsv"), str(tmp_path / "tsv"),
                       ms.ShardOptions(max_side=30, shard_size=4))
    assert m["classnames"] == sorted(COLOURS) and m["splits"]["train"]["samples"] == 6
    samples = clip_benchmark_read(tmp_path / "tsv", "train")
    assert [s["txt"] for s in samples] == [r.split("\t")[1] for r in rows[1:]]
    assert [s["cls"] for s in samples] == [0, 0, 1, 1, 2, 2]
    assert all(max(s["jpg"].size) == 30 for s in samples)

    # existing shards (CLIP_benchmark's layout) re-written smaller: labels and captions kept
    m2 = ms.make_shards(str(tmp_path / "tsv"), str(tmp_path / "again"),
                        ms.ShardOptions(short_side=12, shard_size=5))
    assert m2["kind"] == "tar" and m2["classnames"] == sorted(COLOURS)
    again = clip_benchmark_read(tmp_path / "again", "train")
    assert [(s["cls"], s["txt"]) for s in again] == [(s["cls"], s["txt"]) for s in samples]
    assert all(min(s["jpg"].size) == 12 for s in again)


def test_fsspec_folder_source_gives_the_same_shards(tmp_path):
    """An image folder on an fsspec filesystem (memory://, as s3:// or gs:// would be) gives
    the shards the local copy gives, byte for byte."""
    import fsspec

    make_source(tmp_path / "src", per_class=(2, 1))
    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path / "src"), "/uta-shards-src", recursive=True)
    try:
        opts = ms.ShardOptions(short_side=24, shard_size=4, shuffle=True)
        remote = ms.make_shards("memory://uta-shards-src", str(tmp_path / "remote"), opts)
        local = ms.make_shards(str(tmp_path / "src"), str(tmp_path / "local"), opts)
    finally:
        mem.rm("/uta-shards-src", recursive=True)
    for split in ("train", "val"):
        for key in ("samples", "skipped", "shards", "classes"):
            assert remote["splits"][split][key] == local["splits"][split][key]
    assert remote["splits"]["train"]["skipped"] == 1
    for split in ("train", "val"):
        for name in os.listdir(tmp_path / "local" / split):
            assert (tmp_path / "remote" / split / name).read_bytes() == \
                (tmp_path / "local" / split / name).read_bytes()


def test_pretrain_finetune_and_zeroshot_read_the_output(tmp_path, tiny_clip_dir):
    """OUT/<split> as data.source (the sample count from the manifest) and as --dataset (the
    class names from it)."""
    from conftest import tiny_overrides

    from uta_cli import checkpoint as ckpt
    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.finetune import run_finetune
    from uta_cli.workflows.pretrain import run_pretrain

    make_source(tmp_path / "src", per_class=(8, 4))
    out = tmp_path / "out"
    ms.make_shards(str(tmp_path / "src"), str(out),
                   ms.ShardOptions(short_side=36, shard_size=6, shuffle=True))
    # 24 training samples (the broken file skipped), batch 8: 3 steps per epoch, known only
    # from the manifest
    sets = tiny_overrides(tiny_clip_dir, **{
        "data.source": str(out / "train"), "data.val_source": str(out / "val"),
        "data.num_workers": 2, "schedule.steps": 0, "schedule.epochs": 2})
    run_pretrain(load_recipe("demo", sets), output_dir=str(tmp_path / "pre"), resume="never")
    records = [json.loads(x) for x in open(tmp_path / "pre" / "metrics.jsonl")]
    assert records[-1]["event"] == "end" and records[-1]["step"] == 6

    recipe = load_recipe("finetune_demo", [
        f"init={tmp_path / 'pre'}", f"data.source={out / 'train'}",
        f"data.val_source={out / 'val'}", "data.batch_size=8", "data.num_workers=1",
        "schedule.steps=2", "schedule.warmup_steps=1", "train.precision=fp32",
        "train.val_every=2", "finetune.templates=simple", "data.val_samples=0"])
    summary = run_finetune(recipe, output_dir=str(tmp_path / "ft"), resume="never")
    meta = ckpt.load_meta(ckpt.latest_checkpoint(str(tmp_path / "ft")))
    assert meta["classnames"] == ["blue sky", "green", "red"]
    assert summary["val"]["val_acc1"] >= 0

    report = tmp_path / "zs.json"
    r = cli("zeroshot", "--ckpt", tmp_path / "pre", "--dataset", out / "val", "--templates",
            "simple", "--batch-size", 8, "--workers", 0, "--output-json", report)
    assert r.exit_code == 0, r.output
    result = json.loads(report.read_text())
    assert result["num_samples"] == 12 and result["num_classes"] == 3
