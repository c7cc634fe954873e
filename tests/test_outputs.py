"""Outputs at fsspec URLs: zero-shot reports, per-class CSVs and exported models reach
memory:// and file:// destinations whole (memory:// stands in for an object store)."""

from __future__ import annotations

import csv
import io
import json

import fsspec
import pytest
import torch
from conftest import tiny_overrides
from typer.testing import CliRunner

from uta_cli.app import app

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


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
