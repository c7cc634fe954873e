"""UTA against masked image modelling (MIM) and feature distillation (FD) at equal compute.

The three objectives (docs/objectives.md) train the same student against the same teacher on the
same data, masks and schedule, with `uta pretrain`'s own code, in two settings:

- equal optimizer steps: each objective trains --steps steps;
- equal wall-clock: each objective gets the training seconds UTA took for those steps, i.e.
  steps x (UTA's seconds per step / its own) steps, its schedule (warm-up, cosine) shortened
  to fit. UTA's run is shared by both settings.

Every run is then measured: the student's zero-shot top-1 (the demo's held-out images, or
--zeroshot-dataset), top-1 after a classification fine-tune (--finetune-recipe), train FLOPs
(one step counted by torch's FlopCounterMode: student forward and backward plus the teacher's
forward, times the steps) and training wall-clock (the engine's train_s: validation and
checkpoint writing excluded). Seeds give mean and spread. Outputs in --out: results.json,
table.md, and objectives.png (Figure 4 style: full-image validation loss and zero-shot top-1
against wall-clock, equal-step runs, mean over seeds).

    python benchmarks/objectives.py                  # the demo, 3 seeds (sized for 2 CPU cores)
    python benchmarks/objectives.py --seeds 1 --steps 40 --finetune-steps 20   # a smoke run
    python benchmarks/objectives.py --recipe my.yaml --set data.source=/data/train \\
        --zeroshot-dataset /data/val --finetune-recipe my_finetune.yaml

Needs matplotlib for the figure (pip install -e ".[plot]"); without it the rest still runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from uta_cli import checkpoint as ckpt
from uta_cli.loading.model import teacher_from_meta
from uta_cli.masks.generate import MaskSpec, generate_masks, keep_indices
from uta_cli.models.student import UTAStudent
from uta_cli.recipe import load_recipe
from uta_cli.tasks.alignment import OBJECTIVES, objective_loss
from uta_cli.workflows.finetune import run_finetune
from uta_cli.workflows.pretrain import run_pretrain
from uta_cli.workflows.zeroshot import ZeroShotOptions, run_zeroshot

QUIET = Console(file=io.StringIO())  # the runs' own tables; this script prints its summary


def log(text: str) -> None:
    print(f"[objectives {time.strftime('%H:%M:%S')}] {text}", flush=True)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def flops_per_step(meta: dict, recipe) -> dict:
    """Counted FLOPs of one optimizer step of this objective, on inputs of the run's shapes."""
    objective = meta["objective"]
    teacher = teacher_from_meta(meta)
    student = UTAStudent(recipe.student, teacher.embed_dim, mask_token=objective == "mim")
    teacher.match_grid(student.grid_size, recipe.teacher.grid_match)
    batch = recipe.data.batch_size
    masks = generate_masks(MaskSpec(**meta["mask"]), student.grid_size, 0, 0, np.arange(batch))
    keep = torch.from_numpy(keep_indices(masks))
    s = recipe.student.image_size
    student_in = torch.randn(batch, 3, s, s)
    teacher_in = torch.randn(batch, 3, teacher.image_size, teacher.image_size)
    with FlopCounterMode(display=False) as teacher_count, torch.no_grad():
        tokens = teacher.tokens(teacher_in)
    with FlopCounterMode(display=False) as student_count:
        objective_loss(objective, student, student_in, tokens, keep,
                       student.num_patches)["loss"].backward()
    accum = recipe.train.grad_accum
    return {"student": student_count.get_total_flops() * accum,
            "teacher": teacher_count.get_total_flops() * accum}


def zeroshot_top1(folder: str, dataset: str) -> float:
    opts = ZeroShotOptions(ckpt=folder, dataset=dataset, workers=0, precision="fp32",
                           cache_dir="none")
    return float(run_zeroshot(opts, QUIET).report["acc1"])


def pretrain(args, objective: str, seed: int, steps: int, out: str) -> dict:
    """One pre-training run with `args.evals` validations and checkpoints along the way."""
    base = load_recipe(args.recipe, args.set)
    every = max(1, steps // args.evals)
    warmup = base.schedule.warmup_steps
    if base.schedule.steps and warmup:  # a shortened schedule keeps its warm-up share
        warmup = max(1, round(warmup * steps / base.schedule.steps))
    sets = [*args.set, f"objective={objective}", f"seed={seed}", f"schedule.steps={steps}",
            f"schedule.warmup_steps={warmup}", f"train.val_every={every}",
            f"train.checkpoint_every={every}", f"train.log_every={every}",
            f"train.keep_checkpoints={args.evals + 2}", "eval.zeroshot=none"]
    recipe = load_recipe(args.recipe, sets)
    log(f"pretrain {objective} seed {seed}: {steps} steps -> {out}")
    summary = run_pretrain(recipe, output_dir=out, resume="never", console=QUIET)
    records = read_metrics(out)
    train_s = max(r["train_s"] for r in records if "train_s" in r)
    # the curve: full-image validation loss and zero-shot top-1 at each kept checkpoint
    time_at = {r["step"]: r["train_s"] for r in records if "loss" in r and "train_s" in r}
    vals = {r["step"]: r for r in records if r.get("event") == "val"}
    curve = []
    for folder in _checkpoints(out):
        step = ckpt.load_meta(folder)["step"]
        if step in vals:
            curve.append({"step": step, "train_s": time_at.get(step, vals[step].get("train_s")),
                          "val_full_loss": vals[step]["val_full_loss"],
                          "val_loss": vals[step]["val_loss"],
                          "zeroshot_top1": zeroshot_top1(folder, args.zeroshot_dataset)})
    curve.sort(key=lambda c: c["step"])
    meta = ckpt.load_meta(ckpt.resolve_checkpoint(out))
    flops = flops_per_step(meta, recipe)
    return {"objective": objective, "seed": seed, "steps": summary["step"], "run_dir": out,
            "train_s": train_s, "s_per_step": train_s / max(1, summary["step"]),
            "train_flops": (flops["student"] + flops["teacher"]) * summary["step"],
            "student_flops_per_step": flops["student"],
            "teacher_flops_per_step": flops["teacher"],
            "val_full_loss": summary["val"].get("val_full_loss"),
            "val_loss": summary["val"].get("val_loss"),
            "zeroshot_top1": curve[-1]["zeroshot_top1"] if curve else
            zeroshot_top1(out, args.zeroshot_dataset),
            "curve": curve}


def _checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step_")
                  and os.path.isfile(os.path.join(root, d, "meta.json")))


def finetune(args, run: dict, out: str) -> dict:
    sets = [*args.finetune_set, f"init={run['run_dir']}", f"seed={run['seed']}",
            "train.val_every=0", "train.checkpoint_every=0", "finetune.val_at_start=false"]
    if args.finetune_steps:
        recipe = load_recipe(args.finetune_recipe, sets)
        warmup = recipe.schedule.warmup_steps
        if recipe.schedule.steps and warmup:
            warmup = max(1, round(warmup * args.finetune_steps / recipe.schedule.steps))
        sets += [f"schedule.steps={args.finetune_steps}", f"schedule.warmup_steps={warmup}"]
    log(f"finetune {run['objective']} seed {run['seed']} -> {out}")
    t0 = time.perf_counter()
    summary = run_finetune(load_recipe(args.finetune_recipe, sets), output_dir=out,
                           resume="never", console=QUIET)
    val = summary["val"]
    return {"finetune_top1": val.get("val_ema_acc1", val.get("val_acc1")),
            "finetune_top1_live": val.get("val_acc1"),
            "finetune_s": time.perf_counter() - t0}


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


FIELDS = (("steps", "steps", "{:.0f}"), ("train_s", "wall-clock s", "{:.1f}"),
          ("train_flops", "train TFLOP", "{:.3g}"), ("zeroshot_top1", "zero-shot top-1", "{:.3f}"),
          ("finetune_top1", "fine-tune top-1", "{:.3f}"),
          ("val_full_loss", "val loss (full image)", "{:.4f}"))


def summarise(runs: list[dict], objectives: list[str]) -> dict:
    out = {}
    for setting in ("equal_steps", "equal_wallclock"):
        out[setting] = {}
        for objective in objectives:
            rows = [r for r in runs if r["objective"] == objective and setting in r["settings"]]
            out[setting][objective] = {
                key: spread([r[key] / 1e12 if key == "train_flops" else r[key] for r in rows])
                for key, _, _ in FIELDS}
    return out


def table_markdown(summary: dict, objectives: list[str], seeds: int) -> str:
    def cell(s: dict, fmt: str) -> str:
        if s["mean"] is None:
            return "-"
        text = fmt.format(s["mean"])
        if s["sd"] is not None:
            text += f" ± {fmt.format(s['sd'])}"
        return text

    lines = []
    for setting, title in (("equal_steps", "Equal optimizer steps"),
                           ("equal_wallclock", "Equal wall-clock (UTA's)")):
        lines += [f"**{title}** (mean ± sd over {seeds} seed{'s' if seeds > 1 else ''})", "",
                  "| objective | " + " | ".join(label for _, label, _ in FIELDS) + " |",
                  "|---|" + "---:|" * len(FIELDS)]
        for objective in objectives:
            s = summary[setting][objective]
            lines.append(f"| {objective} | " + " | ".join(cell(s[key], fmt)
                                                          for key, _, fmt in FIELDS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], objectives: list[str], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[plot]'): no figure")
        return False
    fig, (ax_own, ax_loss, ax_acc) = plt.subplots(1, 3, figsize=(15, 4))
    colours = {"uta": "tab:blue", "mim": "tab:orange", "fd": "tab:green"}
    for objective in objectives:
        curves = [r["curve"] for r in runs
                  if r["objective"] == objective and "equal_steps" in r["settings"] and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)  # the same evaluation points in every seed
        t = [statistics.fmean(c[i]["train_s"] for c in curves) for i in range(n)]
        for ax, key in ((ax_own, "val_loss"), (ax_loss, "val_full_loss"),
                        (ax_acc, "zeroshot_top1")):
            ys = np.array([[c[i][key] for i in range(n)] for c in curves])
            ax.plot(t, ys.mean(0), "o-", color=colours.get(objective), label=objective.upper())
            if len(curves) > 1:
                ax.fill_between(t, ys.min(0), ys.max(0), color=colours.get(objective), alpha=0.2)
    ax_own.set(xlabel="training wall-clock (s)", ylabel="validation loss (1 - cos)",
               title="Each objective's own loss (its scored tokens)")
    ax_loss.set(xlabel="training wall-clock (s)", ylabel="validation loss, full image (1 - cos)",
                title="Every token of the unmasked image")
    ax_acc.set(xlabel="training wall-clock (s)", ylabel="zero-shot top-1",
               title="Student zero-shot (CLS)")
    for ax in (ax_own, ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="demo", help="a built-in pre-training recipe or a YAML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every pre-training run (repeatable)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0,
                    help="optimizer steps of the equal-steps runs (0 = the recipe's)")
    ap.add_argument("--evals", type=int, default=5,
                    help="validations / zero-shot points along each run (the figure's points)")
    ap.add_argument("--zeroshot-dataset", default="demo",
                    help="what `uta zeroshot --dataset` takes; demo = the held-out demo images")
    ap.add_argument("--finetune-recipe", default="",
                    help="classification fine-tune recipe (default: finetune_demo for the demo; "
                         "'none' skips fine-tuning)")
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--finetune-steps", type=int, default=150,
                    help="fine-tuning steps (0 = the fine-tune recipe's)")
    ap.add_argument("--out", default="runs/objectives")
    args = ap.parse_args()

    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if not objectives or set(objectives) - set(OBJECTIVES) or "uta" not in objectives:
        sys.exit(f"--objectives: a comma list of {', '.join(OBJECTIVES)} that includes uta "
                 f"(the wall-clock budget is UTA's)")
    base = load_recipe(args.recipe, args.set)
    if not args.finetune_recipe:
        args.finetune_recipe = "finetune_demo" if base.data.source == "demo" else "none"
    steps = args.steps or base.schedule.steps
    if steps < args.evals:
        sys.exit("--steps: give at least --evals steps (or a recipe with schedule.steps)")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    log(f"recipe {base.name}, objectives {objectives}, seeds {args.seeds}, {steps} steps, "
        f"fine-tune {args.finetune_recipe} ({args.finetune_steps or 'recipe'} steps)")

    runs: list[dict] = []
    for seed in range(args.seeds):
        equal = {}
        for objective in objectives:
            run = pretrain(args, objective, seed, steps,
                           os.path.join(args.out, f"seed{seed}", f"{objective}_steps"))
            run["settings"] = ["equal_steps"] + (["equal_wallclock"] if objective == "uta"
                                                 else [])
            equal[objective] = run
            runs.append(run)
        budget_s_per_step = equal["uta"]["s_per_step"]
        for objective in objectives:
            if objective == "uta":
                continue
            wc_steps = max(args.evals, round(steps * budget_s_per_step
                                             / equal[objective]["s_per_step"]))
            run = pretrain(args, objective, seed, wc_steps,
                           os.path.join(args.out, f"seed{seed}", f"{objective}_wallclock"))
            run["settings"] = ["equal_wallclock"]
            runs.append(run)
        for run in runs:
            if run["seed"] == seed:
                run.update({"finetune_top1": None})
                if args.finetune_recipe != "none":
                    name = os.path.basename(run["run_dir"])
                    run.update(finetune(args, run, os.path.join(args.out, f"seed{seed}",
                                                                f"{name}_finetune")))
        with open(os.path.join(args.out, "runs.json"), "w") as f:  # progress survives a stop
            json.dump(runs, f, indent=1)

    summary = summarise(runs, objectives)
    total_s = time.perf_counter() - t_start
    result = {"recipe": base.name, "objectives": objectives, "seeds": args.seeds,
              "steps": steps, "finetune_recipe": args.finetune_recipe,
              "finetune_steps": args.finetune_steps, "evals": args.evals,
              "threads": torch.get_num_threads(), "benchmark_wall_s": round(total_s, 1),
              "command": " ".join(sys.argv), "summary": summary, "runs": runs}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = table_markdown(summary, objectives, args.seeds)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    figure = os.path.join(args.out, "objectives.png")
    drawn = plot(runs, objectives, figure,
                 f"{base.name}: {steps} steps, {args.seeds} seed(s), equal-step runs "
                 f"(band: min-max over seeds)")
    print()
    print(table)
    log(f"done in {total_s / 60:.1f} min; {args.out}/results.json, table.md"
        + (", objectives.png" if drawn else ""))


if __name__ == "__main__":
    main()
