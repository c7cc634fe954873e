"""Training state of a sharded run (`train.sharding: fsdp`) in a checkpoint folder.

Each process writes its shards of the weights and of AdamW's state with
`torch.distributed.checkpoint` (DCP): the folder gets DCP's `.metadata` and one `__R_0.distcp`
file a process, beside today's files (a consolidated `model.safetensors` that rank 0 writes from
the gathered weights, so zero-shot, export and fine-tuning read the run unchanged;
`training_state.pt` without the optimizer; one RNG file a process). Resume reads the shards
back, exactly. DCP reshards on load, so the same files also resume a DDP run (whole tensors on
every process), and a DDP checkpoint's whole optimizer state resumes a sharded run.

Every process reads and writes the same folder: the run directory must be one that every
process reaches (one machine, or a filesystem shared by the nodes). A process that cannot see
what another wrote stops every process with that message instead of waiting forever.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from uta_cli import checkpoint as ckpt
from uta_cli.errors import UtaUsageError
from uta_cli.train.sharding import is_sharded, load_full_state_dict

METADATA = ".metadata"  # DCP's index of the shards; its presence marks a sharded checkpoint


def has_sharded_state(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, METADATA))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_every_rank_sees(folder: str, names: list[str], doing: str) -> None:
    """Collective: raise the same UtaUsageError on every process when any process cannot see
    `folder` or one of `names` in it (a run directory on a disk local to one node)."""
    rank, world = _world()
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))] \
        if os.path.isdir(folder) else [folder]
    if world == 1:
        seen = [missing]
    else:
        seen = [None] * world
        dist.all_gather_object(seen, missing)
    blind = {r: m for r, m in enumerate(seen) if m}
    if blind:
        who = "; ".join(f"process {r} cannot see {', '.join(m[:3])}" for r, m in blind.items())
        raise UtaUsageError(
            f"While {doing} {folder}: {who}. Every process writes into the checkpoint folder "
            f"(its RNG state; with train.sharding=fsdp its shards, which every process reads "
            f"back on resume), so the run directory must be one that every process reaches: "
            f"a filesystem shared by all nodes (NFS, Lustre, a mounted bucket). Pass such a "
            f"--output-dir, or run on one node.")


def save_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: this process's shards of the weights and optimizer state into `folder`
    (created by rank 0 before; every process must see it)."""
    check_every_rank_sees(folder, [], "writing the sharded checkpoint")
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=folder)


def load_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: weights and optimizer state from a sharded checkpoint, into a sharded model
    (each process reads its shards) or a whole one (each reads everything: a DDP resume)."""
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".distcp")) \
        if os.path.isdir(folder) else []
    rank, world = _world()
    if world > 1:  # every process must find the files rank 0 finds
        listed = [shards]
        dist.broadcast_object_list(listed, src=0)
        shards = listed[0]
    check_every_rank_sees(folder, [METADATA, *shards], "reading the sharded checkpoint")
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def load_whole_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict) -> None:
    """A DDP checkpoint's optimizer state (`optimizer.state_dict()`: parameters numbered in
    the order of the optimizer's groups) into the optimizer of the sharded model built from
    the same param_groups: the numbers become parameter names, each process keeps its shards."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise UtaUsageError("The checkpoint's optimizer state holds another number of "
                            "parameters than this model; resume with the recipe that wrote it.")
    by_name = {"state": {order[int(i)]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def load_training_weights(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str,
                          state: dict) -> None:
    """A checkpoint's weights and optimizer state into the model and optimizer about to train,
    whichever way each was distributed (raises RuntimeError when the weights do not fit):

    - sharded checkpoint (DCP shards, no optimizer in training_state.pt), into a sharded model
      (each process reads its shards) or a whole one (each reads all: DDP after FSDP);
    - DDP checkpoint into a sharded model: the whole weights and the whole optimizer state,
      each process keeping its shards;
    - DDP checkpoint into a whole model: as ever."""
    if "optimizer" not in state and has_sharded_state(folder):
        load_sharded(folder, model, optimizer)
    elif is_sharded(model):
        load_full_state_dict(model, ckpt.load_weights(folder))
        load_whole_optimizer(model, optimizer, state["optimizer"])
    else:
        model.load_state_dict(ckpt.load_weights(folder))
        optimizer.load_state_dict(state["optimizer"])
