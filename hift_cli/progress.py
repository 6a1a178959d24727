"""Training progress: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("hift_cli.engine")


def format_row(row: dict) -> str:
    return (f"step {row['step']} cycle {row['cycle']} group {row['group']}"
            f" | loss {row['train/loss']:.4f} | lr {row['lr']:.2e}"
            f" | {row['tokens_per_second']:.0f} tok/s")


class TrainProgress:
    """``update(row)`` after every step; ``note(text)`` for one-off messages."""

    def __init__(self, total_steps: int, console: Console | None = None):
        self.console = console or Console()
        self.total = total_steps
        self.bar: Progress | None = None

    def __enter__(self) -> "TrainProgress":
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.task = self.bar.add_task("train", total=self.total, stats="")
            self.bar.start()
        return self

    def update(self, row: dict, log_line: bool) -> None:
        if self.bar is not None:
            stats = (f"loss {row['train/loss']:.4f}  lr {row['lr']:.2e}"
                     f"  {row['tokens_per_second']:.0f} tok/s")
            self.bar.update(self.task, completed=row["step"], stats=stats)
        elif log_line:
            log.info(format_row(row))

    def note(self, text: str) -> None:
        log.info(text)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
