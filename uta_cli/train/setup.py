"""What a training run is set up with before the loop starts: the engine settings of a recipe
(`EngineConfig`, `engine_config`), the accelerator and the launch types uta supports
(`make_accelerator`), and the run directory it writes to (`run_directory`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from uta_cli.errors import UtaUsageError
from uta_cli.outputs import is_remote, local_path, mirror_run
from uta_cli.recipe import Recipe, recipe_to_dict

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    seed: int = 0
    precision: str = "bf16"
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 0.0
    steps: int = 0
    epochs: float = 0.0
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    log_every: int = 20
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    val_every: int = 0
    val_at_start: bool = False  # also validate before the first step of a fresh run
    # Keep the checkpoint with the best value of this validation metric in checkpoints/best/
    # (written atomically; `latest` is not moved). "" = keep none.
    best_metric: str = ""
    best_mode: str = "max"  # or "min"
    recipe: dict = field(default_factory=dict)  # saved into every checkpoint's meta.json


def engine_config(recipe: Recipe) -> EngineConfig:
    """The engine settings of a recipe (pretrain and finetune alike)."""
    o, s, t = recipe.optim, recipe.schedule, recipe.train
    return EngineConfig(
        seed=recipe.seed, precision=t.precision, batch_size=recipe.data.batch_size,
        grad_accum=t.grad_accum, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip, steps=s.steps, epochs=s.epochs,
        warmup_steps=s.warmup_steps, warmup_epochs=s.warmup_epochs, log_every=t.log_every,
        checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
        val_every=t.val_every, recipe=recipe_to_dict(recipe))


def make_accelerator(precision: str) -> Accelerator:
    """Accelerate picks up torchrun/accelerate-launch environments (gloo on CPU, NCCL on GPU)."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise UtaUsageError(f"train.precision must be bf16, fp16 or fp32; got {precision!r}.")
    if precision == "fp16" and not torch.cuda.is_available():
        raise UtaUsageError("train.precision=fp16 needs a GPU. On CPU use --set "
                            "train.precision=bf16 (or fp32).")
    mixed = {"fp32": "no"}.get(precision, precision)
    for kind in ("DEEPSPEED", "MEGATRON_LM", "FSDP"):  # (Accelerate fails on a missing package)
        if os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() in ("1", "true", "yes") \
                and (kind != "FSDP" or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            check_distributed_type(kind)
    # Accelerate keeps its state process-wide and refuses a second precision, so a notebook (or
    # any caller) running a bf16 job after an fp32 one would fail. The finished job's precision
    # state is dropped; the process group (PartialState) stays.
    if AcceleratorState._shared_state and \
            AcceleratorState._shared_state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    check_distributed_type(acc.distributed_type)
    return acc


# Checkpoints hold the full model and optimizer state of the main process: right for plain data
# parallelism (every process holds all of it), wrong for sharded or partitioned state.
SUPPORTED_DISTRIBUTED = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA",
                         "MULTI_MUSA", "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"}


def check_distributed_type(kind) -> None:
    name = getattr(kind, "value", str(kind))
    if name not in SUPPORTED_DISTRIBUTED:
        raise UtaUsageError(
            f"Accelerate is configured for {name}, which uta does not support: its checkpoints "
            f"hold the whole model and optimizer as one process sees them, which is complete "
            f"only under plain data parallelism (DDP). Launch with DDP instead: `accelerate "
            f"launch --multi_gpu --num_processes N -m uta_cli ...` or `torchrun "
            f"--nproc_per_node N -m uta_cli ...`, or run `accelerate config` again and choose "
            f"no FSDP/DeepSpeed/Megatron. To shard the student over the GPUs, use uta's own "
            f"FSDP2 sharding with such a launch: --set train.sharding=fsdp.")


def run_directory(output_dir: str, default_name: str) -> str:
    path = output_dir or os.path.join("runs", default_name)

    path = local_path(path)  # file:// URLs are local paths
    if is_remote(path):  # written in a local staging folder, copied after each checkpoint
        staging = mirror_run(path)
        log.warning("run directory %s: staged in %s, copied after each checkpoint", path,
                    staging)
        return staging
    if os.path.exists(path) and not os.path.isdir(path):
        raise UtaUsageError(f"The run directory {path} exists and is a file. Pass another "
                            f"--output-dir.")
    os.makedirs(path, exist_ok=True)
    return path
