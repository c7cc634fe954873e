"""Curves of one or more runs from their metrics.jsonl: training and validation loss against
step (the UTA paper's Figure 4), zero-shot / validation accuracy where logged, gradient norm and
learning rate. matplotlib writes a file; plotext draws in the terminal (the `plot` extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field

from uta_cli.errors import UtaUsageError


@dataclass
class Series:
    label: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    markers: bool = False  # a few points (evaluations): draw them as dots too
    run: int = 0  # which run: one colour per run in every panel


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)


def metrics_file(run: str) -> str:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UtaUsageError(f"{run} has no metrics.jsonl. Give a run directory (runs/NAME) or a "
                            f"metrics.jsonl file.")
    return path


def read_records(run: str) -> list[dict]:
    path = metrics_file(run)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:  # a run killed mid-write leaves a cut last line
                raise UtaUsageError(f"{path} line {number} is not JSON (a cut line?). Delete "
                                    f"that line and plot again.") from None
    return records


def run_name(run: str) -> str:
    folder = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    return os.path.basename(os.path.normpath(folder))


def _series(records: list[dict], label: str, key: str, event: str | None,
            markers: bool = False, run: int = 0) -> Series:
    s = Series(label, markers=markers, run=run)
    for r in records:
        if r.get("event") == event and isinstance(r.get(key), (int, float)) and "step" in r:
            s.steps.append(int(r["step"]))
            s.values.append(float(r[key]))
    return s


def panels(runs: list[str], names: list[str] | None = None) -> list[Panel]:
    """The panels with data, every run overlaid under its name."""
    names = names or [run_name(r) for r in runs]
    if len(set(names)) < len(names):  # two runs called 'demo' in different places
        names = [f"{n} ({os.path.dirname(os.path.abspath(r))})" for n, r in zip(names, runs)]
    loss = Panel("loss (train: lines, validation: dots)", "loss")
    acc = Panel("accuracy", "top-1")
    grad = Panel("gradient norm (before clipping)", "norm")
    lr = Panel("learning rate", "lr")
    for i, (run, name) in enumerate(zip(runs, names)):
        records = read_records(run)
        loss.series.append(_series(records, f"{name} train", "loss", None, run=i))
        loss.series.append(_series(records, f"{name} val", "val_loss", "val", True, i))
        keys = sorted({k for r in records if r.get("event") == "val" for k in r
                       if k.endswith("acc1")})
        for key in keys:
            acc.series.append(_series(records, f"{name} {key}", key, "val", True, i))
        for key in ("student_acc1", "teacher_acc1"):
            acc.series.append(_series(records, f"{name} zero-shot {key.split('_')[0]}", key,
                                      "zeroshot", True, i))
        grad.series.append(_series(records, name, "grad_norm", None, run=i))
        lr.series.append(_series(records, name, "lr", None, run=i))
    out = []
    for panel in (loss, acc, grad, lr):
        panel.series = [s for s in panel.series if s.steps]
        if panel.series:
            out.append(panel)
    if not out:
        raise UtaUsageError(f"No curves to plot in {', '.join(runs)}: the metrics.jsonl files "
                            f"hold no logged steps yet.")
    return out


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UtaUsageError(f"uta plot needs {module}: pip install 'uta-cli[plot]'.")


def write_figure(plots: list[Panel], output: str, title: str = "", dpi: int = 120) -> str:
    """One row of panels, written by matplotlib (PNG, PDF, SVG: from the file name)."""
    _need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(4.8 * len(plots), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], plots):
        kinds: dict[int, int] = {}
        for s in panel.series:  # colour: the run; line and marker style: the series' kind
            kind = kinds[s.run] = kinds.get(s.run, -1) + 1
            ax.plot(s.steps, s.values, color=f"C{s.run % 10}", label=s.label,
                    linestyle="--" if s.markers else "-",
                    marker="osD^v"[kind % 5] if s.markers else None,
                    markersize=4 if s.markers else 0, linewidth=1.2)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        if panel.title.startswith("learning") or panel.title.startswith("gradient"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=dpi)
    except (OSError, ValueError) as e:
        raise UtaUsageError(f"Cannot write {output}: {e}") from None
    finally:
        plt.close(fig)
    return output


def terminal_figure(plots: list[Panel], width: int = 100, height: int = 18,
                    color: bool = False) -> str:
    """The same panels drawn with text characters (plotext), one below the other."""
    _need("plotext")
    import plotext as plt

    chunks = []
    for panel in plots:
        plt.clear_figure()
        plt.plotsize(width, height)
        plt.theme("clear")
        for s in panel.series:
            if s.markers:
                plt.scatter(s.steps, s.values, label=s.label)
            else:
                plt.plot(s.steps, s.values, label=s.label)
        plt.title(panel.title)
        plt.xlabel("step")
        chunks.append(plt.build())
    text = "\n".join(chunks)
    return text if color else re.sub(r"\x1b\[[0-9;]*m", "", text)
