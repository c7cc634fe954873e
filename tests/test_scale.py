"""Training at scale: validation that ends (tar shards, sharded across processes), the resume
guard, per-rank randomness, exact resume on tar shards, record-level skipping."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from conftest import free_port, tiny_overrides, write_images
from PIL import Image

from uta_cli.recipe import load_recipe


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_shards(folder, n_shards: int, per_shard: int, size: int = 36, seed: int = 0,
                 odd_sizes: bool = False, uneven: bool = False) -> list[str]:
    """webdataset-layout shards of random PNGs; returns the image bytes in shard order.
    uneven: shard s holds per_shard + s % 3 images."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    images = []
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"shard-{s:02d}.tar"), "w") as tar:
            for i in range(per_shard + (s % 3 if uneven else 0)):
                h, w = (size + i % 5, size + 2 * (i % 3)) if odd_sizes else (size, size)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
                info = tarfile.TarInfo(f"s{s}_{i:03d}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
                images.append(buf.getvalue())
    return images


def pretrain(run_dir, sets, resume="auto", **kw):
    from uta_cli.workflows.pretrain import run_pretrain

    recipe = load_recipe("demo", sets)
    return run_pretrain(recipe, output_dir=str(run_dir), resume=resume, **kw)


def test_tar_validation_ends_and_equals_the_folder_of_the_same_images(tmp_path, tiny_clip_dir):
    images = write_shards(tmp_path / "val_tar", 3, 7, odd_sizes=True)  # 21: a partial batch
    folder = tmp_path / "val_folder"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(data)
    common = {"data.val_samples": 0, "train.val_every": 2, "data.num_workers": 2}
    tar = pretrain(tmp_path / "tar", tiny_overrides(tiny_clip_dir, steps=2, **common, **{
        "data.val_source": str(tmp_path / "val_tar" / "shard-{00..02}.tar")}))
    flat = pretrain(tmp_path / "folder", tiny_overrides(tiny_clip_dir, steps=2, **common, **{
        "data.val_source": str(folder)}))
    assert {"val_loss", "val_cls_cos", "val_patch_cos"} <= set(tar["val"]) == set(flat["val"])
    for k, v in flat["val"].items():
        assert tar["val"][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
    # val_samples: 0 means all of them; a limit takes the first N of a folder
    assert 0 < tar["val"]["val_loss"]
    some = pretrain(tmp_path / "some", tiny_overrides(tiny_clip_dir, steps=2, **{
        **common, "data.val_source": str(folder), "data.val_samples": 5}))
    assert some["val"]["val_loss"] != pytest.approx(flat["val"]["val_loss"], rel=1e-6)


def test_validation_pass_shards_by_sample_and_by_shard(tmp_path):
    """Every process reads a disjoint share; together they read every image exactly once, also
    with fewer shards than processes x workers."""
    from uta_cli.data.pipeline import EvalTransform, MaskCollator, Source, View, open_dataset

    write_shards(tmp_path / "tar", 3, 4)
    write_images(tmp_path / "folder", 11)
    views = [View("student", 16, (0.5,) * 3, (0.5,) * 3)]
    for src in (str(tmp_path / "tar" / "shard-{00..02}.tar"), str(tmp_path / "folder")):
        seen = []
        for rank in range(4):
            ds = open_dataset(src, "auto", EvalTransform(views))
            source = Source(ds, ds.transform if hasattr(ds, "transform") else None,
                            MaskCollator(None, (2, 2), 0), 3, 2, 0, rank, 4,
                            shuffle=False, drop_last=False, evaluation=True)
            ids = [int(i) for b in source.one_pass() for i in b["sample_id"]]
            seen.append(ids)
        everything = sorted(i for ids in seen for i in ids)
        assert len(everything) == len(set(everything)) == (12 if "tar" in src else 11)
        assert sum(1 for ids in seen if ids) >= 3


def test_a_limited_tar_validation_set_is_the_first_samples_for_any_number_of_processes(
        tmp_path):
    """data.val_samples on tar shards: the first N samples in shard-list order, dealt to the
    processes by shard, whatever their number and their loader workers."""
    from uta_cli.data.pipeline import EvalTransform, MaskCollator, Source, View, open_dataset
    from uta_cli.data.shards import sample_id_for

    write_shards(tmp_path, 3, 3, size=16, uneven=True)  # 3, 4, 5 samples
    spec = str(tmp_path / "shard-{00..02}.tar")
    in_order = [sample_id_for(str(tmp_path / f"shard-{s:02d}.tar"), f"s{s}_{i:03d}")
                for s, n in enumerate((3, 4, 5)) for i in range(n)]
    views = [View("student", 16, (0.5,) * 3, (0.5,) * 3)]
    for limit in (5, 7, 100):
        for world, workers in ((1, 0), (1, 2), (2, 2), (3, 1)):
            ids = []
            for rank in range(world):
                ds = open_dataset(spec, "auto", EvalTransform(views))
                source = Source(ds, ds.transform, MaskCollator(None, (2, 2), 0), 4, workers, 0,
                                rank, world, shuffle=False, drop_last=False, evaluation=True,
                                limit=limit)
                ids += [int(i) for b in source.one_pass() for i in b["sample_id"]]
            assert sorted(ids) == sorted(in_order[:limit]), (limit, world, workers)


def test_metrics_reduce_over_the_union_of_keys():
    """A process that logged only `loss` (all its images unreadable) still takes part in the
    same reductions; means count only the micro-steps that reported a metric."""
    from accelerate import Accelerator

    from uta_cli.train.run_state import reduce_means

    means = reduce_means(Accelerator(cpu=True),
                         {"loss": torch.tensor(3.0), "cls_cos": torch.tensor(1.0)},
                         {"loss": 3, "cls_cos": 2})
    assert means == {"cls_cos": 0.5, "loss": 1.0}


def test_resume_refuses_a_changed_recipe_unless_allowed(tmp_path, tiny_clip_dir):
    from uta_cli.errors import UtaUsageError

    first = tiny_overrides(tiny_clip_dir, steps=4, **{"train.checkpoint_every": 2})
    pretrain(tmp_path, first)
    changed = tiny_overrides(tiny_clip_dir, steps=6, **{"train.checkpoint_every": 2,
                                                        "optim.lr": 1e-4})
    with pytest.raises(UtaUsageError) as err:
        pretrain(tmp_path, changed)
    msg = str(err.value)
    assert "optim.lr: 0.002 -> 0.0001" in msg and "schedule.steps: 4 -> 6" in msg
    assert "--resume never" in msg and "--allow-changes optim.lr,schedule.steps" in msg
    with pytest.raises(UtaUsageError, match="cannot allow student.depth"):
        pretrain(tmp_path, changed, allow_changes=["optim.lr", "student.depth"])
    # a changed student is never allowed, even when named with everything else
    with pytest.raises(UtaUsageError, match="student.width: 32 -> 48"):
        pretrain(tmp_path, changed + ["student.width=48"],
                 allow_changes=["optim.lr,schedule.steps"])
    out = pretrain(tmp_path, changed, allow_changes=["optim.lr,schedule.steps"])
    assert out["step"] == 6
    records = metrics(tmp_path)
    resumed = [r for r in records if r.get("event") == "resume"]
    assert resumed == [{"event": "resume", "step": 4, "epoch": resumed[0]["epoch"],
                        "from": resumed[0]["from"],
                        "changes": {"optim.lr": [0.002, 0.0001], "schedule.steps": [4, 6]}}]
    assert [r["lr"] for r in records if r.get("step") == 5 and "lr" in r][0] < 1e-4
    import yaml

    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.002
    assert yaml.safe_load((tmp_path / "config.4.yaml").read_text())["optim"]["lr"] == 0.0001
    # the same command again: nothing differs from the newest checkpoint any more
    assert pretrain(tmp_path, changed)["step"] == 6


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_distributed_types_other_than_ddp_are_refused(kind, monkeypatch):
    from uta_cli.errors import UtaUsageError
    from uta_cli.train.setup import check_distributed_type, make_accelerator

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    with pytest.raises(UtaUsageError, match=f"configured for {kind}.*DDP"):
        make_accelerator("fp32")
    with pytest.raises(UtaUsageError, match="configured for FSDP"):
        check_distributed_type("FSDP")
    check_distributed_type("MULTI_GPU")


def test_one_process_runs_jobs_of_different_precision_one_after_another(tmp_path):
    """A notebook runs an fp32 job, then a bf16 one: Accelerate's process-wide state would refuse
    the second precision with a ValueError; each job gets the precision it asks for."""
    from uta_cli.train.setup import make_accelerator

    assert make_accelerator("fp32").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("fp32").mixed_precision == "no"


def test_ranks_draw_different_drop_path_masks_from_the_same_weights():
    """The engine seeds each optimizer step with (seed, rank, step): the student (same initial
    weights everywhere, built after set_seed(seed)) drops different paths on each rank, the same
    ones again for the same rank and step (a resumed run), and new ones on the next step."""
    from accelerate.utils import set_seed

    from uta_cli.models.student import UTAStudent
    from uta_cli.recipe import StudentConfig
    from uta_cli.train.engine import step_seed

    cfg = StudentConfig(family="eva", image_size=32, patch_size=8, width=32, depth=4, heads=2,
                        drop_path=0.5)
    students = []
    for _ in range(2):  # two ranks build their student
        set_seed(0)
        students.append(UTAStudent(cfg, 16))
    for (k, a), b in zip(students[0].state_dict().items(), students[1].state_dict().values()):
        assert torch.equal(a, b), k
    model = students[0].train()
    images = torch.randn(8, 3, 32, 32)
    keep = torch.arange(8).repeat(8, 1)

    def forward(rank, step):
        torch.manual_seed(step_seed(0, rank, step))
        with torch.no_grad():
            return model(images, keep)

    rank0, rank1 = forward(0, 7), forward(1, 7)
    assert not torch.allclose(rank0, rank1)
    assert torch.equal(forward(0, 7), rank0)
    assert not torch.allclose(forward(0, 8), rank0)
    model.eval()  # and without drop path the ranks agree exactly
    assert torch.equal(forward(0, 7), forward(1, 7))


@pytest.mark.parametrize("buffer", [0, 3], ids=["stored-order", "shuffle-buffer"])
def test_resuming_tar_shards_skips_raw_records_to_exactly_the_same_batches(tmp_path, buffer):
    """batches(epoch, skip=k) of a tar-shard source are the batches after the first k of an
    uninterrupted stream, with 2 loader workers, uneven shards (workers run out at different
    times) and k past the point where this rank's shards run out and the stream starts over;
    with the sample shuffle (a buffer of 3, 2 shards interleaved) too."""
    from uta_cli.data import shard_resume as tar_resume
    from uta_cli.data.pipeline import MaskCollator, Source, TrainTransform, View, open_dataset

    write_shards(tmp_path, 5, 3, size=20, uneven=True)  # 3,4,5,3,4 = 19 records
    views = [View("student", 8, (0.5,) * 3, (0.5,) * 3)]
    tf = TrainTransform(views, (0.5, 1.0), True, seed=0)
    ds = open_dataset(str(tmp_path / "shard-{00..04}.tar"), "auto", tf, rank=0, world=2,
                      shuffle_buffer=buffer, interleave=2)
    source = Source(ds, tf, MaskCollator(None, (1, 1), 0), 2, 2, 0, 0, 2,
                    samples_per_epoch=40)

    def ids(skip, n):
        stream = source.batches(1, skip)
        return [b["sample_id"].tolist() for b in itertools.islice(stream, n)]

    full = ids(0, 14)
    real = tar_resume.count_tar_records
    counted = []
    tar_resume.count_tar_records = lambda tar, shard: counted.append(shard) or real(tar, shard)
    try:
        for k in (1, 2, 3, 5, 8):
            assert ids(k, 14 - k) == full[k:], k
    finally:
        tar_resume.count_tar_records = real
    assert counted  # the skip counted records (without decoding them)
    # in one process (no loader workers) nothing before the resume point is decoded
    single = Source(ds, tf, MaskCollator(None, (1, 1), 0), 2, 0, 0, 0, 2, samples_per_epoch=40)
    decoded = []
    original = ds._decode
    ds._decode = lambda *a: decoded.append(a[1]) or original(*a)
    try:
        rest = [b["sample_id"].tolist() for b in itertools.islice(single.batches(1, 3), 2)]
    finally:
        ds._decode = original
    assert len(decoded) == 4 and len(rest) == 2


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun's ranks and their loader workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = open(f"/proc/{entry}/stat").read()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _torchrun(run_dir, sets):
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "uta_cli", "pretrain", "demo",
           "--output-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def test_tar_shards_two_processes_killed_mid_epoch_resume_bit_identical(tmp_path, tiny_clip_dir):
    """SIGKILL mid-epoch on tar shards (drop path 0.1, 2 loader workers, 2 processes under
    torchrun, sharded tar validation with fewer shards than processes x workers, the sample
    shuffle on with a buffer smaller than a shard); the resumed run ends with the weights of the
    uninterrupted one, bit for bit."""
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from uta_cli import checkpoint as ckpt
    from uta_cli.errors import UtaUsageError

    write_shards(tmp_path / "train", 8, 3, size=20, uneven=True)  # 32 records, 4 reader slots
    write_shards(tmp_path / "val", 3, 3, size=20, seed=1)
    sets = tiny_overrides(tiny_clip_dir, steps=10, **{
        "data.source": str(tmp_path / "train" / "shard-{00..07}.tar"),
        "data.samples_per_epoch": 24, "data.batch_size": 2, "data.num_workers": 2,
        "data.shuffle_buffer": 3, "data.shuffle_interleave": 2,  # the sample shuffle, bounded
        "student.drop_path": 0.1, "train.checkpoint_every": 4, "train.log_every": 1,
        "data.val_source": str(tmp_path / "val" / "shard-{00..02}.tar"), "data.val_samples": 0,
        "train.val_every": 5})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run and the one to kill side by side (most of their time is start-up)
    full = subprocess.Popen(_torchrun(tmp_path / "full", sets), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc = subprocess.Popen(_torchrun(tmp_path / "cut", sets), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    pointer = tmp_path / "cut" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not pointer.exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # launcher and ranks, all at once
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    _, full_err = full.communicate(timeout=600)
    assert full.returncode == 0, full_err[-3000:]
    stopped = int(ckpt.load_meta(ckpt.latest_checkpoint(str(tmp_path / "cut")))["step"])
    assert stopped in (4, 8)  # both mid-epoch (6 steps per epoch)

    # one process with the same global batch is refused mid-epoch on tar shards
    with pytest.raises(UtaUsageError, match="tar shards are dealt"):
        pretrain(tmp_path / "cut", [s for s in sets if not s.startswith("data.batch_size")] +
                 ["data.batch_size=4"])
    # so is another number of loader workers, even when allowed: they deal the shards too
    with pytest.raises(UtaUsageError, match="tar shards are dealt"):
        pretrain(tmp_path / "cut", sets + ["data.num_workers=1"],
                 allow_changes=["data.num_workers"])
    resumed = subprocess.run(_torchrun(tmp_path / "cut", sets), capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stdout

    expected = load_file(os.path.join(ckpt.latest_checkpoint(str(tmp_path / "full")),
                                      "model.safetensors"))
    got = load_file(os.path.join(ckpt.latest_checkpoint(str(tmp_path / "cut")),
                                 "model.safetensors"))
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    logged = [r for r in metrics(tmp_path / "cut") if "loss" in r and "event" not in r]
    assert [r["step"] for r in logged] == list(range(1, 11))
    vals = [r for r in metrics(tmp_path / "full") if r.get("event") == "val"]
    assert [r["step"] for r in vals] == [5, 10] and all(r["val_loss"] > 0 for r in vals)
    # the ranks stay in sync and read different samples
    end = [r for r in metrics(tmp_path / "full") if r.get("event") == "end"][-1]
    assert end["rank_weights"][0] == end["rank_weights"][1]
    assert end["rank_samples_digest"][0] != end["rank_samples_digest"][1]


def test_another_process_count_with_the_same_global_batch_continues_the_epoch():
    """The guard accepts 2 -> 1 processes when batch x processes x accumulation is kept (and
    records the batch change), refuses a changed global batch; an image-folder epoch then goes
    on with exactly the samples the first launch had not reached yet."""
    from uta_cli.data.pipeline import MaskCollator, Source
    from uta_cli.errors import UtaUsageError
    from uta_cli.train.resume_guard import check_resume

    recipe = {"data": {"batch_size": 4, "source": "/data"}, "train": {"grad_accum": 1}}
    two = {"world_size": 2, "batch_size": 4, "grad_accum": 1}
    kw = dict(source="ckpt", old_recipe=recipe, old_teacher=None, new_teacher=None,
              old_launch=two, allow=[])
    one = {"data": {"batch_size": 8, "source": "/data"}, "train": {"grad_accum": 1}}
    accepted = check_resume(new_recipe=one, new_launch={**two, "world_size": 1,
                                                         "batch_size": 8}, **kw)
    assert accepted.changes == {"data.batch_size": [4, 8]} and accepted.world_size == (2, 1)
    assert accepted.record()["world_size"] == [2, 1]
    with pytest.raises(UtaUsageError, match="global batch of 8.*giving 4"):
        check_resume(new_recipe=recipe, new_launch={**two, "world_size": 1}, **kw)

    class Ids(torch.utils.data.Dataset):
        def __len__(self):
            return 37

        def __getitem__(self, i):
            return {"sample_id": i}

    def source(rank, world, batch):
        return Source(Ids(), type("T", (), {"set_epoch": lambda self, e: None})(),
                      MaskCollator(None, (1, 1), 0), batch, 0, 5, rank, world)

    epoch, done = 3, 2  # two steps of 8 samples taken by the 2-process launch
    before = [int(i) for rank in range(2)
              for b in itertools.islice(source(rank, 2, 4).batches(epoch), done)
              for i in b["sample_id"]]
    after = [int(i) for b in source(0, 1, 8).batches(epoch, skip=done) for i in b["sample_id"]]
    whole = [int(i) for b in source(0, 1, 8).batches(epoch) for i in b["sample_id"]]
    assert not set(before) & set(after) and sorted(before + after) == sorted(whole)
    assert source(0, 1, 8).steps_per_epoch(1, 8) == source(0, 2, 4).steps_per_epoch(2, 4)


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar", "truncated", "gz"])
def test_tar_records_counted_from_headers_match_the_reader(tmp_path, fmt):
    """Counting from headers (or, for a compressed or damaged shard, with the reader) gives the
    number of samples the reader yields: long names, ustar prefixes, directories, extra fields."""
    from uta_cli.data.pipeline import open_dataset
    from uta_cli.data.shard_resume import count_tar_records

    formats = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
    path = tmp_path / ("shard.tar.gz" if fmt == "gz" else "shard.tar")
    with tarfile.open(path, "w:gz" if fmt == "gz" else "w",
                      format=formats.get(fmt, tarfile.USTAR_FORMAT)) as tar:
        tar.addfile(tarfile.TarInfo("subdir/") if fmt != "ustar" else _dir("subdir"))
        for i in range(7):
            key = ("d" * 60 + "/" + "k" * 70 + f"{i}") if i % 2 else f"sample{i}"
            for ext, data in (("png", b"x" * (100 + 37 * i)), ("cls", b"1"), ("txt", b"hi")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if fmt == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])
    ds = open_dataset(str(path), "tar", transform=None)
    assert count_tar_records(ds, str(path)) == sum(1 for _ in ds._read_shard(str(path)))
    if fmt != "truncated":
        assert count_tar_records(ds, str(path)) == 7
    from uta_cli.data.shard_resume import _tar_member_names

    with open(path, "rb") as f:  # plain tars are counted from their headers, the rest read
        assert (_tar_member_names(f) is None) == (fmt in ("truncated", "gz"))


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _class_sorted_shards(folder, classes: int = 2, shards_per_class: int = 4, per_shard: int = 48):
    """Shards packed class by class, as an ImageNet-style folder is: class 0's shards, then
    class 1's; each sample a tiny PNG with its .cls label."""
    os.makedirs(folder, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(png, "PNG")
    n = 0
    for c in range(classes):
        for _ in range(shards_per_class):
            with tarfile.open(os.path.join(folder, f"shard-{n:02d}.tar"), "w") as tar:
                for i in range(per_shard):
                    for ext, data in (("png", png.getvalue()), ("cls", str(c).encode())):
                        info = tarfile.TarInfo(f"s{n}_{i:03d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            n += 1
    return os.path.join(folder, f"shard-{{00..{n - 1:02d}}}.tar")


def class_mix(spec, buffer: int, interleave: int = 8, batches: int = 10, workers: int = 0):
    """The share of class 0 in each of the first `batches` training batches (batch 16)."""
    from uta_cli.data.pipeline import MaskCollator, Source, TrainTransform, View, open_dataset

    tf = TrainTransform([View("student", 8, (0.5,) * 3, (0.5,) * 3)], (0.5, 1.0), True, seed=0)
    ds = open_dataset(spec, "auto", tf, seed=0, shuffle_buffer=buffer, interleave=interleave)
    source = Source(ds, tf, MaskCollator(None, (1, 1), 0), 16, workers, 0, 0, 1,
                    samples_per_epoch=len(ds.shards) * 48)
    return [float((b["label"] == 0).float().mean())
            for b in itertools.islice(source.batches(0), batches)]


def test_the_shuffle_buffer_mixes_class_sorted_shards(tmp_path):
    """Class-sorted shards (class 0 in 4 shards of 48, then class 1 in 4; the global mix is
    1/2), the first 10 batches of 16: in stored order every batch holds one class; with the
    shipped shuffle (8 shards interleaved, a buffer of 400) and with a buffer of only 16 they
    are near 1/2. A buffer smaller than a shard without interleaving stays far from it: why
    the worker reads several shards at once."""
    from uta_cli.recipe import DataConfig

    def distance(shares):  # mean |share of class 0 - 1/2| over the batches
        return float(np.mean([abs(share - 0.5) for share in shares]))

    spec = _class_sorted_shards(tmp_path)
    stored = class_mix(spec, 0)
    assert all(share in (0.0, 1.0) for share in stored) and distance(stored) == 0.5
    shipped = class_mix(spec, DataConfig().shuffle_buffer, DataConfig().shuffle_interleave)
    assert distance(shipped) < 0.2 and all(0 < share < 1 for share in shipped), shipped
    small = class_mix(spec, 16, 8)
    assert distance(small) < 0.2 and all(0 < share < 1 for share in small), small
    assert distance(class_mix(spec, 16, 1)) > 0.25  # one shard at a time: mostly one class
    # keyed by (seed, epoch, rank, worker): the same batches again
    assert class_mix(spec, 16) == small
