"""`train.sharding: fsdp` (PyTorch FSDP2) against DDP, 2 processes with gloo on the CPU, fp32.

Two torchrun launches in all (each costs seconds of imports): tests/sharding_driver.py runs
several in-process runs per launch; the first is killed with SIGKILL in its last run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port, tiny_overrides
from safetensors.torch import load_file
from test_scale import _descendants
from typer.testing import CliRunner

from uta_cli import checkpoint as ckpt
from uta_cli.app import app
from uta_cli.errors import UtaUsageError
from uta_cli.recipe import load_recipe

DRIVER = os.path.join(os.path.dirname(__file__), "sharding_driver.py")
STEPS = 6
TUNE = {"data.source": "demo", "data.batch_size": 4, "data.num_workers": 0,
        "demo.train_images": 64, "demo.val_images": 20, "data.val_samples": 0,
        "schedule.steps": 4, "schedule.warmup_steps": 1, "train.precision": "fp32",
        "train.log_every": 1, "train.checkpoint_every": 2, "train.val_every": 2,
        "finetune.ema_decay": 0.9, "finetune.layer_decay": 0.5, "finetune.zeroshot_head": True,
        "finetune.label_smoothing": 0.1, "optim.grad_clip": 1.0}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), *args]


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in _metrics(run_dir) if "loss" in r and "event" not in r}


def _weights(run_dir, name="model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(os.path.join(ckpt.latest_checkpoint(str(run_dir)), name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_clip_dir):
    """Launch 1 (driver, phase "runs"), killed with SIGKILL in its last run, a sharded one,
    after that run's first checkpoint; then launch 2 (driver, phase "resume")."""
    out = tmp_path_factory.mktemp("sharding")
    pre = tiny_overrides(tiny_clip_dir, steps=STEPS, **{
        "data.batch_size": 4, "train.grad_accum": 2, "optim.grad_clip": 1.0,
        "train.checkpoint_every": 2, "data.val_samples": 17,  # 9 + 8: uneven validation shares
        "train.val_every": 3, "eval.zeroshot": "demo", "eval.zeroshot_every": 3})
    sets = out / "sets.json"
    sets.write_text(json.dumps({"pretrain": pre, "finetune": [f"{k}={v}" for k, v in
                                                              TUNE.items()]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UTA_CACHE_DIR": str(out / "cache")}
    first = subprocess.Popen(_torchrun(DRIVER, "runs", str(out), str(sets)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=env)
    pointer = out / "cut" / "checkpoints" / "latest"
    deadline = time.time() + 400
    while not pointer.exists():
        if first.poll() is not None:
            pytest.fail(first.communicate()[1][-3000:])
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    for pid in [first.pid, *_descendants(first.pid)]:  # launcher and ranks, all at once
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert (out / "runs.json").is_file()
    stopped = int(ckpt.load_meta(ckpt.latest_checkpoint(str(out / "cut")))["step"])
    assert stopped < STEPS
    second = subprocess.run(_torchrun(DRIVER, "resume", str(out), str(sets)),
                            capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, stopped


def test_fsdp_gives_the_losses_and_weights_of_ddp(runs):
    """Accumulation 2, clipping, uneven validation shares, zero-shot while training; and the
    MIM objective's [MASK] token with activation checkpointing."""
    out, _ = runs
    for ddp, fsdp in (("ddp", "fsdp"), ("mim_ddp", "mim_fsdp")):
        a, b = _steps(out / ddp), _steps(out / fsdp)
        assert sorted(a) == sorted(b) and len(a) >= 2
        for step in a:
            for key in ("loss", "grad_norm"):
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (fsdp, step, key)
        wa, wb = _weights(out / ddp), _weights(out / fsdp)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert "mask_token" in _weights(out / "mim_fsdp")
    events = {n: [r for r in _metrics(out / n) if r.get("event") in ("val", "zeroshot")]
              for n in ("ddp", "fsdp")}
    assert [r["step"] for r in events["fsdp"]] == [r["step"] for r in events["ddp"]]
    for a, b in zip(events["ddp"], events["fsdp"]):
        for k, v in a.items():
            if isinstance(v, float) and k != "train_s":
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["step"], k)
    end = [r for r in _metrics(out / "fsdp") if r.get("event") == "end"][-1]
    assert end["rank_weights"][0] == end["rank_weights"][1]  # the gathered weights agree


def test_bf16_fsdp_stays_close_to_bf16_ddp(runs):
    """bf16 parameters and compute under FSDP (fp32 reduction) against DDP's autocast over fp32
    weights: not equal, but the same training to bf16 precision; checkpoints stay fp32."""
    out, _ = runs
    a, b = _steps(out / "bf16_ddp"), _steps(out / "bf16_fsdp")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=2e-2), step
    assert all(v.dtype == torch.float32 for v in _weights(out / "bf16_fsdp").values())


def test_checkpoint_layout_and_shards_round_trip(runs):
    out, _ = runs
    folder = ckpt.latest_checkpoint(str(out / "fsdp"))
    names = set(os.listdir(folder))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "model.safetensors", "meta.json",
            "training_state.pt", "rng_rank0.pt", "rng_rank1.pt"} <= names
    state = torch.load(os.path.join(folder, "training_state.pt"), weights_only=True)
    assert state["sharding"] == "fsdp" and "optimizer" not in state
    # today's layout: the same keys and shapes as the DDP run's
    ddp = _weights(out / "ddp")
    assert {k: v.shape for k, v in _weights(out / "fsdp").items()} == \
        {k: v.shape for k, v in ddp.items()}
    with open(out / "runs.json") as f:
        assert json.load(f)["round_trip"]  # the shards, gathered = model.safetensors, exactly


def test_resume_across_ddp_and_fsdp_continues_the_run(runs):
    """From step 2 of each run under the other sharding: the optimizer state converted, the
    losses of the uninterrupted run."""
    out, _ = runs
    for source, resumed in (("ddp", "ddp_to_fsdp"), ("fsdp", "fsdp_to_ddp")):
        a, b = _steps(out / source), _steps(out / resumed)
        assert sorted(b) == list(range(3, STEPS + 1))
        for step in b:
            assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), (resumed, step)
        changes = [r for r in _metrics(out / resumed) if r.get("event") == "resume"]
        assert changes and "train.sharding" in changes[0]["changes"]


def test_killed_fsdp_run_resumes_bit_identical(runs):
    out, stopped = runs
    expected, got = _weights(out / "fsdp"), _weights(out / "cut")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    a, b = _steps(out / "fsdp"), _steps(out / "cut")
    assert sorted(b) == list(range(1, STEPS + 1))
    assert all(b[s]["loss"] == a[s]["loss"] for s in range(stopped + 1, STEPS + 1))


def test_finetuning_from_an_fsdp_run_under_fsdp(runs):
    """Layer decay, EMA, zero-shot head, best checkpoint: fsdp = ddp; a resume of the fsdp
    fine-tuning from its middle checkpoint ends bit-identical, EMA included."""
    out, _ = runs
    a, b = _steps(out / "tune_ddp"), _steps(out / "tune_fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
        assert b[step]["lr"] == a[step]["lr"]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = _weights(out / "tune_ddp", name), _weights(out / "tune_fsdp", name)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    vals = {n: [r for r in _metrics(out / n) if r.get("event") == "val"]
            for n in ("tune_ddp", "tune_fsdp")}
    assert [r["val_ema_acc1"] for r in vals["tune_fsdp"]] == \
        [r["val_ema_acc1"] for r in vals["tune_ddp"]]
    assert os.path.isfile(out / "tune_fsdp" / "checkpoints" / "best" / "ema.safetensors")
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = _weights(out / "tune_fsdp", name), _weights(out / "tune_fsdp_resumed", name)
        for k in wa:
            assert torch.equal(wb[k], wa[k]), f"{name} {k}"


def test_an_fsdp_run_zero_shots_and_exports_as_a_ddp_run(runs, tmp_path):
    out, _ = runs
    runner = CliRunner()
    acc = {}
    for name in ("ddp", "fsdp"):
        report = tmp_path / f"{name}.json"
        res = runner.invoke(app, ["zeroshot", "--ckpt", str(out / name), "--dataset", "demo",
                                  "--output-json", str(report), "--precision", "fp32"])
        assert res.exit_code == 0, res.output
        acc[name] = json.loads(report.read_text())
    assert acc["fsdp"]["num_samples"] == acc["ddp"]["num_samples"] > 0
    assert acc["fsdp"]["acc1"] == pytest.approx(acc["ddp"]["acc1"], abs=1e-9)
    exported = tmp_path / "student.pt"
    res = runner.invoke(app, ["export", "--ckpt", str(out / "fsdp"), "--format", "torchscript",
                              "--output", str(exported)])
    assert res.exit_code == 0, res.output
    assert exported.stat().st_size > 0


def test_a_process_that_cannot_see_the_checkpoint_folder_stops_every_process(runs):
    out, _ = runs
    with open(out / "resume.json") as f:
        message = json.load(f)["blind"]
    assert "process 1 cannot see" in message and "every process reaches" in message


def test_bad_sharding_settings_are_refused(tiny_clip_dir):
    from uta_cli.workflows.finetune import check_recipe as check_finetune
    from uta_cli.workflows.pretrain import check_recipe as check_pretrain

    sets = tiny_overrides(tiny_clip_dir)
    with pytest.raises(UtaUsageError, match="bf16 or fp32"):
        check_pretrain(load_recipe("demo", [*sets, "train.sharding=fsdp",
                                            "train.precision=fp16"]))
    with pytest.raises(UtaUsageError, match="contrastive tuning"):
        check_finetune(load_recipe("contrastive_demo", ["train.sharding=fsdp",
                                                        "init=/some/run"]))
    with pytest.raises(UtaUsageError, match="train.sharding"):
        load_recipe("demo", ["train.sharding=zero3"])
