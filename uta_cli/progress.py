"""Progress display, one look for every long job: a rich bar on a terminal, a few plain lines
on a pipe (logs stay readable), nothing off the main process."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _bar(console: Console, info: bool) -> Progress:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console)


class StepProgress:
    """Training steps: a bar with the latest loss/lr on an interactive main process; every
    logged step as a plain line otherwise."""

    def __init__(self, enabled: bool, total: int, start: int, label: str):
        self.console = Console(stderr=False)
        self.enabled = enabled
        self.bar = None
        if enabled and self.console.is_terminal:
            self.bar = _bar(self.console, info=True)
            self.task_id = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str, log_line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task_id, completed=step, info=info)
        elif self.enabled and log_line:
            self.console.print(f"step {step} {info}", highlight=False)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def progress_bar(console: Console, enabled: bool, total: int | None,
                 label: str) -> Iterator[Callable[[int], None]]:
    """Items (images, shards): yields advance(n). On a pipe, about ten plain lines."""
    if not enabled:
        yield lambda n: None
        return
    if console.is_terminal:
        bar = _bar(console, info=False)
        with bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done = [0, 0]  # items, next item count to report at
    step = max(1, math.ceil(total / 10)) if total else 1000

    def advance(n: int) -> None:
        done[0] += n
        if done[0] >= done[1] + step:
            done[1] = done[0] - done[0] % step
            console.print(f"{label}: {done[0]}" + (f"/{total}" if total else ""),
                          highlight=False)

    yield advance


def metric_text(value, spec: str = ".4f") -> str:
    """A metric in a table or progress line; n/a where it is meaningless (None, NaN): top-5 of
    fewer than five classes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)
