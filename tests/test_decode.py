"""data.decode gpu, run on the CPU: the tensor path (workers read bytes, the training process
decodes with torchvision's decode_jpeg and crops, resizes and flips tensors) against the PIL
path with its reduced-scale decode off, through the real loader on tar shards; the fallbacks;
the refusal without CUDA."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import cli, tiny_overrides
from PIL import Image

from uta_cli.data.decode import DeviceDecoder, resolve_decode
from uta_cli.data.folders import collate_skip_none
from uta_cli.data.pipeline import MaskCollator, Source, TrainTransform, View
from uta_cli.data.shards import TarShardDataset, sample_id_for
from uta_cli.errors import UtaUsageError
from uta_cli.masks.generate import MaskSpec
from uta_cli.workflows.shards import ShardOptions, make_shards

VIEWS = [View("student", 32, (0.5,) * 3, (0.5,) * 3),
         View("teacher", 28, (0.5,) * 3, (0.5,) * 3, "bicubic"),
         View("small", 20, (0.5,) * 3, (0.5,) * 3, "bilinear")]
# Tolerance of the tensor path against PIL, in 0-255 levels. Both decode with libjpeg-turbo
# (equal pixels); the resizes differ where PIL's filter reaches past the crop box into the
# image (torch's crop stops at the box) and in rounding (PIL keeps 8 bits between its two
# passes). Measured here: mean 0.12 over all pixels, at most 0.65 for one view of one image,
# 99.9th percentile 5, largest 14 (at crop edges). Asserted: mean under 1 per view, 99.9th
# percentile at most 8.
MEAN_TOL, P999_TOL = 1.0, 8


def photo(w: int, h: int, rng) -> Image.Image:
    low = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return Image.fromarray((smooth + rng.integers(-8, 9, smooth.shape)).clip(0, 255)
                           .astype(np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tar shards written by uta shards (bytes kept): odd, non-square JPEGs and a grey one; and a
    shard of fallbacks (PNG, CMYK JPEG) for the worker."""
    root = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(0)
    for i in range(24):
        d = root / "src" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = photo(int(rng.integers(60, 200)), int(rng.integers(45, 170)), rng)
        if i == 5:
            img.save(d / f"{i}.png")  # re-encoded as JPEG by uta shards
        elif i == 9:
            img.convert("L").save(d / f"{i}.jpg", quality=92)
        else:
            img.save(d / f"{i}.jpg", quality=92)
    make_shards(str(root / "src"), str(root / "out"), ShardOptions(shard_size=6))
    # uta shards stores RGB JPEGs only; a shard from elsewhere may hold the rest
    with tarfile.open(root / "out" / "train" / "extra.tar", "w") as tar:
        for name, img, fmt in (("png.png", photo(70, 51, rng), "PNG"),
                               ("cmyk.jpg", photo(33, 30, rng).convert("CMYK"), "JPEG")):
            buf = io.BytesIO()
            img.save(buf, fmt)
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return str(root / "out" / "train")


def batches(shard_dir, defer: bool, workers: int = 2) -> dict[int, dict]:
    tf = TrainTransform(VIEWS, (0.2, 1.0), True, seed=3)
    tf.draft = None  # the PIL path at full size (its reduced-scale decode off)
    tf.defer_jpeg = defer
    data = TarShardDataset(shard_dir, tf, seed=3)
    masks = MaskCollator(MaskSpec(strategy="random"), (4, 4), 3)
    source = Source(data, tf, masks, 5, workers, 3, 0, 1, samples_per_epoch=26)
    if defer:
        source.device_decode = DeviceDecoder(VIEWS, "cpu")
    out = {}
    for batch in source.batches(epoch=1, skip=0):
        if "decode" in batch:
            raise AssertionError("the batch left encoded")
        for j, sid in enumerate(batch["sample_id"].tolist()):
            out[sid] = {**{v.name: batch[v.name][j] for v in VIEWS},
                        "keep_idx": batch["keep_idx"][j]}
        if len(out) >= 26:
            break
    return out


def test_tensor_path_matches_pil_path_boxes_flips_and_pixels(shards):
    pil, tensor = batches(shards, False), batches(shards, True)
    assert sorted(pil) == sorted(tensor) and len(pil) == 26
    diffs, exact = [], 0
    for sid, ref in pil.items():
        got = tensor[sid]
        assert torch.equal(got["keep_idx"], ref["keep_idx"])  # masks keyed as before
        for v in VIEWS:
            a, b = got[v.name], ref[v.name]
            assert a.dtype == torch.uint8 and a.shape == b.shape == (3, v.size, v.size)
            d = (a.int() - b.int()).abs()
            # the same box and flip: a wrong flip or crop would be tens of levels off
            assert d.float().mean() < MEAN_TOL, (sid, v.name, d.float().mean())
            diffs.append(d.flatten())
            exact += torch.equal(a, b)
    all_d = torch.cat(diffs).float()
    assert torch.quantile(all_d[::7], 0.999) <= P999_TOL
    assert exact >= 2 * len(VIEWS)  # the PNG and CMYK samples: decoded in the worker, as before


def test_boxes_and_flips_are_the_cpu_paths_draws(shards):
    tf = TrainTransform(VIEWS, (0.2, 1.0), True, seed=3)
    tf.defer_jpeg = True
    tf.set_epoch(2)
    ds = TarShardDataset(shards, tf)
    flips = set()
    for shard, key, fields in ds._records(ds.shards):
        sid = sample_id_for(shard, key)
        data = fields.get("jpg", fields.get("png"))
        enc = tf.encoded(data, sid)
        img = Image.open(io.BytesIO(data))
        if img.mode == "CMYK" or img.format == "PNG":
            assert enc is None  # falls back to the worker's decode
            continue
        box, flip = tf._draw(img.width, img.height, sid)
        assert enc["box"].tolist() == list(box) and bool(enc["flip"]) == flip
        flips.add(flip)
    assert flips == {True, False}


def test_corrupt_jpeg_in_a_batch_is_dropped_and_counted():
    rng = np.random.default_rng(1)
    tf = TrainTransform(VIEWS[:1], (0.5, 1.0), False, seed=0)
    tf.defer_jpeg = True
    good = io.BytesIO()
    photo(50, 40, rng).save(good, "JPEG")
    bad = good.getvalue()[:200] + b"\x00" * 300  # a valid header, broken data
    items = [{"sample_id": i, "label": 0, **tf.encoded(d, i)}
             for i, d in enumerate([good.getvalue(), bad, good.getvalue()])]
    batch = DeviceDecoder(VIEWS[:1], "cpu")(collate_skip_none(items))
    assert batch["sample_id"].tolist() == [0, 2] and batch["num_skipped"] == 1
    assert batch["student"].shape == (2, 3, 32, 32)


def test_gpu_decode_without_cuda_is_exit_2_and_auto_picks_by_device_and_source(
        tmp_path, tiny_clip_dir, shards):
    r = cli("pretrain", "demo", "--output-dir", tmp_path / "run",
            *[a for s in tiny_overrides(tiny_clip_dir, **{"data.decode": "gpu"})
              for a in ("--set", s)])
    assert r.exit_code == 2 and "no CUDA device" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    jpeg = TarShardDataset(shards, TrainTransform(VIEWS, (0.2, 1), True, 0))
    assert resolve_decode("auto", jpeg, torch.device("cpu")) == "cpu"
    assert resolve_decode("auto", jpeg, torch.device("cuda")) == "gpu"  # decided, not run
    with pytest.raises(UtaUsageError, match="no CUDA"):
        resolve_decode("gpu", jpeg, torch.device("cpu"))
