"""train.report_to: every metrics.jsonl record also reaches the trackers (TensorBoard event
files read back here), the gradient norm before clipping is logged beside the loss, the
resolved recipe is the run's hyper-parameters, and a tracker that is not installed is exit 2
naming its extra."""

from __future__ import annotations

import glob
import json
import os

import pytest
from conftest import cli, tiny_overrides

from uta_cli.train import tracking as tracking


def pretrain(run_dir, sets):
    args = ["pretrain", "demo", "--output-dir", run_dir]
    for s in sets:
        args += ["--set", s]
    return cli(*args)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_tensorboard_receives_every_record_and_the_recipe(tmp_path, tiny_clip_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = tiny_overrides(tiny_clip_dir, steps=4, **{
        "train.report_to": "[tensorboard]", "train.val_every": 2,
        "optim.grad_clip": 1e-6})  # clipping everything: the logged norm is the one before
    result = pretrain(tmp_path, sets)
    assert result.exit_code == 0, result.output
    steps = [r for r in records(tmp_path) if "event" not in r]
    vals = [r for r in records(tmp_path) if r.get("event") == "val"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and len(vals) == 2
    assert all(r["grad_norm"] > 1e-3 for r in steps)  # before clipping to 1e-6

    files = glob.glob(str(tmp_path / "tensorboard" / "**" / "events.out.tfevents.*"),
                      recursive=True)
    assert files
    scalars = {}
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    for key in ("loss", "grad_norm", "lr", "cls_cos", "patch_cos"):
        assert scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in steps},
                                                        rel=1e-6), key
    assert scalars["val/val_loss"] == pytest.approx({r["step"]: r["val_loss"] for r in vals},
                                                    rel=1e-6)
    # the resolved recipe as flattened hyper-parameters (accelerate's hparams.yml beside them)
    import yaml

    (hparams_file,) = glob.glob(str(tmp_path / "tensorboard" / "**" / "hparams.yml"),
                                recursive=True)
    hparams = yaml.safe_load(open(hparams_file))
    assert hparams["optim.grad_clip"] == 1e-6 and hparams["schedule.steps"] == 4
    assert hparams["student.width"] == 32 and hparams["train.report_to"] == '["tensorboard"]'
    assert hparams["data.crop_scale"] == "[0.6, 1.0]"  # the demo recipe's


def test_flatten_gives_scalars_only():
    flat = tracking.flatten({"a": {"b": 1, "c": [1, 2], "d": {"e": None}}, "f": True,
                             "student": {"timm_kwargs": {"ref_feat_shape": [16, 16]}}})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d.e": "", "f": True,
                    "student.timm_kwargs": '{"ref_feat_shape": [16, 16]}'}
    space, values = tracking.scalars({"event": "val", "step": 3, "val_loss": 0.5, "ok": True,
                                      "name": "x"})
    assert space == "val" and values == {"val/val_loss": 0.5}
    # a NaN metric (top-5 of fewer than five classes) is meaningless: no point is sent for it
    _, values = tracking.scalars({"event": "zeroshot", "step": 3, "zeroshot_acc1": 0.5,
                                  "zeroshot_acc5": float("nan")})
    assert values == {"zeroshot/zeroshot_acc1": 0.5}
    assert tracking.scalars({"event": "end", "step": 3, "x": 1.0}) == (None, {})


def test_a_tracker_that_is_not_installed_is_exit_2_naming_the_extra(tmp_path, tiny_clip_dir,
                                                                    monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    result = pretrain(tmp_path, tiny_overrides(tiny_clip_dir, steps=2, **{
        "train.report_to": "[tensorboard, wandb]"}))
    assert result.exit_code == 2, result.output
    assert "uta-cli[wandb]" in result.output and "Traceback" not in result.output
    bad = pretrain(tmp_path / "b", tiny_overrides(tiny_clip_dir, steps=2, **{
        "train.report_to": "[tensorbord]"}))
    assert bad.exit_code == 2 and "tensorboard" in bad.output
    # MLflow and aim are not offered: exit 2 naming the trackers that are, before any work
    for name in ("mlflow", "aim"):
        gone = pretrain(tmp_path / name, tiny_overrides(tiny_clip_dir, steps=2, **{
            "train.report_to": f"[{name}]"}))
        text = " ".join(gone.output.split())
        assert gone.exit_code == 2 and "'tensorboard', 'wandb'" in text, gone.output
        assert name in text and "Traceback" not in text
        assert not (tmp_path / name).exists()


def wandb_records(path):
    """The protobuf records of an offline .wandb file: a 7-byte W&B header, then LevelDB log
    blocks of 32 KiB whose records (4-byte CRC, 2-byte length, 1-byte type) may span blocks."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    out, part, pos = [], b"", 7
    while pos + 7 <= len(data):
        if (pos % 32768) + 7 > 32768:  # too little room left for a header: skip to next block
            pos = (pos // 32768 + 1) * 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def test_wandb_offline_keeps_the_run_in_the_run_directory(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sets = tiny_overrides(tiny_clip_dir, steps=3, **{"train.report_to": "[wandb]"})
    result = pretrain(tmp_path, sets)
    assert result.exit_code == 0, result.output
    steps = [r for r in records(tmp_path) if "event" not in r]
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged, config, finished = {}, {}, False
    for record in wandb_records(run):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            if "train/loss" in items:
                logged[items["_step"]] = items["train/loss"]
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                           for i in record.config.update})
        elif kind == "exit":  # written by finish: the run is complete before the process ends
            finished = True
    assert logged == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)
    assert config["schedule.steps"] == 3 and config["train.report_to"] == '["wandb"]'
    assert finished
