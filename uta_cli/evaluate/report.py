"""The report of `uta zeroshot`: the result it returns, its tables on the terminal, and the
files it writes (the JSON report, CLIP_benchmark's per-model JSON, the per-class CSV)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.zeroshot import RECALL_KS
from uta_cli.io import json_safe
from uta_cli.outputs import open_output
from uta_cli.progress import metric_text


@dataclass
class ZeroShotResult:
    """The JSON report (CLIP_benchmark schema + provenance) and what the table and CSV need."""

    report: dict
    task: str
    classnames: list[str] = field(default_factory=list)
    per_class: dict[str, dict] = field(default_factory=dict)  # role -> per-class counts
    is_main: bool = True


def render_table(result: ZeroShotResult, console: Console) -> None:
    r = result.report
    rows = [("UTA student", r)]
    if "teacher_result" in r:
        rows.append(("CLIP teacher", r["teacher_result"]))
    skipped = str(r["skipped_images"])
    if result.task == "linear-probe":
        table = Table(title=f"Linear probe on {escape(r['dataset'])} ({r['num_classes']} "
                            f"classes, fitted on {escape(r['train_dataset'])})")
        for col in ("model", "top-1", "top-5", "mean per-class recall", "weight decay",
                    "samples"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, e in rows:
            table.add_row(name, f"{e['lp_acc1']:.4f}", metric_text(e['lp_acc5']),
                          f"{e['lp_mean_per_class_recall']:.4f}",
                          f"{e['probe']['weight_decay']:.2e}", str(e["num_samples"]))
        console.print(table)
    elif result.task == "classification":
        table = Table(title=f"Zero-shot classification on {escape(r['dataset'])} "
                            f"({r['num_classes']} classes, {r['templates']['count']} templates)")
        for col in ("model", "top-1", "top-5", "mean per-class recall", "samples", "skipped"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, e in rows:
            table.add_row(name, f"{e['acc1']:.4f}", metric_text(e['acc5']),
                          f"{e['mean_per_class_recall']:.4f}", str(e["num_samples"]), skipped)
        console.print(table)
        if "teacher_result" in r and r["teacher_result"]["acc1"] > 0:
            console.print(f"student / teacher top-1: "
                          f"{r['acc1'] / r['teacher_result']['acc1']:.3f}", highlight=False)
    else:
        table = Table(title=f"Zero-shot retrieval on {escape(r['dataset'])} "
                            f"({r['num_samples']} images, {r['num_texts']} captions)")
        table.add_column("model")
        for k in RECALL_KS:
            table.add_column(f"I→T R@{k}", justify="right")
        for k in RECALL_KS:
            table.add_column(f"T→I R@{k}", justify="right")
        table.add_column("skipped", justify="right")
        table.caption = ("I→T: image-to-text (text_retrieval_recall@k), T→I: text-to-image "
                         "(image_retrieval_recall@k), as CLIP_benchmark")
        for name, e in rows:
            table.add_row(name, *[f"{e[f'text_retrieval_recall@{k}']:.4f}" for k in RECALL_KS],
                          *[f"{e[f'image_retrieval_recall@{k}']:.4f}" for k in RECALL_KS],
                          skipped)
        console.print(table)
    console.print(f"[dim]{r['precision']} on {r['device']}"
                  + (f" x {r['world_size']}" if r["world_size"] > 1 else "")
                  + f", {r['timing']['images_per_s']:.1f} images/s"
                  + (f", class weights {r['classifier']['cache']}" if "classifier" in r else "")
                  + (f", text context {r['text_context']['used']}" if "text_context" in r
                     else "")
                  + "[/dim]", highlight=False)


def write_json(result: ZeroShotResult, path: str) -> None:
    """A local path or an fsspec URL (memory://, s3://, ...), written whole or not at all."""
    with open_output(path) as f:
        json.dump(json_safe(result.report), f, indent=1)


def dataset_slug(name: str) -> str:
    """A dataset's name for file names ({dataset}): a path's last part, no separators."""
    name = name.rstrip("/")
    if "/" in name and not name.startswith(("imagenet", "objectnet")):
        name = name.rsplit("/", 1)[-1] or name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_per_model_json(result: ZeroShotResult, pattern: str) -> list[str]:
    """CLIP_benchmark's --output: one JSON per model, `{dataset}` and `{model}` filled in
    ({model}: student or teacher)."""
    r = result.report
    slug = dataset_slug(r["dataset"])
    per_model = {"student": {k: v for k, v in r.items() if k != "teacher_result"}}
    if "teacher_result" in r:
        per_model["teacher"] = {**r["teacher_result"],
                                **{k: r[k] for k in ("precision", "device", "versions",
                                                     "templates", "skipped_images")
                                   if k in r}}
    paths = []
    for model, report in per_model.items():
        path = pattern.replace("{dataset}", slug).replace("{model}", model)

        with open_output(path) as f:
            json.dump(json_safe(report), f, indent=1)
        paths.append(path)
    return paths


def render_summary(results: list[ZeroShotResult], console: Console) -> None:
    """Several datasets in one call: one row per dataset, top-1 (top-5) per model."""
    classification = results[0].task == "classification"
    probe = results[0].task == "linear-probe"
    table = Table(title="Linear probe: top-1 (top-5)" if probe else
                  "Zero-shot " + ("classification: top-1 (top-5)" if classification
                                  else "retrieval: image / text R@1"))
    table.add_column("dataset")
    roles = ["student"] + (["teacher"] if "teacher_result" in results[0].report else [])
    for role in roles:
        table.add_column("UTA student" if role == "student" else "CLIP teacher", justify="right")
    table.add_column("samples", justify="right")
    for res in results:
        r = res.report
        cells = []
        for role in roles:
            e = r if role == "student" else r["teacher_result"]
            cells.append(f"{e['acc1']:.4f} ({metric_text(e['acc5'])})" if classification else
                         f"{e['lp_acc1']:.4f} ({metric_text(e['lp_acc5'])})" if probe else
                         f"{e['image_retrieval_recall@1']:.4f} / "
                         f"{e['text_retrieval_recall@1']:.4f}")
        table.add_row(escape(r["dataset"]), *cells, str(r["num_samples"]))
    console.print(table)


def write_per_class_csv(result: ZeroShotResult, path: str) -> None:
    """class_index, classname, num_samples, then <role>_top1_correct, <role>_recall (top-1)
    and <role>_top5_correct per model. Recall is empty for a class without samples."""
    if result.task != "classification":
        raise UtaUsageError("--per-class applies to --task classification.")

    roles = list(result.per_class)
    with open_output(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_index", "classname", "num_samples",
                    *[f"{r}_{c}" for r in roles for c in ("top1_correct", "recall",
                                                          "top5_correct")]])
        count = result.per_class[roles[0]]["count"]
        for i, name in enumerate(result.classnames):
            row = [i, name, count[i]]
            for r in roles:
                top1 = result.per_class[r]["top1"][i]
                row += [top1, f"{top1 / count[i]:.6f}" if count[i] else "",
                        result.per_class[r]["top5"][i]]
            w.writerow(row)
