"""Outputs at fsspec URLs: zero-shot reports, per-class CSVs and exported models reach
memory:// and file:// destinations whole (memory:// stands in for an object store)."""

from __future__ import annotations

import csv
import io
import json

import fsspec
import pytest
import torch
from conftest import cli, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_dir):
    folder = tmp_path_factory.mktemp("run")
    args = ["pretrain", "demo", "--output-dir", folder]
    for s in tiny_overrides(tiny_clip_dir, steps=2, **{"train.checkpoint_every": 2}):
        args += ["--set", s]
    assert cli(*args).exit_code == 0
    return folder


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    yield fs
    for path in ("/zs", "/exp"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def test_zeroshot_reports_at_urls(run_dir, tmp_path, memfs):
    result = cli("zeroshot", "--ckpt", run_dir, "--dataset", "demo", "--workers", "0",
                 "--precision", "fp32", "--cache-dir", "none",
                 "--output-json", "memory://zs/report.json",
                 "--per-class", f"file://{tmp_path}/sub/per_class.csv")
    assert result.exit_code == 0, result.output
    report = json.loads(memfs.cat("/zs/report.json"))
    rows = list(csv.DictReader(open(tmp_path / "sub" / "per_class.csv")))
    assert len(rows) == report["num_classes"] == 16
    correct = sum(int(r["student_top1_correct"]) for r in rows)
    assert correct / report["num_samples"] == pytest.approx(report["acc1"], abs=1e-9)


def test_export_to_a_url_is_verified_then_uploaded(run_dir, tmp_path, memfs):
    url = "memory://exp/student.pt"
    result = cli("export", "--ckpt", run_dir, "--format", "torchscript", "--output", url)
    assert result.exit_code == 0, result.output
    model = torch.jit.load(io.BytesIO(memfs.cat("/exp/student.pt")))
    meta = json.loads(memfs.cat("/exp/student.pt.json"))
    x = torch.randn(2, *meta["input_size"])
    assert model(x).shape == (2, 32)
    again = cli("export", "--ckpt", run_dir, "--format", "torchscript", "--output", url)
    assert again.exit_code == 2 and "--force" in again.output
    assert cli("export", "--ckpt", run_dir, "--format", "torchscript", "--output", url,
               "--force").exit_code == 0
    folder = cli("export", "--ckpt", run_dir, "--format", "open-clip", "--output",
                 "memory://exp/oc")
    assert folder.exit_code == 2 and not memfs.exists("/exp/oc")
    local = cli("export", "--ckpt", run_dir, "--format", "torchscript", "--output",
                f"file://{tmp_path}/s.pt")
    assert local.exit_code == 0 and (tmp_path / "s.pt").is_file()
    unknown = cli("zeroshot", "--ckpt", run_dir, "--dataset", "demo", "--workers", "0",
                  "--cache-dir", "none", "--output-json", "nosuchfs://b/r.json")
    assert unknown.exit_code == 2 and "nosuchfs://b/r.json" in "".join(unknown.output.split())


def test_run_directory_at_a_url_writes_latest_last_and_resumes_from_it(
        tmp_path, tiny_clip_dir, monkeypatch):
    """--output-dir memory://...: every checkpoint's files reach the store before `latest`
    names it; a resume (from an empty local cache) trusts only what `latest` names."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = fsspec.filesystem("memory")
    writes = []
    for method in ("put_file", "pipe_file"):
        real = getattr(MemoryFileSystem, method)

        def record(self, path, *args, _real=real, _pipe=method == "pipe_file", **kwargs):
            writes.append(str(path if _pipe else args[0]).lstrip("/"))  # the remote path
            return _real(self, path, *args, **kwargs)

        monkeypatch.setattr(MemoryFileSystem, method, record)
    writes.clear()

    def pretrain(steps):
        args = ["pretrain", "demo", "--output-dir", "memory://runs/remote", "--allow-changes",
                "schedule.steps"]
        for s in tiny_overrides(tiny_clip_dir, steps=steps, **{"train.checkpoint_every": 2,
                                                               "train.keep_checkpoints": 2}):
            args += ["--set", s]
        return cli(*args)

    assert pretrain(4).exit_code == 0
    assert fs.cat("/runs/remote/checkpoints/latest").decode().strip() == "step_00000004"
    files = {"model.safetensors", "meta.json", "training_state.pt", "rng_rank0.pt"}
    for step in ("step_00000002", "step_00000004"):
        pointer = writes.index("runs/remote/checkpoints/latest",
                               next(i for i, w in enumerate(writes) if step in w))
        assert {w.rsplit("/", 1)[-1] for w in writes[:pointer] if step in w} >= files
    records = [json.loads(line) for line in fs.cat("/runs/remote/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "loss" in r and "event" not in r] == [1, 2, 3, 4]
    # an upload cut short: files of step 6 but `latest` still names step 4
    fs.pipe_file("/runs/remote/checkpoints/step_00000006/model.safetensors", b"half")
    monkeypatch.setenv("UTA_CACHE_DIR", str(tmp_path / "another-machine"))
    result = pretrain(6)
    assert result.exit_code == 0, result.output
    assert "at step 4" in result.output
    assert fs.cat("/runs/remote/checkpoints/latest").decode().strip() == "step_00000006"
    assert fs.cat("/runs/remote/checkpoints/step_00000006/model.safetensors") != b"half"
    kept = {p.rsplit("/", 1)[-1] for p in fs.ls("/runs/remote/checkpoints", detail=False)}
    assert kept == {"latest", "step_00000004", "step_00000006"}  # keep_checkpoints: 2
    fs.rm("/runs/remote", recursive=True)


def test_finetune_best_checkpoint_reaches_the_url(tmp_path):
    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.finetune import run_finetune

    fs = fsspec.filesystem("memory")
    sets = {"data.source": "demo", "data.batch_size": 8, "data.num_workers": 0,
            "demo.train_images": 64, "demo.val_images": 16, "data.val_samples": 0,
            "schedule.steps": 4, "schedule.warmup_steps": 1, "train.precision": "fp32",
            "train.checkpoint_every": 2, "train.val_every": 2, "init": "",
            "finetune.zeroshot_head": False, "student.image_size": 32, "student.patch_size": 8,
            "student.width": 32, "student.depth": 1, "student.heads": 2}
    recipe = load_recipe("finetune_demo", [f"{k}={v}" for k, v in sets.items()])
    summary = run_finetune(recipe, output_dir="memory://runs/ft", resume="auto")
    best = json.loads(fs.cat("/runs/ft/checkpoints/best/meta.json"))
    assert best["best"]["step"] == summary["best"]["step"]
    assert fs.exists("/runs/ft/checkpoints/best/model.safetensors")
    assert fs.cat("/runs/ft/checkpoints/latest").decode().strip() == "step_00000004"
    fs.rm("/runs/ft", recursive=True)
