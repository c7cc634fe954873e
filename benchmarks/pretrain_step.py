"""UTA step vs a masked-image-modelling (MIM) step and a plain timm reference, side by side.

- UTA: the student on the visible tokens only (mask ratio 0.5), the training code's `uta`
  objective (`tasks.alignment.objective_loss`).
- MIM: the training code's `mim` objective: the same student on every token, the masked ones
  replaced by its learned [MASK] embedding, the loss on the masked tokens (EVA-02).
- reference: timm's own `Eva` of the same configuration, `forward_features` on an input whose
  patch grid holds as many patches as UTA keeps (no gather, no per-sample RoPE), the same head
  and loss: the floor the UTA step is measured against.
Each step is forward, loss, backward and fused AdamW. MFU: FLOPs counted once per side by
torch's FLOP counter (the same rules for all sides) over the median step time and the GEMM rate
this process measures on this machine. Also: mask generation speed, the demo's data-wait
share, eager vs `train.compile` (--compile), and CUDA peak memory on a GPU.

    python benchmarks/pretrain_step.py                 # tiny and B/16 (CPU: a few minutes)
    python benchmarks/pretrain_step.py --configs tiny  # seconds
    python benchmarks/pretrain_step.py --demo-steps 100  # also measure the demo's data wait
    python benchmarks/pretrain_step.py --configs tiny --compile tiny  # compiling takes minutes

Ratios are what matter: all sides run in the same process, interleaved, on the same inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import open_clip
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from uta_cli.losses import gather_targets, token_alignment_loss
from uta_cli.masks.generate import (
    MaskSpec,
    attention_keep,
    attention_noise,
    generate_masks,
    keep_indices,
)
from uta_cli.models.student import UTAStudent, build_trunk
from uta_cli.models.teacher import CLIPTeacher, TeacherIdentity
from uta_cli.recipe import StudentConfig
from uta_cli.tasks.alignment import objective_loss

CONFIGS = {
    # name: (student config, open_clip teacher config, batch)
    "tiny": (StudentConfig(family="eva", image_size=64, patch_size=8, width=192, depth=6,
                           heads=3, mlp_ratio=2.6666666667),
             {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": 4, "width": 256,
                                               "patch_size": 8, "head_width": 64},
              "text_cfg": {"context_length": 16, "width": 64, "heads": 1, "layers": 1}}, 32),
    "b16": (StudentConfig(family="eva", image_size=224, patch_size=16, width=768, depth=12,
                          heads=12, mlp_ratio=2.6666666667,
                          timm_kwargs={"ref_feat_shape": [16, 16]}),
            "ViT-B-16", 8),
}


def build_teacher(cfg, device, precision) -> CLIPTeacher:
    clip = open_clip.create_model(cfg) if isinstance(cfg, str) else open_clip.CLIP(**cfg)
    ident = TeacherIdentity(model=str(cfg)[:40], weights="random", weights_fingerprint="",
                            embed_dim=clip.visual.output_dim, image_size=0, mean=[], std=[],
                            interpolation="bicubic")
    teacher = CLIPTeacher(clip, ident)
    return teacher.to(device, precision)


# Wall time by default. On a CPU shared with other jobs, `--clock cpu` times this process's CPU
# seconds instead (run it with one thread: OMP_NUM_THREADS=1), which other processes on the
# cores inflate far less than wall time.
clock = time.perf_counter


def gemm_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048,
                    rounds: int = 5) -> float:
    """The machine's measured matrix-multiply rate (FLOP/s, best of `rounds`): the ceiling that
    MFU is reported against, measured in this process with the threads the steps get."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(rounds + 1):
        _sync(device)
        t = clock()
        torch.mm(a, b)
        _sync(device)
        best = min(best, clock() - t)
    return 2 * n**3 / best


def count_flops(fn) -> int:
    """FLOPs of one call (forward and backward) by torch's FLOP counter: matrix multiplies,
    convolutions and attention, the same rules for every side."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def reference_trunk(scfg: StudentConfig, tokens: int) -> tuple[nn.Module, tuple[int, int]]:
    """timm's own Eva, built from the student's configuration exactly as the student's trunk,
    at an input size whose patch grid holds `tokens` patches (the UTA student's visible count):
    the same work as the UTA step without the gather. Returns the trunk and its (H, W)."""
    side = scfg.image_size // scfg.patch_size
    rows = next(r for r in range(side, 0, -1) if tokens % r == 0 and tokens // r <= side)
    size = (rows * scfg.patch_size, tokens // rows * scfg.patch_size)
    cfg = dataclasses.replace(scfg, timm_kwargs={**scfg.timm_kwargs, "img_size": size})
    return build_trunk(cfg), size


class ReferenceStep(nn.Module):
    """timm's forward_features (every token, its final norm) and the same head as the student."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk.forward_features(images))


def bench_config(name: str, device: torch.device, precision: str, iters: int) -> dict:
    scfg, tcfg, batch = CONFIGS[name]
    torch.manual_seed(0)
    teacher = build_teacher(tcfg, device, precision)
    student = UTAStudent(scfg, teacher.embed_dim).to(device)
    teacher.match_grid(student.grid_size, "resize")
    mim = UTAStudent(scfg, teacher.embed_dim, mask_token=True).to(device)
    grid = student.grid_size
    ids = np.arange(batch)
    keep = torch.from_numpy(keep_indices(generate_masks(MaskSpec(), grid, 0, 0, ids))).to(device)
    visible = keep.shape[1]
    ref_trunk, ref_size = reference_trunk(scfg, visible)
    reference = ReferenceStep(ref_trunk, nn.Linear(scfg.width, teacher.embed_dim)).to(device)
    models = {"uta": student, "mim": mim, "reference": reference}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()}
    images = torch.randn(batch, 3, scfg.image_size, scfg.image_size, device=device)
    ref_images = torch.randn(batch, 3, *ref_size, device=device)
    t_images = torch.randn(batch, 3, teacher.image_size, teacher.image_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    n = student.num_patches
    targets = teacher.tokens(t_images)
    ref_targets = gather_targets(targets, keep)  # (B, 1 + visible, E): the UTA step's targets

    def loss_of(kind: str) -> torch.Tensor:
        with amp:
            if kind == "reference":  # timm's forward_features (with its norm) + the head
                return token_alignment_loss(reference(ref_images), ref_targets)["loss"]
            model = models[kind]  # the training code's own objective, uta or mim
            return objective_loss(kind, model, images, targets, keep, n)["loss"]

    def step(kind: str) -> None:
        loss_of(kind).backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)

    flops = {k: count_flops(lambda k=k: loss_of(k).backward()) for k in models}
    for m in models.values():
        m.zero_grad(set_to_none=True)
    flops["teacher"] = count_flops(lambda: teacher.tokens(t_images))
    peak = gemm_peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)

    times = {"uta": [], "mim": [], "reference": [], "teacher": []}
    mem = {}
    for i in range(iters + 2):  # 2 warm-up rounds, then interleave so all see the same load
        _sync(device)
        t0 = clock()
        teacher.tokens(t_images)
        _sync(device)
        if i >= 2:
            times["teacher"].append(clock() - t0)
        for kind in models:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t = clock()
            step(kind)
            _sync(device)
            if i >= 2:
                times[kind].append(clock() - t)
            if device.type == "cuda":
                mem[kind] = torch.cuda.max_memory_allocated() / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": name, "batch": batch, "grid": list(grid), "visible_tokens": visible,
        "reference_input": list(ref_size), "gemm_peak_tflops": round(peak / 1e12, 4),
        **{f"{k}_s": round(v, 4) for k, v in med.items()},
        **{f"{k}_gflop": round(v / 1e9, 1) for k, v in flops.items()},
        **{f"{k}_mfu": round(flops[k] / med[k] / peak, 3) for k in med},
        "uta_over_reference": round(med["uta"] / med["reference"], 3),
        "student_step_ratio": round(med["uta"] / med["mim"], 3),
        "whole_step_ratio": round((med["uta"] + med["teacher"]) / (med["mim"] + med["teacher"]),
                                  3),
    }
    for k, v in mem.items():
        result[f"peak_mib_{k}"] = round(v)
    return result


def bench_compile(name: str, device: torch.device, precision: str, iters: int) -> dict:
    """Eager against `train.compile` (what the alignment task compiles: the student's call in
    place, the alignment loss, the teacher's tokens), interleaved on the same inputs."""
    import copy

    from uta_cli.tasks.alignment import alignment_loss

    scfg, tcfg, batch = CONFIGS[name]
    torch.manual_seed(0)
    teacher = build_teacher(tcfg, device, precision)
    eager = UTAStudent(scfg, teacher.embed_dim).to(device)
    teacher.match_grid(eager.grid_size, "resize")
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)
    sides = {"eager": (eager, teacher.tokens, alignment_loss),
             "compiled": (compiled, torch.compile(teacher.tokens, dynamic=False),
                          torch.compile(alignment_loss, dynamic=False))}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
            for k, (m, _, _) in sides.items()}
    ids = np.arange(batch)
    masks = generate_masks(MaskSpec(), eager.grid_size, 0, 0, ids)
    keep = torch.from_numpy(keep_indices(masks)).to(device)
    images = torch.randn(batch, 3, scfg.image_size, scfg.image_size, device=device)
    t_images = torch.randn(batch, 3, teacher.image_size, teacher.image_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(kind: str) -> tuple[float, float]:
        model, tokens, loss_fn = sides[kind]
        t0 = clock()
        targets = tokens(t_images)
        _sync(device)
        t1 = clock()
        with amp:
            loss = loss_fn(model(images, keep), targets, keep)["loss"]
        loss.backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)
        _sync(device)
        return t1 - t0, clock() - t1

    t = time.perf_counter()  # wall: the compiler's C++ builds run in other processes
    step("compiled")
    compile_s = time.perf_counter() - t
    times = {k: ([], []) for k in sides}
    for i in range(iters + 1):
        for kind in sides:
            teacher_s, student_s = step(kind)
            if i >= 1:
                times[kind][0].append(teacher_s)
                times[kind][1].append(student_s)
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in times.items()}
    return {"config": name, "compile_wall_s": round(compile_s, 1),
            "eager_teacher_s": round(med["eager"][0], 4),
            "compiled_teacher_s": round(med["compiled"][0], 4),
            "eager_student_s": round(med["eager"][1], 4),
            "compiled_student_s": round(med["compiled"][1], 4),
            "teacher_speedup": round(med["eager"][0] / med["compiled"][0], 3),
            "student_speedup": round(med["eager"][1] / med["compiled"][1], 3)}


def bench_attention_masks(name: str, device: torch.device, precision: str, iters: int) -> dict:
    """The whole UTA step (teacher forward, student forward and backward, AdamW) with
    mask.strategy attention against reversed-block, interleaved on the same inputs. The
    reversed-block masks come from the loader (drawn in its workers, off the step); the
    attention side reads the teacher's CLS row in the same forward and draws on the device."""
    scfg, tcfg, batch = CONFIGS[name]
    torch.manual_seed(0)
    teacher = build_teacher(tcfg, device, precision)
    student = UTAStudent(scfg, teacher.embed_dim).to(device)
    teacher.match_grid(student.grid_size, "resize")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    n, ids = student.num_patches, np.arange(batch)
    keep = torch.from_numpy(keep_indices(generate_masks(MaskSpec(), student.grid_size, 0, 0,
                                                        ids))).to(device)
    noise = torch.from_numpy(attention_noise(0, 0, ids, n)).to(device)
    images = torch.randn(batch, 3, scfg.image_size, scfg.image_size, device=device)
    t_images = torch.randn(batch, 3, teacher.image_size, teacher.image_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(kind: str) -> None:
        if kind == "attention":
            tokens, attn = teacher.targets(t_images, cls_attention=True)
            targets, kept = tokens[0], attention_keep(attn, noise, keep.shape[1])
        else:
            targets, kept = teacher.tokens(t_images), keep
        with amp:
            loss = objective_loss("uta", student, images, targets, kept, n)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"reversed-block": [], "attention": []}
    for i in range(iters + 2):  # 2 warm-up rounds, then interleaved
        for kind in times:
            _sync(device)
            t0 = clock()
            step(kind)
            _sync(device)
            if i >= 2:
                times[kind].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": name, "batch": batch,
            "reversed_block_step_s": round(med["reversed-block"], 4),
            "attention_step_s": round(med["attention"], 4),
            "attention_overhead": round(med["attention"] / med["reversed-block"] - 1, 4)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_masks(batch: int = 256, rounds: int = 20) -> dict:
    torch.set_num_threads(1)
    out = {}
    for strategy in ("random", "block", "reversed-block"):
        spec = MaskSpec(strategy=strategy)
        generate_masks(spec, (14, 14), 0, 0, np.arange(batch))
        t = time.perf_counter()
        for r in range(rounds):
            generate_masks(spec, (14, 14), 0, r, np.arange(batch))
        out[strategy] = round(batch * rounds / (time.perf_counter() - t))
    return out


def bench_demo_data_wait(steps: int) -> dict:
    """Run the demo recipe for `steps` steps and read the data-wait share from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "uta_cli", "pretrain", "demo", "--output-dir", run_dir,
               "--set", f"schedule.steps={steps}", "--set", "train.checkpoint_every=0",
               "--set", "eval.zeroshot=none"]
        subprocess.run(cmd, check=True, capture_output=True)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"data_wait_frac"' in line]
    rows = rows[1:] or rows  # the first window includes worker start-up
    return {"demo_data_wait_frac": round(statistics.mean(r["data_wait_frac"] for r in rows), 4),
            "demo_images_per_s": round(statistics.mean(r["images_per_s"] for r in rows), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,b16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--demo-steps", type=int, default=0,
                    help="also run the demo this many steps to measure its data wait")
    ap.add_argument("--compile", default="",
                    help="configs to also run eager vs torch.compile (slow to compile on CPU)")
    ap.add_argument("--attention-only", action="store_true",
                    help="only the attention-mask overhead against reversed-block")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU seconds (a shared CPU; use one thread)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    global clock
    if args.clock == "cpu":
        if device.type == "cuda":
            raise SystemExit("--clock cpu times CPU work; on a GPU use the default wall clock.")
        clock = time.process_time
    print(f"device={device} threads={torch.get_num_threads()} precision={args.precision} "
          f"clock={args.clock}")
    print("seconds per step (median, sides interleaved); MFU = counted FLOPs / time / this "
          "machine's measured GEMM rate")
    results = []
    for name in [] if args.attention_only else args.configs.split(","):
        r = bench_config(name, device, args.precision, args.iters)
        results.append(r)
        print(f"{name}: batch {r['batch']}, {r['visible_tokens']} of {r['grid'][0] * r['grid'][1]}"
              f" patches visible, reference input {r['reference_input']}, GEMM peak "
              f"{r['gemm_peak_tflops'] * 1000:.0f} GFLOP/s")
        for k, label in (("uta", "UTA student step"), ("reference", "timm Eva reference step"),
                         ("mim", "MIM student step"), ("teacher", "teacher forward")):
            print(f"  {label:24} {r[k + '_s']:8.4f} s  {r[k + '_gflop']:9.1f} GFLOP  "
                  f"MFU {r[k + '_mfu']:.3f}"
                  + (f"  peak {r['peak_mib_' + k]} MiB" if f"peak_mib_{k}" in r else ""))
        print(f"  UTA / reference {r['uta_over_reference']:.3f}   UTA / MIM (student) "
              f"{r['student_step_ratio']:.3f}   UTA / MIM (whole step) "
              f"{r['whole_step_ratio']:.3f}")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss_mib:.0f} MiB")
    for name in args.configs.split(","):
        a = bench_attention_masks(name, device, args.precision, args.iters)
        print(f"attention masks, {name}: whole step {a['attention_step_s']:.4f} s vs "
              f"reversed-block {a['reversed_block_step_s']:.4f} s: overhead "
              f"{a['attention_overhead']:+.1%} (target: at most +5%)")
    if args.attention_only:
        return
    masks = bench_masks()
    print("mask generation, 14x14, ratio 0.5, 1 thread, batch 256 (masks/s): "
          + "  ".join(f"{k} {v}" for k, v in masks.items()))
    for name in filter(None, args.compile.split(",")):
        print("compile:", bench_compile(name, device, args.precision, args.iters))
    if args.demo_steps:
        print("demo:", bench_demo_data_wait(args.demo_steps))


if __name__ == "__main__":
    main()
