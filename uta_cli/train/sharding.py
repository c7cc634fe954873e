"""`train.sharding: fsdp`: the trainable model sharded over the processes with PyTorch FSDP2.

With DDP every process holds the whole student, its gradients and AdamW's two moments (16 bytes
a parameter in fp32). FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps 1/world of each on a
process and all-gathers one block's weights at a time for its forward and backward, as
torchtitan and open_clip do: `fully_shard` on every transformer block, then on the root.

Accelerate still launches the run, owns the process group and its precision setting, but the
sharded model is never passed to `accelerator.prepare` (which would wrap it in DDP), and
Accelerate's own FSDP plugin is not used: it falls back to DDP on a machine without GPUs, so the
CPU (gloo) runs that test uta would exercise another code path than the GPU runs. Here both run
the same FSDP2 calls. The frozen teacher is never sharded: it stays replicated, as in every
distillation recipe we follow (EVA, torchtitan's and open_clip's).

FSDP2 gathers a module's weights only inside its `forward`. Methods the trainers call directly
(`encode_image`, `forward_tokens`) are registered as forward methods; validation calls the
module itself. Every forward is a collective: a process whose share of an evaluation ran out
runs stand-in forwards until the others are done (`lockstep`), or it would hang them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.lockstep import is_sharded

log = logging.getLogger(__name__)

SHARDINGS = ("ddp", "fsdp")
# Methods of the models uta trains that callers use instead of `forward` (each gathers weights).
FORWARD_METHODS = ("encode_image", "forward_tokens", "forward_features")
BLOCK_LISTS = ("blocks", "resblocks")  # timm ViT/Eva, open_clip's transformer


def check_sharding(sharding: str, precision: str) -> None:
    if sharding not in SHARDINGS:
        raise UtaUsageError(f"train.sharding must be ddp or fsdp; got {sharding!r}.")
    if sharding == "fsdp" and precision == "fp16":
        raise UtaUsageError("train.sharding=fsdp runs in bf16 or fp32: fp16 would need a "
                            "sharded gradient scaler. Use --set train.precision=bf16.")


def mixed_precision(precision: str, root: bool = False) -> MixedPrecisionPolicy:
    """bf16: gathered weights and compute in bf16, gradients reduced in fp32 (the fp32 master
    weights and AdamW state stay sharded in fp32); the root's output in fp32 for the loss (a
    block's stays bf16 for the next block). fp32: none."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    output_dtype=torch.float32 if root else None)
    return MixedPrecisionPolicy()


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: members of every ModuleList named blocks/resblocks that hold
    parameters (the student's trunk, a classifier's backbone, a CLIP's towers)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            found += [b for b in module if any(True for _ in b.parameters())]
    return found


def shard_model(model: nn.Module, precision: str, compile_blocks: bool = False) -> nn.Module:
    """Shard `model` in place over the default process group: each block, then the root.

    In torchtitan's order: activation checkpointing is already set on the model (the student
    recomputes each block in its forward), then each block is compiled, then sharded; the
    root stays eager (the kept-token gather and the head are cheap)."""
    for block in blocks_of(model):
        if compile_blocks:
            block.compile(dynamic=False)
        fully_shard(block, mp_policy=mixed_precision(precision))
    fully_shard(model, mp_policy=mixed_precision(precision, root=True))
    for name in FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def wants_sharding(sharding: str) -> bool:
    """train.sharding=fsdp in a launch of several processes (one process has nothing to split:
    it trains whole, and its checkpoints resume under fsdp on more processes)."""
    if sharding != "fsdp":
        return False
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        log.warning("train.sharding=fsdp: one process, so the model stays whole")
        return False
    return True


def eager_call(model: nn.Module) -> Callable:
    """What evaluation calls: `model.forward` (not the compiled module call) when unsharded; the
    module itself under FSDP, whose forward hooks gather the weights (its blocks are compiled
    one by one, the root call stays eager)."""
    return model if is_sharded(model) else model.forward


def micro_step(model: nn.Module, accelerator, last: bool):
    """The context of one micro-step's forward and backward. Gradients are reduced across
    processes only on the last micro-step of an accumulation: FSDP has its own switch (for its
    reduce-scatter) where DDP uses `accelerator.no_sync`. A sharded model also runs under
    Accelerate's autocast, as a prepared one does: its bf16 weights would otherwise meet fp32
    buffers (the RoPE tables) in one op, which the CPU kernels refuse."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return accelerator.autocast()
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def clip_grad_norm(model: nn.Module, accelerator, max_norm: float) -> torch.Tensor | None:
    """The total gradient norm before clipping; clips when max_norm is finite. Sharded: torch's
    own clip over the DTensor gradients (the norm's parts are summed over the processes),
    returned as a plain tensor; otherwise Accelerate's (it unscales fp16 gradients first)."""
    if not is_sharded(model):
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 (empty elsewhere), in today's layout.
    Every process must call it (the shards are gathered)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (every process holds it) into the sharded model: each process
    keeps its shards. Raises RuntimeError on missing or unexpected keys as load_state_dict."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                strict=True))
