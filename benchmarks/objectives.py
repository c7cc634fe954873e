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
from uta_cli.masks.generate import (
    MaskSpec,
    attention_keep,
    attention_noise,
    generate_masks,
    keep_indices,
    num_visible,
)
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


def flops_per_step(meta: dict, recipe, unmasked: bool = False) -> dict:
    """Counted FLOPs of one optimizer step of this objective and variant (attention masks drawn
    from the teacher's forward, several teacher blocks, target norm), on inputs of the run's
    shapes. unmasked: a step of the unmasked finish (every token enters the student)."""
    objective = meta["objective"]
    teacher = teacher_from_meta(meta)
    layers = tuple(teacher.resolve_layers((meta.get("align") or {}).get("teacher_layers", [-1])))
    student = UTAStudent(recipe.student, teacher.embed_dim, mask_token=objective == "mim",
                         extra_heads=len(layers) - 1)
    teacher.match_grid(student.grid_size, recipe.teacher.grid_match)
    batch = recipe.data.batch_size
    spec = MaskSpec(**meta["mask"])
    attention = spec.strategy == "attention" and objective != "fd" and not unmasked
    s = recipe.student.image_size
    student_in = torch.randn(batch, 3, s, s)
    teacher_in = torch.randn(batch, 3, teacher.image_size, teacher.image_size)
    with FlopCounterMode(display=False) as teacher_count, torch.no_grad():
        tokens, attn = teacher.targets(teacher_in, layers, cls_attention=attention)
    targets = tokens[0] if len(layers) == 1 else tokens
    if attention:
        noise = torch.from_numpy(attention_noise(0, 0, np.arange(batch), student.num_patches))
        keep = attention_keep(attn, noise, num_visible(student.num_patches, spec.ratio))
    else:  # the FLOPs depend on the number of kept tokens only, not on which
        masks = generate_masks(MaskSpec(strategy="random", ratio=spec.ratio), student.grid_size,
                               0, 0, np.arange(batch))
        keep = torch.from_numpy(keep_indices(masks))
    with FlopCounterMode(display=False) as student_count:
        objective_loss(objective, student, student_in, targets, None if unmasked else keep,
                       student.num_patches)["loss"].backward()
    accum = recipe.train.grad_accum
    return {"student": student_count.get_total_flops() * accum,
            "teacher": teacher_count.get_total_flops() * accum}


def run_flops(meta: dict, recipe, steps: int) -> dict:
    """Training FLOPs of a run of `steps` steps, its unmasked finish counted at its own cost."""
    masked = flops_per_step(meta, recipe)
    n_unmasked = min(steps, int(meta.get("unmasked_steps") or 0))
    full = flops_per_step(meta, recipe, unmasked=True) if n_unmasked else masked
    total = sum(masked.values()) * (steps - n_unmasked) + sum(full.values()) * n_unmasked
    return {"train_flops": total, "student_flops_per_step": masked["student"],
            "teacher_flops_per_step": masked["teacher"],
            "unmasked_student_flops_per_step": full["student"] if n_unmasked else None}


def zeroshot_top1(folder: str, args) -> float:
    opts = ZeroShotOptions(ckpt=folder, dataset=args.zeroshot_dataset, workers=0,
                           precision="fp32", cache_dir="none",
                           classnames=args.zeroshot_classnames, templates=args.zeroshot_templates)
    return float(run_zeroshot(opts, QUIET).report["acc1"])


def pretrain(args, objective: str, seed: int, steps: int, out: str,
             variant: tuple[str, ...] = ()) -> dict:
    """One pre-training run with `args.evals` validations and checkpoints along the way.
    variant: recipe overrides of a method variant (--variants)."""
    base = load_recipe(args.recipe, args.set)
    every = max(1, steps // args.evals)
    warmup = base.schedule.warmup_steps
    if base.schedule.steps and warmup:  # a shortened schedule keeps its warm-up share
        warmup = max(1, round(warmup * steps / base.schedule.steps))
    sets = [*args.set, f"objective={objective}", f"seed={seed}", f"schedule.steps={steps}",
            f"schedule.warmup_steps={warmup}", f"train.val_every={every}",
            f"train.checkpoint_every={every}", f"train.log_every={every}",
            f"train.keep_checkpoints={args.evals + 2}", "eval.zeroshot=none", *variant]
    recipe = load_recipe(args.recipe, sets)
    log(f"pretrain {objective} {' '.join(variant)} seed {seed}: {steps} steps -> {out}")
    summary = run_pretrain(recipe, output_dir=out, resume="never", console=QUIET)
    records = read_metrics(out)
    train_s = max(r["train_s"] for r in records if "train_s" in r)
    # the curve: zero-shot top-1 at each kept checkpoint, with the validation losses where the
    # recipe has a validation set (None where it has none: the figure then says so)
    time_at = {r["step"]: r["train_s"] for r in records if "loss" in r and "train_s" in r}
    vals = {r["step"]: r for r in records if r.get("event") == "val"}
    curve = []
    for folder in _checkpoints(out):
        step = ckpt.load_meta(folder)["step"]
        val = vals.get(step, {})
        curve.append({"step": step, "train_s": time_at.get(step, val.get("train_s", train_s)),
                      "val_full_loss": val.get("val_full_loss"), "val_loss": val.get("val_loss"),
                      "zeroshot_top1": zeroshot_top1(folder, args)})
    curve.sort(key=lambda c: c["step"])
    meta = ckpt.load_meta(ckpt.resolve_checkpoint(out))
    return {"objective": objective, "variant": list(variant), "seed": seed,
            "steps": summary["step"], "run_dir": out,
            "train_s": train_s, "s_per_step": train_s / max(1, summary["step"]),
            **run_flops(meta, recipe, summary["step"]),
            "val_full_loss": summary["val"].get("val_full_loss"),
            "val_loss": summary["val"].get("val_loss"),
            "zeroshot_top1": curve[-1]["zeroshot_top1"] if curve else zeroshot_top1(out, args),
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


def summary_markdown(summary: dict, settings: tuple[tuple[str, str], ...], rows: list[str],
                     labels: dict[str, str], fields: tuple, seeds: int, first: str) -> str:
    """One markdown table per setting: a row per objective or variant, a column per field
    (mean ± sd over seeds; "-" where nothing was measured)."""
    def cell(s: dict, fmt: str) -> str:
        if s["mean"] is None:
            return "-"
        text = fmt.format(s["mean"])
        if s["sd"] is not None:
            text += f" ± {fmt.format(s['sd'])}"
        return text

    lines = []
    for setting, title in settings:
        lines += [f"**{title}** (mean ± sd over {seeds} seed{'s' if seeds > 1 else ''})", "",
                  f"| {first} | " + " | ".join(label for _, label, _ in fields) + " |",
                  "|---|" + "---:|" * len(fields)]
        for row in rows:
            s = summary[setting][row]
            lines.append(f"| {labels[row]} | " + " | ".join(cell(s[key], fmt)
                                                           for key, _, fmt in fields) + " |")
        lines.append("")
    return "\n".join(lines)


def table_markdown(summary: dict, objectives: list[str], seeds: int) -> str:
    return summary_markdown(summary, (("equal_steps", "Equal optimizer steps"),
                                      ("equal_wallclock", "Equal wall-clock (UTA's)")),
                            objectives, {o: o for o in objectives}, FIELDS, seeds, "objective")


COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:olive")
NO_VAL_NOTE = ("No validation loss was measured: the recipe has no validation set "
               "(set data.val_source to get these curves).")


def plot(groups: dict[str, list[dict]], path: str, title: str) -> dict[str, str] | None:
    """The figure of what was measured, one colour per group of runs (mean over seeds).

    Curves where a run has two or more evaluation points; otherwise each group's final zero-shot
    and fine-tune top-1 as points. A panel left without data shows a note saying why. Returns
    what each panel shows ("data" or its note); None without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[plot]'): no figure")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("val_loss", "validation loss (1 - cos)", "Own loss (its scored tokens)"),
              ("val_full_loss", "validation loss, full image (1 - cos)",
               "Every token of the unmasked image"),
              ("top1", "top-1", "Zero-shot (CLS), fine-tune: final points"))
    drawn = {title_: False for _, _, title_ in panels}
    for i, (label, runs) in enumerate(groups.items()):
        colour = COLOURS[i % len(COLOURS)]
        curves = [r["curve"] for r in runs if r.get("curve")]
        for ax, (key, _, panel) in zip(axes[:2], panels[:2]):
            usable = [c for c in curves if all(p.get(key) is not None for p in c)]
            if not usable:
                continue
            n = min(len(c) for c in usable)  # the same evaluation points in every seed
            t = [statistics.fmean(c[j]["train_s"] for c in usable) for j in range(n)]
            ys = np.array([[c[j][key] for j in range(n)] for c in usable])
            ax.plot(t, ys.mean(0), "o-", color=colour, label=label)
            if len(usable) > 1:
                ax.fill_between(t, ys.min(0), ys.max(0), color=colour, alpha=0.2)
            drawn[panel] = True
        ax = axes[2]
        n = min((len(c) for c in curves), default=0)
        if n >= 2:  # a zero-shot curve
            t = [statistics.fmean(c[j]["train_s"] for c in curves) for j in range(n)]
            ys = np.array([[c[j]["zeroshot_top1"] for j in range(n)] for c in curves])
            ax.plot(t, ys.mean(0), "o-", color=colour, label=f"{label} zero-shot")
            if len(curves) > 1:
                ax.fill_between(t, ys.min(0), ys.max(0), color=colour, alpha=0.2)
            drawn[panels[2][2]] = True
        for key, marker, what in (("zeroshot_top1", "o", "zero-shot"),
                                  ("finetune_top1", "s", "fine-tune")):
            if key == "zeroshot_top1" and n >= 2:
                continue
            points = [(r["train_s"], r[key]) for r in runs if r.get(key) is not None]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker,
                           color=colour, label=f"{label} {what}", alpha=0.8)
                drawn[panels[2][2]] = True
    shown = {}
    for ax, (_, ylabel, panel) in zip(axes, panels):
        ax.set_title(panel, fontsize=10)
        if drawn[panel]:
            ax.set(xlabel="training wall-clock (s)", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            shown[panel] = "data"
        else:
            note = NO_VAL_NOTE if panel != panels[2][2] else "No top-1 was measured."
            ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=9,
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            shown[panel] = note
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return shown


# --------------------------------------------------------------------------------------------
# --variants: UTA against its peers' refinements (docs/method.md), each switched on alone, then
# those that win together.

VARIANT_ROWS = {  # row -> (label, recipe overrides); the unmasked finish depends on the steps
    "uta": ("uta (the paper)", ()),
    "attention": ("+ attention masks", ("mask.strategy=attention",)),
    "target_norm": ("+ target norm", ("align.target_norm=layernorm",)),
    "teacher_layers": ("+ teacher layers (last two)", ("align.teacher_layers=[-2,-1]",)),
    "unmasked": ("+ unmasked finish", ()),
}
VARIANT_FIELDS = (("steps", "steps", "{:.0f}"), ("zeroshot_top1", "zero-shot top-1", "{:.3f}"),
                  ("finetune_top1", "fine-tune top-1", "{:.3f}"),
                  ("train_flops", "train TFLOP", "{:.3g}"), ("train_s", "wall-clock s", "{:.1f}"))


def variant_overrides(args, rows: list[str], steps: int) -> tuple[str, ...]:
    """The recipe overrides of a row made of one or more variants, for a run of `steps`."""
    sets: list[str] = []
    for row in rows:
        sets += VARIANT_ROWS[row][1]
        if row == "unmasked":
            sets.append(f"schedule.unmasked_steps={max(1, round(args.unmasked_share * steps))}")
    return tuple(sets)


def beats(summary: dict, row: str) -> bool:
    """A row beats the paper's when its mean zero-shot or fine-tune top-1 exceeds UTA's by more
    than one standard deviation (the larger of the two rows' sds over seeds)."""
    for key in ("zeroshot_top1", "finetune_top1"):
        a, b = summary[row][key], summary["uta"][key]
        if a["mean"] is None or b["mean"] is None:
            continue
        sd = max(a["sd"] or 0.0, b["sd"] or 0.0)
        if a["mean"] - b["mean"] > sd:
            return True
    return False


def run_variant(args, row: str, parts: list[str], seed: int, steps: int, setting: str) -> dict:
    name = f"{row}_{'steps' if setting == 'equal_steps' else 'flops'}"
    out = os.path.join(args.out, f"seed{seed}", name)
    run = pretrain(args, "uta", seed, steps, out, variant_overrides(args, parts, steps))
    run.update(row=row, parts=parts, settings=[setting], finetune_top1=None)
    if args.finetune_recipe != "none":
        run.update(finetune(args, run, out + "_finetune"))
    return run


def equal_flops_steps(args, parts: list[str], steps: int, budget: float, flops: float) -> int:
    """Steps whose training FLOPs match `budget`: a run's FLOPs grow linearly with its steps
    (the unmasked finish keeps its share of them), so scale the steps by the FLOP ratio."""
    return max(args.evals, round(steps * budget / flops))


def summarise_variants(runs: list[dict], rows: list[str]) -> dict:
    out = {}
    for setting in ("equal_steps", "equal_flops"):
        out[setting] = {}
        for row in rows:
            chosen = [r for r in runs if r["row"] == row and setting in r["settings"]]
            out[setting][row] = {key: spread([r[key] / 1e12 if key == "train_flops" else r[key]
                                              for r in chosen]) for key, _, _ in VARIANT_FIELDS}
    return out


def variants_markdown(summary: dict, rows: list[str], labels: dict, seeds: int) -> str:
    return summary_markdown(summary, (("equal_steps", "Equal optimizer steps"),
                                      ("equal_flops", "Equal training FLOPs (the paper's row's)")),
                            rows, labels, VARIANT_FIELDS, seeds, "row")


def write_outputs(out: str, result: dict, table: str, groups: dict[str, list[dict]],
                  figure_name: str, title: str, total_s: float) -> None:
    """results.json, table.md and the figure in `out`; the table printed, the files logged."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    drawn = plot(groups, os.path.join(out, figure_name), title)
    print()
    print(table)
    log(f"done in {total_s / 60:.1f} min; {out}/results.json, table.md"
        + (f", {figure_name}" if drawn else ""))


def main_variants(args, base, steps: int) -> None:
    t_start = time.perf_counter()
    rows = [r for r in VARIANT_ROWS if r in args.rows.split(",")] if args.rows else \
        list(VARIANT_ROWS)
    labels = {r: VARIANT_ROWS[r][0] for r in VARIANT_ROWS}
    labels["unmasked"] += f" ({args.unmasked_share:.0%} of steps)"
    log(f"variants of uta on recipe {base.name}: {rows}, seeds {args.seeds}, {steps} steps, "
        f"fine-tune {args.finetune_recipe} ({args.finetune_steps or 'recipe'} steps)")
    runs: list[dict] = []

    def save_progress():
        with open(os.path.join(args.out, "runs.json"), "w") as f:  # progress survives a stop
            json.dump(runs, f, indent=1)

    def seed_rows(seed: int, row: str, parts: list[str]) -> None:
        """A row's equal-steps run and, if its FLOPs differ from the paper's by more than 1% of
        the steps (and one step), its equal-FLOPs run; else the equal-steps run serves both, and
        the TFLOP column shows the difference."""
        run = run_variant(args, row, parts, seed, steps, "equal_steps")
        runs.append(run)
        budget = next(r["train_flops"] for r in runs if r["row"] == "uta" and r["seed"] == seed)
        n = equal_flops_steps(args, parts, steps, budget, run["train_flops"])
        if abs(n - steps) <= max(1, steps // 100):
            run["settings"].append("equal_flops")
        else:
            runs.append(run_variant(args, row, parts, seed, n, "equal_flops"))
        save_progress()

    for seed in range(args.seeds):
        for row in rows:
            seed_rows(seed, row, [row])
    summary = summarise_variants(runs, rows)
    winners = [r for r in rows[1:] if beats(summary["equal_steps"], r)]
    note = ""
    if len(winners) >= 2:
        rows.append("combined")
        labels["combined"] = "+ " + " + ".join(VARIANT_ROWS[w][0][2:] for w in winners)
        for seed in range(args.seeds):
            seed_rows(seed, "combined", winners)
        summary = summarise_variants(runs, rows)
    else:
        note = (f"Variants that beat the paper's row by more than one sd: "
                f"{', '.join(labels[w] for w in winners) or 'none'}; "
                + ("no combined row (one variant is its own combination)." if winners
                   else "no combined row."))
    total_s = time.perf_counter() - t_start
    table = variants_markdown(summary, rows, labels, args.seeds) + (f"\n{note}\n" if note
                                                                    else "")
    result = {"recipe": base.name, "mode": "variants", "rows": rows, "labels": labels,
              "winners": winners, "seeds": args.seeds, "steps": steps,
              "unmasked_share": args.unmasked_share, "finetune_recipe": args.finetune_recipe,
              "finetune_steps": args.finetune_steps, "evals": args.evals,
              "threads": torch.get_num_threads(), "benchmark_wall_s": round(total_s, 1),
              "command": " ".join(sys.argv), "summary": summary, "runs": runs}
    groups = {labels[row]: [r for r in runs if r["row"] == row and "equal_steps" in r["settings"]]
              for row in rows}
    write_outputs(args.out, result, table, groups, "variants.png",
                  f"{base.name}: uta and its variants, {steps} steps, {args.seeds} seed(s), "
                  f"equal-step runs", total_s)


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
    ap.add_argument("--zeroshot-classnames", default="",
                    help="what `uta zeroshot --classnames` takes: a file, one name per line")
    ap.add_argument("--zeroshot-templates", default="",
                    help="what `uta zeroshot --templates` takes: openai | simple | a file of "
                         "prompts with {c}, e.g. 'a photo of the digit {c}.'")
    ap.add_argument("--finetune-recipe", default="",
                    help="classification fine-tune recipe (default: finetune_demo for the demo; "
                         "'none' skips fine-tuning)")
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--finetune-steps", type=int, default=150,
                    help="fine-tuning steps (0 = the fine-tune recipe's)")
    ap.add_argument("--variants", action="store_true",
                    help="compare uta with its variants (attention masks, target norm, teacher "
                         "layers, unmasked finish, the winners together) instead of objectives")
    ap.add_argument("--rows", default="",
                    help="--variants: a comma list of rows to run (uta, attention, target_norm, "
                         "teacher_layers, unmasked; uta is always run); default all")
    ap.add_argument("--unmasked-share", type=float, default=0.1,
                    help="--variants: the share of steps the unmasked finish takes")
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
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(rows) - set(VARIANT_ROWS):
        sys.exit(f"--rows: a comma list of {', '.join(VARIANT_ROWS)}")
    args.rows = ",".join(["uta", *[r for r in rows if r != "uta"]]) if rows else ""
    os.makedirs(args.out, exist_ok=True)
    if args.variants:
        main_variants(args, base, steps)
        return
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
    groups = {o.upper(): [r for r in runs if r["objective"] == o and "equal_steps" in r["settings"]]
              for o in objectives}
    write_outputs(args.out, result, table_markdown(summary, objectives, args.seeds), groups,
                  "objectives.png", f"{base.name}: {steps} steps, {args.seeds} seed(s), "
                  f"equal-step runs (band: min-max over seeds)", total_s)


if __name__ == "__main__":
    main()
