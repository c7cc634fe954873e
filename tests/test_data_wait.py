"""The data wait: data_wait_frac in metrics.jsonl and the progress line, the largest over
processes, and the warning naming the remedies when a slow loader keeps the step waiting after
the first logging window."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, tiny_overrides

from uta_cli.data.pipeline import Source
from uta_cli.train.data_wait import DataWaitWatch

REMEDIES = ("data.num_workers", "uta shards", "data.decode=gpu")


def _slow_after(monkeypatch, seconds: float, from_batch: int = 0, until_batch: int = 10**9):
    """Every batch the engine asks for, from `from_batch` to `until_batch`, takes `seconds`
    more: an injected slow loader."""
    real = Source.batches
    count = [0]

    def batches(self, epoch, skip=0):
        for batch in real(self, epoch, skip):
            if from_batch <= count[0] < until_batch:
                time.sleep(seconds)
            count[0] += 1
            yield batch

    monkeypatch.setattr(Source, "batches", batches)


def _pretrain(tmp_path, teacher, monkeypatch, name):
    """A tiny pre-training run whose steps take 0.4 s more (a model with some compute to hide
    the loader behind: the tiny one is faster than its in-process loader)."""
    from uta_cli.recipe import load_recipe
    from uta_cli.tasks.alignment import AlignmentTask
    from uta_cli.workflows.pretrain import run_pretrain

    step = AlignmentTask.training_step
    monkeypatch.setattr(AlignmentTask, "training_step",
                        lambda self, model, batch: time.sleep(0.4) or step(self, model, batch))
    sets = tiny_overrides(teacher, steps=8, **{"train.log_every": 2,
                                               "train.checkpoint_every": 0})
    run_pretrain(load_recipe("demo", sets), output_dir=str(tmp_path / name), resume="never")
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "data_wait_frac" in r]


def test_slow_loader_warns_after_the_first_window(tmp_path, tiny_clip_dir, monkeypatch,
                                                  caplog, capsys):
    caplog.set_level(logging.WARNING, logger="uta_cli")
    _slow_after(monkeypatch, 0.5)
    records = _pretrain(tmp_path, tiny_clip_dir, monkeypatch, "slow")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(r["data_wait_frac"] > 0.4 for r in records)  # 0.5 s of every 0.9 s step
    warnings = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(warnings) == 1 and all(k in warnings[0] for k in REMEDIES)
    assert "now 0" in warnings[0]  # the recipe's data.num_workers, named
    assert re.search(r"step 2 loss .* img/s  data \d+%", capsys.readouterr().out)


def test_slow_first_window_only_does_not_warn(tmp_path, tiny_clip_dir, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="uta_cli")
    _slow_after(monkeypatch, 0.5, until_batch=2)  # loader start-up: the first window only
    records = _pretrain(tmp_path, tiny_clip_dir, monkeypatch, "startup")
    assert records[0]["data_wait_frac"] > 0.4
    assert all(r["data_wait_frac"] < 0.1 for r in records[1:])
    assert not any("waited for data" in r.getMessage() for r in caplog.records)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        watch = DataWaitWatch(torch.device("cpu"))
        frac = watch.window([0.05, 0.3][rank], 1.0, step=10)
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(frac))
    finally:
        torch.distributed.destroy_process_group()


def test_data_wait_frac_is_the_largest_over_processes(tmp_path):
    # fork: the children need nothing new imported (spawn would re-import torch, 20+ s here)
    mp.start_processes(_rank, args=(free_port(), str(tmp_path / "frac")), nprocs=2,
                       start_method="fork")
    assert [float((tmp_path / f"frac.{r}").read_text()) for r in (0, 1)] == [0.3, 0.3]


@pytest.mark.parametrize("windows, frac, warns", [(1, 0.9, False), (2, 0.09, False),
                                                 (2, 0.11, True)])
def test_warning_threshold(windows, frac, warns):
    watch = DataWaitWatch(torch.device("cpu"), {"data": {"num_workers": 4, "decode": "cpu"}})
    for i in range(windows):
        watch.window(frac, 1.0, step=10 * (i + 1))
    msg = watch.warning(frac)
    assert (msg is not None) == warns
    if warns:
        assert "now 4" in msg and "now cpu" in msg and "last 10 step(s)" in msg
        assert watch.warning(frac) is None  # once per run
