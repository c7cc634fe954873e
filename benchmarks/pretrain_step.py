"""UTA step vs a masked-image-modelling (MIM) step, measured side by side in one run.

The UTA student runs on the visible tokens only (mask ratio 0.5). The MIM step runs the same
student on ALL tokens, with the masked ones replaced by a learned [MASK] token (BEiT / EVA-02),
against the same teacher. Also: mask generation speed, the demo's data-wait share, peak memory.

    python benchmarks/pretrain_step.py                 # tiny and B/16 (CPU: a few minutes)
    python benchmarks/pretrain_step.py --configs tiny  # seconds
    python benchmarks/pretrain_step.py --demo-steps 100  # also measure the demo's data wait

Ratios are what matter: both sides run in the same process, interleaved, on the same inputs.
"""

from __future__ import annotations

import argparse
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

from uta_cli.losses import gather_targets, token_alignment_loss
from uta_cli.masking import MaskSpec, generate_masks, keep_indices
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import CLIPTeacher, TeacherIdentity
from uta_cli.recipe import StudentConfig

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


class MIMStep(nn.Module):
    """The same student on every token; masked patch embeddings replaced by a [MASK] token."""

    def __init__(self, student: UTAStudent):
        super().__init__()
        self.student = student
        self.mask_token = nn.Parameter(torch.zeros(1, 1, student.cfg.width))

    def forward(self, images, mask):  # mask: (B, N) bool, True = masked
        trunk = self.student.trunk
        x = trunk.patch_embed(images)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x, rope = trunk._pos_embed(x)
        x = trunk.norm_pre(x)
        for blk in trunk.blocks:
            x = blk(x, rope=rope)
        return self.student.head(trunk.norm(x))


def bench_config(name: str, device: torch.device, precision: str, iters: int) -> dict:
    scfg, tcfg, batch = CONFIGS[name]
    torch.manual_seed(0)
    teacher = build_teacher(tcfg, device, precision)
    student = UTAStudent(scfg, teacher.embed_dim).to(device)
    teacher.match_grid(student.grid_size, "resize")
    mim = MIMStep(UTAStudent(scfg, teacher.embed_dim)).to(device)
    opt_uta = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    opt_mim = torch.optim.AdamW(mim.parameters(), lr=1e-4, fused=True)
    grid = student.grid_size
    ids = np.arange(batch)
    masks = torch.from_numpy(generate_masks(MaskSpec(), grid, 0, 0, ids)).to(device)
    keep = torch.from_numpy(keep_indices(masks.cpu().numpy())).to(device)
    images = torch.randn(batch, 3, scfg.image_size, scfg.image_size, device=device)
    t_images = torch.randn(batch, 3, teacher.image_size, teacher.image_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def uta_student(targets):
        with amp:
            out = token_alignment_loss(student(images, keep), gather_targets(targets, keep))
        out["loss"].backward()
        opt_uta.step()
        opt_uta.zero_grad(set_to_none=True)

    def mim_student(targets):
        with amp:
            pred = mim(images, masks)
            out = token_alignment_loss(pred, targets)  # MIM aligns every token with the target
        out["loss"].backward()
        opt_mim.step()
        opt_mim.zero_grad(set_to_none=True)

    times = {"uta_student": [], "mim_student": [], "teacher": []}
    peak = {}
    for i in range(iters + 2):  # 2 warm-up rounds, then interleave so both see the same load
        sync()
        t0 = time.perf_counter()
        targets = teacher.tokens(t_images)
        sync()
        t1 = time.perf_counter()
        for kind, fn in (("uta_student", uta_student), ("mim_student", mim_student)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            fn(targets)
            sync()
            if i >= 2:
                times[kind].append(time.perf_counter() - t)
            if device.type == "cuda":
                peak[kind] = torch.cuda.max_memory_allocated() / 2**20
        if i >= 2:
            times["teacher"].append(t1 - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": name, "batch": batch, "grid": list(grid), "visible_tokens": keep.shape[1],
        "uta_student_s": round(med["uta_student"], 4),
        "mim_student_s": round(med["mim_student"], 4),
        "teacher_s": round(med["teacher"], 4),
        "student_step_ratio": round(med["uta_student"] / med["mim_student"], 3),
        "whole_step_ratio": round((med["uta_student"] + med["teacher"])
                                  / (med["mim_student"] + med["teacher"]), 3),
    }
    if peak:
        result["peak_mib_uta"] = round(peak["uta_student"])
        result["peak_mib_mim"] = round(peak["mim_student"])
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
        t0 = time.perf_counter()
        targets = tokens(t_images)
        _sync(device)
        t1 = time.perf_counter()
        with amp:
            loss = loss_fn(model(images, keep), targets, keep)["loss"]
        loss.backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    t = time.perf_counter()
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
    return {"config": name, "compile_s": round(compile_s, 1),
            "eager_teacher_s": round(med["eager"][0], 4),
            "compiled_teacher_s": round(med["compiled"][0], 4),
            "eager_student_s": round(med["eager"][1], 4),
            "compiled_student_s": round(med["compiled"][1], 4),
            "teacher_speedup": round(med["eager"][0] / med["compiled"][0], 3),
            "student_speedup": round(med["eager"][1] / med["compiled"][1], 3)}


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
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device={device} threads={torch.get_num_threads()} precision={args.precision}")
    print(f"{'config':6} {'batch':>5} {'vis':>4} {'UTA s':>8} {'MIM s':>8} {'teacher s':>9} "
          f"{'student UTA/MIM':>15} {'whole UTA/MIM':>13}")
    results = []
    for name in args.configs.split(","):
        r = bench_config(name, device, args.precision, args.iters)
        results.append(r)
        print(f"{name:6} {r['batch']:>5} {r['visible_tokens']:>4} {r['uta_student_s']:>8.4f} "
              f"{r['mim_student_s']:>8.4f} {r['teacher_s']:>9.4f} {r['student_step_ratio']:>15.3f} "
              f"{r['whole_step_ratio']:>13.3f}"
              + (f"  peak MiB UTA {r['peak_mib_uta']} / MIM {r['peak_mib_mim']}"
                 if "peak_mib_uta" in r else ""))
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss_mib:.0f} MiB")
    masks = bench_masks()
    print("mask generation, 14x14, ratio 0.5, 1 thread, batch 256 (masks/s): "
          + "  ".join(f"{k} {v}" for k, v in masks.items()))
    for name in filter(None, args.compile.split(",")):
        print("compile:", bench_compile(name, device, args.precision, args.iters))
    if args.demo_steps:
        print("demo:", bench_demo_data_wait(args.demo_steps))


if __name__ == "__main__":
    main()
