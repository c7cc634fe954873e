"""Damaged inputs and exhausted memory: each is exit 1 or 2 with the path and what is wrong,
never a traceback; an out-of-memory error names the batch-size knobs and keeps the last good
checkpoint. Memory exhaustion is simulated by making the training step (or the evaluation's
image encoder) raise what torch raises."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import cli, tiny_overrides

from uta_cli import checkpoint as ckpt


def pretrain_args(run_dir, sets):
    args = ["pretrain", "demo", "--output-dir", run_dir]
    for s in sets:
        args += [s] if s.startswith("--") or "=" not in s else ["--set", s]
    return args


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_clip_dir):
    run_dir = tmp_path_factory.mktemp("good")
    sets = tiny_overrides(tiny_clip_dir, steps=2, **{"train.checkpoint_every": 2})
    result = cli(*pretrain_args(run_dir, sets))
    assert result.exit_code == 0, result.output
    # resumed for 2 more steps: a longer schedule is a change the resume guard must be told of
    return run_dir, tiny_overrides(tiny_clip_dir, steps=4, **{"train.checkpoint_every": 2}) + \
        ["--allow-changes", "schedule.steps"]


def damaged_copy(good_run, tmp_path, damage) -> tuple[str, str]:
    run_dir = tmp_path / "run"
    shutil.copytree(good_run[0], run_dir)
    folder = os.path.join(run_dir, "checkpoints", ckpt.step_dirname(2))
    damage(folder)
    return str(run_dir), folder


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def assert_clean_failure(result, code, *needles):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    squashed = "".join(result.output.split())  # rich wraps long lines, paths included
    for needle in needles:
        assert "".join(needle.split()) in squashed, (needle, result.output)


ZS = ["--dataset", "demo", "--workers", "0", "--precision", "fp32", "--cache-dir", "none",
      "--batch-size", "4"]


@pytest.mark.parametrize("what", ["weights", "meta", "training_state", "rng"])
def test_truncated_or_corrupt_checkpoint_files_name_the_file(good_run, tmp_path, what):
    file = {"weights": "model.safetensors", "meta": "meta.json",
            "training_state": "training_state.pt", "rng": "rng_rank0.pt"}[what]
    if what == "meta":
        run_dir, folder = damaged_copy(good_run, tmp_path, lambda f: open(
            os.path.join(f, file), "w").write('{"step": 2, "task'))
    else:
        run_dir, folder = damaged_copy(good_run, tmp_path,
                                       lambda f: truncate(os.path.join(f, file)))
    path = os.path.join(folder, file)
    # resuming reads every file of the checkpoint
    assert_clean_failure(cli(*pretrain_args(run_dir, good_run[1])), 2, path, "damaged")
    if what in ("weights", "meta"):  # evaluation and export read these two
        assert_clean_failure(cli("zeroshot", "--ckpt", run_dir, *ZS), 2, path, "damaged")
        assert_clean_failure(cli("export", "--ckpt", folder, "--format", "torchscript",
                                 "--output", tmp_path / "m.pt"), 2, path)
        assert not (tmp_path / "m.pt").exists()


def test_half_written_run_folders(good_run, tmp_path):
    # `latest` names a folder that is not there (the folder was deleted or never finished)
    run_dir, folder = damaged_copy(good_run, tmp_path, shutil.rmtree)
    assert_clean_failure(cli(*pretrain_args(run_dir, good_run[1])), 2, "step_00000002",
                         "--resume never")
    assert_clean_failure(cli("zeroshot", "--ckpt", run_dir, *ZS), 2, "latest")
    # step folders but no pointer: none is known to be complete, so none is trusted
    shutil.rmtree(run_dir)
    run_dir, folder = damaged_copy(good_run, tmp_path, lambda f: os.remove(
        os.path.join(os.path.dirname(f), ckpt.LATEST)))
    result = cli(*pretrain_args(run_dir, good_run[1]))
    assert_clean_failure(result, 2, "no checkpoints/latest", folder, "--resume never")
    # ... until the user names one
    assert cli(*pretrain_args(run_dir, good_run[1]), "--resume", folder).exit_code == 0
    assert ckpt.latest_checkpoint(run_dir).endswith(ckpt.step_dirname(4))
    # a checkpoint folder missing its weights
    shutil.rmtree(run_dir)
    run_dir, folder = damaged_copy(good_run, tmp_path, lambda f: os.remove(
        os.path.join(f, "model.safetensors")))
    assert_clean_failure(cli("zeroshot", "--ckpt", folder, *ZS), 2, folder, "incomplete",
                         "model.safetensors")
    assert_clean_failure(cli(*pretrain_args(run_dir, good_run[1])), 2, "model.safetensors")


def test_checkpoint_of_another_task_or_model(good_run, tmp_path, tiny_clip_dir):
    def retask(folder):
        path = os.path.join(folder, "meta.json")
        meta = json.load(open(path))
        meta["task"] = "classification"
        json.dump(meta, open(path, "w"))

    run_dir, folder = damaged_copy(good_run, tmp_path, retask)
    assert_clean_failure(cli(*pretrain_args(run_dir, good_run[1])), 2, folder,
                         "'classification' checkpoint")
    # same task, another model: the recipe's student changed since the checkpoint
    wider = tiny_overrides(tiny_clip_dir, steps=2, **{"student.width": 64,
                                                      "train.checkpoint_every": 2})
    assert_clean_failure(cli(*pretrain_args(good_run[0], wider)), 2,
                         "student.width: 32 -> 64", "--resume never")


def test_unreadable_recipes_are_exit_2(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  source: [demo\n")
    for recipe, needle in ((binary, str(binary)), (folder, str(folder)),
                           (broken, "not valid YAML"),
                           ("memory://nowhere/recipe.yaml", "memory://nowhere/recipe.yaml"),
                           ("nosuchprotocol://bucket/r.yaml", "nosuchprotocol://bucket/r.yaml")):
        assert_clean_failure(cli("pretrain", recipe), 2, needle)


def _oom_after(calls: int, error: BaseException):
    from uta_cli.tasks.alignment import AlignmentTask

    real = AlignmentTask.training_step
    seen = {"n": 0}

    def step(self, model, batch):
        seen["n"] += 1
        if seen["n"] > calls:
            raise error
        return real(self, model, batch)

    return step


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 8589934592 bytes. Error code 12"),
], ids=["cuda", "host"])
def test_out_of_memory_in_training_names_the_knobs_and_keeps_the_checkpoint(
        tmp_path, tiny_clip_dir, monkeypatch, error):
    from uta_cli.tasks.alignment import AlignmentTask

    monkeypatch.setattr(AlignmentTask, "training_step", _oom_after(5, error))
    sets = tiny_overrides(tiny_clip_dir, steps=8, **{"train.checkpoint_every": 2,
                                                    "data.batch_size": 8})
    result = cli(*pretrain_args(tmp_path, sets))
    assert_clean_failure(result, 1, "out of memory", "data.batch_size=8",
                         "train.grad_accum=1", "step 4", "--set data.batch_size=4 --set "
                         "train.grad_accum=2")
    assert "training step 6" in result.output
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith(ckpt.step_dirname(4))
    # the advice works: the same command with the smaller batch resumes from step 4
    monkeypatch.undo()
    result = cli(*pretrain_args(tmp_path, sets))
    assert result.exit_code == 0 and "at step 4" in result.output, result.output


def test_out_of_memory_in_evaluation_names_batch_size(good_run, monkeypatch):
    from uta_cli.evaluate import encoders as encoders

    def oom(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(encoders.StudentEncoder, "__call__", oom)
    assert_clean_failure(cli("zeroshot", "--ckpt", good_run[0], *ZS), 1, "out of memory",
                         "--batch-size (now 4)")
