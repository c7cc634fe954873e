"""Runs inside `torchrun --nproc_per_node 2` for tests/test_sharding.py: several in-process
pre-training and fine-tuning runs per launch (each launch costs seconds of imports).

    python -m torch.distributed.run --nproc_per_node 2 tests/sharding_driver.py PHASE OUT SETS
PHASE: "runs" (ddp and fsdp side by side, resumes across them, the shards round trip; writes
runs.json, then starts the fsdp run that the test kills with SIGKILL) or "resume" (the killed
run resumed; fine-tuning from the fsdp run, fsdp and ddp, and a resume of it).
SETS: a JSON file {"pretrain": [...], "finetune": [...]} of --set overrides.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from uta_cli import checkpoint as ckpt
from uta_cli.errors import UtaUsageError
from uta_cli.models.student import UTAStudent
from uta_cli.recipe import StudentConfig, load_recipe
from uta_cli.train.sharded_state import check_every_rank_sees, load_sharded
from uta_cli.train.sharding import full_state_dict, shard_model
from uta_cli.workflows.finetune import run_finetune
from uta_cli.workflows.pretrain import run_pretrain


def pretrain(out: str, name: str, sets: list[str], sharding: str, resume: str = "never",
             allow: tuple[str, ...] = ()) -> dict:
    recipe = load_recipe("demo", [*sets, f"train.sharding={sharding}"])
    return run_pretrain(recipe, output_dir=os.path.join(out, name), resume=resume,
                        allow_changes=allow)


def step_dir(out: str, name: str, step: int) -> str:
    return os.path.join(out, name, "checkpoints", ckpt.step_dirname(step))


def round_trip(out: str, name: str) -> bool:
    """A fresh sharded student loads the run's DCP shards; gathered, they are the run's
    consolidated model.safetensors, bit for bit."""
    folder = ckpt.latest_checkpoint(os.path.join(out, name))
    meta = ckpt.load_meta(folder)
    student = shard_model(UTAStudent(StudentConfig(**meta["student"]), meta["embed_dim"],
                                     mask_token=meta["objective"] == "mim"), "fp32")
    optimizer = torch.optim.AdamW(student.parameters())
    with torch.no_grad():  # scramble: the load must overwrite every shard
        for p in student.parameters():
            p.add_(1.0)
    load_sharded(folder, student, optimizer)
    gathered = full_state_dict(student)
    if dist.get_rank() != 0:
        return True
    saved = load_file(os.path.join(folder, "model.safetensors"))
    return gathered.keys() == saved.keys() and all(torch.equal(gathered[k], saved[k])
                                                    for k in saved)


def phase_runs(out: str, sets: dict) -> None:
    pre = sets["pretrain"]
    for sharding in ("ddp", "fsdp"):
        pretrain(out, sharding, pre, sharding)
        pretrain(out, f"mim_{sharding}", [*pre, "objective=mim", "schedule.steps=2",
                                          "train.checkpoint_every=2",
                                          "train.grad_checkpointing=true"], sharding)
        pretrain(out, f"bf16_{sharding}", [*pre, "train.precision=bf16", "schedule.steps=2",
                                           "train.checkpoint_every=2", "train.val_every=0",
                                           "eval.zeroshot=none"], sharding)
    # resume across the two: from each run's step-2 checkpoint under the other sharding
    allow = ("train.sharding",)
    pretrain(out, "ddp_to_fsdp", pre, "fsdp", step_dir(out, "ddp", 2), allow)
    pretrain(out, "fsdp_to_ddp", pre, "ddp", step_dir(out, "fsdp", 2), allow)
    done(out, "runs", {"round_trip": round_trip(out, "fsdp") and round_trip(out, "mim_fsdp")})
    pretrain(out, "cut", pre, "fsdp")  # the test kills this launch (SIGKILL) in this run


def phase_resume(out: str, sets: dict) -> None:
    pre, tune = sets["pretrain"], sets["finetune"]
    pretrain(out, "cut", pre, "fsdp", resume="auto")  # the run killed by the test
    init = os.path.join(out, "fsdp")
    for sharding in ("fsdp", "ddp"):
        recipe = load_recipe("finetune_demo", [*tune, f"init={init}",
                                               f"train.sharding={sharding}"])
        run_finetune(recipe, output_dir=os.path.join(out, f"tune_{sharding}"), resume="never")
    # a resume of the sharded fine-tuning run from its middle checkpoint (EMA included)
    tuned = os.path.join(out, "tune_fsdp")
    recipe = load_recipe("finetune_demo", [*tune, f"init={init}", "train.sharding=fsdp"])
    resumed = os.path.join(out, "tune_fsdp_resumed")
    run_finetune(recipe, output_dir=resumed,
                 resume=os.path.join(tuned, "checkpoints", ckpt.step_dirname(2)))
    done(out, "resume", {"blind": blind_process_message(out)})


def blind_process_message(out: str) -> str:
    """A checkpoint folder that process 1 cannot see (a disk local to another node, simulated
    by a folder only rank 0 names): every process stops with the same message, none hangs."""
    rank = dist.get_rank()
    folder = os.path.join(out, f"only_rank{rank}")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    dist.barrier()
    try:
        check_every_rank_sees(folder, [], "writing the checkpoint")
    except UtaUsageError as e:
        return str(e)
    return ""


def done(out: str, phase: str, result: dict) -> None:
    if dist.get_rank() == 0:
        with open(os.path.join(out, f"{phase}.json.tmp"), "w") as f:
            json.dump(result, f)
        os.replace(os.path.join(out, f"{phase}.json.tmp"), os.path.join(out, f"{phase}.json"))
    dist.barrier()


def main() -> None:
    phase, out, sets_file = sys.argv[1:4]
    with open(sets_file) as f:
        sets = json.load(f)
    {"runs": phase_runs, "resume": phase_resume}[phase](out, sets)


if __name__ == "__main__":
    main()
