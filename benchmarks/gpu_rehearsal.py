"""GPU rehearsal of the paper's configuration: the `vitb16` recipe (EVA-02-style ViT-B/16 student,
224 px, bf16) against an EVA02-L-14 teacher at real size with random weights, for a few minutes.

Reports images/s, peak GPU memory, and the split of a step into data wait, teacher forward,
student forward+backward and optimizer step (each phase ends with a CUDA synchronise so that it
can be timed, which costs a little throughput against `uta pretrain`). Images are generated JPEGs
read through the same loader, transforms and mask collator as `uta pretrain`, decoded on the GPU
by default (`--decode gpu`, as `data.decode: gpu`: the workers read bytes, `decode_jpeg` and the
crops run on the device; `--decode cpu` for PIL in the workers); the data wait is reported as
the engine's `data_wait_frac` (the largest over processes). With more than one
GPU it runs twice: on one GPU, then on all of them through `accelerate launch` (data parallel,
the batch is per GPU).

    python benchmarks/gpu_rehearsal.py                     # 50 steps, batch 64 per GPU
    python benchmarks/gpu_rehearsal.py --steps 50 --batch 128 --output rehearsal.json
    python benchmarks/gpu_rehearsal.py --decode cpu --workers 16   # PIL in 16 workers per GPU
    python benchmarks/gpu_rehearsal.py --sharding fsdp     # the student sharded (FSDP2)

`--sharding fsdp` shards the student over the GPUs of the multi-GPU run as `train.sharding:
fsdp` does (per block, then the root; bf16 parameters, fp32 reduction); one GPU has nothing
to split and runs whole. `--grad-checkpointing` recomputes each block in the backward pass.

On a machine without CUDA it refuses (exit 2): the figures would mean nothing. `--allow-cpu`
runs the same code on CPU with whatever sizes are given, to check the script itself (with
`--sharding fsdp`: one process, then two under torchrun with gloo).

    python benchmarks/gpu_rehearsal.py --allow-cpu --sharding fsdp --steps 2 --warmup 1 \
        --batch 2 --workers 0 --images 16 --student-depth 2 --teacher ViT-B-32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PHASES = ("data_wait", "teacher_forward", "student_forward_backward", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN, allocator)")
    p.add_argument("--batch", type=int, default=64, help="images per GPU per step")
    p.add_argument("--workers", type=int, default=8, help="data loader workers per GPU")
    p.add_argument("--images", type=int, default=1024, help="generated JPEGs (256x320 px)")
    p.add_argument("--teacher", default="EVA02-L-14", help="open_clip model, random weights")
    p.add_argument("--student-depth", type=int, default=0, help="0: the recipe's (12)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--decode", default="gpu", choices=["gpu", "cpu"],
                   help="data.decode: gpu (workers read bytes, decode_jpeg + crops on the "
                        "device; with --allow-cpu the same tensor path on the CPU) or cpu (PIL "
                        "in the workers)")
    p.add_argument("--sharding", default="ddp", choices=["ddp", "fsdp"],
                   help="train.sharding of the multi-GPU run")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="train.grad_checkpointing: recompute each student block in backward")
    p.add_argument("--output", default="", help="also write the results as JSON here")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU (checks the script)")
    p.add_argument("--single", action="store_true",
                   help="measure this process group only (what the multi-GPU launch runs)")
    p.add_argument("--data-dir", default="", help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def make_images(folder: str, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        # smooth random colour fields: JPEG-decodable at realistic cost, not pure noise
        small = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 256), Image.BICUBIC).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def measure(args: argparse.Namespace) -> dict | None:
    """One measurement on this process group; the main process returns the results."""
    import open_clip

    from uta_cli.data.decode import DeviceDecoder
    from uta_cli.data.pipeline import (
        MaskCollator,
        Source,
        TrainTransform,
        View,
        normalize,
        open_dataset,
    )
    from uta_cli.losses import gather_targets, token_alignment_loss
    from uta_cli.masks.generate import MaskSpec
    from uta_cli.models.student import UTAStudent
    from uta_cli.models.teacher import CLIPTeacher, TeacherIdentity
    from uta_cli.recipe import load_recipe
    from uta_cli.tasks.common import decay_groups
    from uta_cli.train.setup import make_accelerator
    from uta_cli.train.sharding import check_sharding, clip_grad_norm, shard_model, wants_sharding

    sets = [f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
            f"train.precision={args.precision}", f"data.source={args.data_dir}"]
    if args.student_depth:
        sets.append(f"student.depth={args.student_depth}")
    recipe = load_recipe("vitb16", sets)
    acc = make_accelerator(recipe.train.precision)
    device = acc.device

    torch.manual_seed(0)
    cfg = open_clip.get_model_config(args.teacher)
    clip = open_clip.create_model(args.teacher)  # random weights: the speed is the same
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    ident = TeacherIdentity(model=args.teacher, weights="random", weights_fingerprint="",
                            embed_dim=cfg["embed_dim"], image_size=224,
                            mean=list(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                            std=list(pp.get("std", open_clip.OPENAI_DATASET_STD)),
                            interpolation="bicubic", model_cfg=cfg)
    teacher = CLIPTeacher(clip, ident)
    check_sharding(args.sharding, recipe.train.precision)
    student = UTAStudent(recipe.student, teacher.embed_dim)
    student.set_grad_checkpointing(args.grad_checkpointing)
    grid_note = teacher.match_grid(student.grid_size, recipe.teacher.grid_match)
    teacher.to(device, recipe.train.precision)

    views = [View("student", recipe.student.image_size, tuple(recipe.data.mean),
                  tuple(recipe.data.std)),
             View("teacher", teacher.image_size, tuple(ident.mean), tuple(ident.std),
                  ident.interpolation)]
    transform = TrainTransform(views, tuple(recipe.data.crop_scale), recipe.data.hflip,
                               recipe.seed)
    dataset = open_dataset(recipe.data.source, "auto", transform, acc.process_index,
                           acc.num_processes, recipe.seed)
    spec = MaskSpec(**{k: getattr(recipe.mask, k) for k in recipe.mask.__dataclass_fields__})
    source = Source(dataset, transform, MaskCollator(spec, student.grid_size, recipe.seed),
                    args.batch, args.workers, recipe.seed, acc.process_index,
                    acc.num_processes)
    if args.decode == "gpu":  # as uta pretrain does with data.decode gpu
        transform.defer_jpeg = True
        source.device_decode = DeviceDecoder(views, device)
    o = recipe.optim
    sharded = wants_sharding(args.sharding)
    if sharded:  # as `train.sharding: fsdp`: sharded before the optimizer, never prepared
        shard_model(student, recipe.train.precision)
    optimizer = torch.optim.AdamW(decay_groups(student, o.weight_decay), lr=o.lr,
                                  betas=tuple(o.betas), eps=o.eps)
    if not sharded:
        student, optimizer = acc.prepare(student, optimizer)
    student.train()

    def batches():
        epoch = 0
        while True:
            yield from source.batches(epoch)
            epoch += 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    it = batches()
    times = {k: [] for k in PHASES}
    step_times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        keep = batch["keep_idx"].to(device, non_blocking=True)
        teacher_in = normalize(batch["teacher"].to(device, non_blocking=True), views[1])
        targets = gather_targets(teacher.tokens(teacher_in), keep)
        sync()
        t2 = time.perf_counter()
        student_in = normalize(batch["student"].to(device, non_blocking=True), views[0])
        with acc.autocast():  # (as `micro_step` in training, sharded or not)
            loss = token_alignment_loss(student(student_in, keep), targets)["loss"]
        acc.backward(loss)
        sync()
        t3 = time.perf_counter()
        if o.grad_clip > 0:
            clip_grad_norm(student, acc, o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        if step >= args.warmup:
            for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(v)
            step_times.append(t4 - t0)
        if acc.is_main_process and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{args.warmup + args.steps}  loss {loss.item():.4f}  "
                  f"{t4 - t0:.3f} s/step", flush=True)

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0
    # every process's means, so the slowest GPU shows
    local = torch.tensor([statistics.mean(step_times)] +
                         [statistics.mean(times[k]) for k in PHASES] + [peak, reserved],
                         device=device, dtype=torch.float64)
    gathered = acc.gather(local[None]).cpu() if acc.num_processes > 1 else local[None].cpu()
    if not acc.is_main_process:
        return None
    step_s = float(gathered[:, 0].max())
    phase = {k: float(gathered[:, 1 + i].mean()) for i, k in enumerate(PHASES)}
    return {
        "gpus": acc.num_processes, "sharding": "fsdp" if sharded else "ddp",
        "grad_checkpointing": args.grad_checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": recipe.train.precision, "teacher": args.teacher,
        "teacher_input_px": teacher.image_size, "grid": grid_note,
        "student": f"eva {recipe.student.width}x{recipe.student.depth} "
                   f"p{recipe.student.patch_size} @ {recipe.student.image_size}px",
        "batch_per_gpu": args.batch, "steps": args.steps, "warmup_steps": args.warmup,
        "decode": args.decode, "workers_per_gpu": args.workers,
        # the engine's data_wait_frac: the largest over processes of wait / step time
        "data_wait_frac": round(float((gathered[:, 1] / gathered[:, 0]).max()), 4),
        "step_s": round(step_s, 4),
        "images_per_s": round(args.batch * acc.num_processes / step_s, 1),
        "phase_s": {k: round(v, 4) for k, v in phase.items()},
        "phase_share": {k: round(v / sum(phase.values()), 3) for k, v in phase.items()},
        "peak_memory_allocated_gib": round(float(gathered[:, -2].max()), 2),
        "peak_memory_reserved_gib": round(float(gathered[:, -1].max()), 2),
        "final_loss": round(float(loss.item()), 4),
    }


def show(result: dict) -> None:
    r = result
    print(f"\n{r['gpus']} x {r['device']}  {r['sharding']}  {r['precision']}  student "
          f"{r['student']}  teacher {r['teacher']} at {r['teacher_input_px']} px  batch "
          f"{r['batch_per_gpu']}/GPU  decode {r['decode']}, {r['workers_per_gpu']} workers/GPU")
    print(f"  {r['images_per_s']} images/s  ({r['step_s']} s/step over {r['steps']} steps)  "
          f"peak memory {r['peak_memory_allocated_gib']} GiB allocated, "
          f"{r['peak_memory_reserved_gib']} GiB reserved")
    print(f"  data wait {100 * r['data_wait_frac']:.1f}% of the step (largest over processes; "
          f"above 10% the GPU waits for data)")
    print("  step split: " + ", ".join(f"{k} {r['phase_s'][k]:.4f} s "
                                        f"({100 * r['phase_share'][k]:.0f}%)" for k in PHASES))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_rehearsal: no CUDA device found. This benchmark measures the paper's "
              "configuration on GPUs; on CPU its figures would mean nothing. Run it on a CUDA "
              "machine (or pass --allow-cpu with small sizes to check the script).",
              file=sys.stderr)
        return 2
    if args.single:
        result = measure(args)
        if result is not None and args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
        return 0

    tmp = tempfile.mkdtemp(prefix="uta_rehearsal_")
    try:
        args.data_dir = os.path.join(tmp, "images")
        t = time.perf_counter()
        make_images(args.data_dir, args.images)
        print(f"{args.images} images generated in {time.perf_counter() - t:.1f} s", flush=True)
        base = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch",
                str(args.batch), "--workers", str(args.workers), "--teacher", args.teacher,
                "--student-depth", str(args.student_depth), "--precision", args.precision,
                "--decode", args.decode, "--sharding", args.sharding]
        base += ["--grad-checkpointing"] if args.grad_checkpointing else []
        base += ["--allow-cpu"] if args.allow_cpu else []
        results = []
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # on the CPU (--allow-cpu), fsdp is checked on two processes as well
        cpu_pair = not gpus and args.sharding == "fsdp"
        for n in ([1, gpus] if gpus > 1 else [1, 2] if cpu_pair else [1]):
            out = os.path.join(tmp, f"result_{n}.json")
            cmd = [os.path.abspath(__file__), *base, "--single", "--data-dir", args.data_dir,
                   "--output", out]
            if n == 1:
                env = {**os.environ}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES",
                                                          "0").split(",")[0]
                cmd = [sys.executable, *cmd]
            elif not gpus:  # (accelerate launch --cpu starts one process; torchrun starts n)
                env = os.environ
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                       str(n), *cmd]
            else:
                env = os.environ
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                       "--num_processes", str(n), *cmd]
            print(f"\n== {n} GPU(s): {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(out) as f:
                results.append(json.load(f))
            show(results[-1])
        if len(results) == 2:
            speedup = results[1]["images_per_s"] / results[0]["images_per_s"]
            print(f"\nscaling: {results[1]['gpus']} GPUs give {speedup:.2f}x the images/s of one "
                  f"({speedup / results[1]['gpus']:.0%} efficiency)")
        if args.output:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
