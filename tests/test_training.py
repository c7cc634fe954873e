"""The engine end to end on tiny models: checkpoints, resume, SIGTERM, NaN guard, data errors,
two processes, and the demo's zero-shot report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_overrides, write_images
from safetensors.torch import load_file

from uta_cli import checkpoint as ckpt

STEPS = 200


def pretrain_cmd(run_dir, sets):
    cmd = [sys.executable, "-m", "uta_cli", "pretrain", "demo", "--output-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(run_dir, sets, timeout=300, extra=()):
    return subprocess.run(pretrain_cmd(run_dir, sets) + list(extra), capture_output=True,
                          text=True, timeout=timeout)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_weights(run_dir):
    return load_file(os.path.join(ckpt.latest_checkpoint(str(run_dir)), "model.safetensors"))


def start_and_stop(run_dir, sets, sig):
    """Start a run, wait for its first checkpoint, then send `sig`; return the finished process."""
    proc = subprocess.Popen(pretrain_cmd(run_dir, sets), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    deadline = time.time() + 240
    while not os.path.exists(pointer):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_clip_dir):
    run_dir = tmp_path_factory.mktemp("full")
    sets = tiny_overrides(tiny_clip_dir, steps=STEPS, **{"train.checkpoint_every": 10,
                                                        "train.log_every": 1})
    out = run(run_dir, sets)
    assert out.returncode == 0, out.stderr
    return run_dir, sets


def test_run_directory_layout_and_weights_only_checkpoint(uninterrupted):
    run_dir, _ = uninterrupted
    assert os.path.isfile(run_dir / "config.yaml")
    records = metrics(run_dir)
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert {"step", "epoch", "lr", "loss", "cls_cos", "patch_cos", "images_per_s"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns
    assert any(r.get("event") == "val" and "val_loss" in r for r in records)
    latest = ckpt.latest_checkpoint(str(run_dir))
    assert latest.endswith(ckpt.step_dirname(STEPS))
    state = torch.load(os.path.join(latest, "training_state.pt"), weights_only=True)
    assert state["step"] == STEPS and "optimizer" in state
    rng = torch.load(os.path.join(latest, "rng_rank0.pt"), weights_only=True)
    assert "torch" in rng
    meta = ckpt.load_meta(latest)
    assert meta["teacher"]["embed_dim"] == 32 and meta["mask"]["strategy"] == "reversed-block"
    assert meta["recipe"]["schedule"]["steps"] == STEPS
    # keep_checkpoints (3) prunes older folders
    assert len([d for d in os.listdir(run_dir / "checkpoints") if d.startswith("step_")]) == 3


def test_killed_run_resumes_to_identical_weights(uninterrupted, tmp_path):
    full_dir, sets = uninterrupted
    rc, _, _ = start_and_stop(tmp_path, sets, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    resumed_from = int(ckpt.load_meta(ckpt.latest_checkpoint(str(tmp_path)))["step"])
    assert 0 < resumed_from < STEPS
    out = run(tmp_path, sets)
    assert out.returncode == 0, out.stderr
    assert f"at step {resumed_from}" in out.stdout
    expected, got = final_weights(full_dir), final_weights(tmp_path)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    # the log holds each step once, as if never interrupted
    steps = [r["step"] for r in metrics(tmp_path) if "loss" in r and "event" not in r]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_checkpoints_then_exits_and_resumes(uninterrupted, tmp_path):
    full_dir, sets = uninterrupted
    rc, _, err = start_and_stop(tmp_path, sets, signal.SIGTERM)
    assert rc == 143, err
    assert "SIGTERM" in err and "Traceback" not in err
    stopped_at = int(ckpt.load_meta(ckpt.latest_checkpoint(str(tmp_path)))["step"])
    assert 10 <= stopped_at < STEPS  # saved where it stopped, not at the next periodic step
    out = run(tmp_path, sets)
    assert out.returncode == 0, out.stderr
    expected, got = final_weights(full_dir), final_weights(tmp_path)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_clip_dir):
    sets = tiny_overrides(tiny_clip_dir, steps=4, **{"train.checkpoint_every": 2})
    assert run(tmp_path, sets).returncode == 0
    good = final_weights(tmp_path)
    out = run(tmp_path, tiny_overrides(tiny_clip_dir, steps=10, **{
        "train.checkpoint_every": 2, "optim.lr": ".inf"}),
        extra=["--allow-changes", "optim.lr,schedule.steps"])
    assert out.returncode == 1
    assert "NaN or infinite" in out.stderr and "Traceback" not in out.stderr
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith(ckpt.step_dirname(4))
    for k, v in final_weights(tmp_path).items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, good[k], rtol=0, atol=0)


def test_image_folder_with_corrupt_images_is_skipped_and_counted(tmp_path, tiny_clip_dir):
    data = tmp_path / "images"
    write_images(data, 40)
    (data / "a" / "broken.png").write_bytes(b"not an image at all")
    (data / "b" / "truncated.png").write_bytes(open(data / "b" / "0001.png", "rb").read()[:60])
    sets = tiny_overrides(tiny_clip_dir, steps=10, **{
        "data.source": str(data), "data.num_workers": 2})
    out = run(tmp_path / "run", sets)
    assert out.returncode == 0, out.stderr
    records = metrics(tmp_path / "run")
    assert sum(r.get("skipped_images", 0) for r in records) >= 1
    assert records[-1]["event"] == "end" and records[-1]["step"] == 10


def test_missing_data_folder_is_exit_2(tmp_path, tiny_clip_dir):
    out = run(tmp_path, tiny_overrides(tiny_clip_dir, **{"data.source": str(tmp_path / "nope")}))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "nope" in out.stderr


def test_pretrain_streams_tar_shards(tmp_path, tiny_clip_dir):
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in range(4):
        with tarfile.open(tmp_path / f"shard-{s:02d}.tar", "w") as tar:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buf, "PNG")
                info = tarfile.TarInfo(f"s{s}_{i:03d}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    sets = tiny_overrides(tiny_clip_dir, steps=5, **{
        "data.source": str(tmp_path / "shard-{00..03}.tar"), "data.samples_per_epoch": 24,
        "data.num_workers": 2})
    out = run(tmp_path / "run", sets)
    assert out.returncode == 0, out.stderr
    assert metrics(tmp_path / "run")[-1]["step"] == 5  # 3 steps per epoch: the stream restarts
    too_few = run(tmp_path / "run2", tiny_overrides(tiny_clip_dir, **{
        "data.source": str(tmp_path / "shard-{00..01}.tar"), "data.samples_per_epoch": 12,
        "data.num_workers": 4}))
    assert too_few.returncode == 2 and "shard" in too_few.stderr


def test_output_dir_that_is_a_file_is_a_usage_error(tmp_path):
    from uta_cli.errors import UtaUsageError
    from uta_cli.train.setup import run_directory

    (tmp_path / "taken").write_text("not a run")
    with pytest.raises(UtaUsageError, match="is a file. Pass another --output-dir"):
        run_directory(str(tmp_path / "taken"), "demo")
    assert run_directory(str(tmp_path / "new" / "run"), "demo") == str(tmp_path / "new" / "run")
    assert os.path.isdir(tmp_path / "new" / "run")
