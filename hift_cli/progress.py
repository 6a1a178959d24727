"""Training progress: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("hift_cli.engine")


def format_row(row: dict) -> str:
    return (f"step {row['step']} cycle {row['cycle']} group {row['group']}"
            f" | loss {row['train/loss']:.4f} | lr {row['lr']:.2e}"
            f" | {row['tokens_per_second']:.0f} tok/s")


class TrainProgress:
    """``update(row)`` after every step; ``note(text)`` for one-off messages."""

    def __init__(self, total_steps: int, console: Console | None = None, enabled: bool = True):
        self.console = console or Console()
        self.total = total_steps
        self.enabled = enabled  # data parallel: only rank 0 shows progress
        self.bar: Progress | None = None

    def __enter__(self) -> "TrainProgress":
        if self.enabled and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.task = self.bar.add_task("train", total=self.total, stats="")
            handlers = _stdout_handlers()
            self.bar.start()
            # The live bar swaps sys.stdout for a proxy that prints above the bar; point
            # console log handlers at it so log lines do not tear the bar.
            self._swapped = [(h, h.setStream(sys.stdout)) for h in handlers]
        return self

    def update(self, row: dict, log_line: bool) -> None:
        if self.bar is not None:
            stats = (f"loss {row['train/loss']:.4f}  lr {row['lr']:.2e}"
                     f"  {row['tokens_per_second']:.0f} tok/s")
            self.bar.update(self.task, completed=row["step"], stats=stats)
        elif log_line and self.enabled:
            log.info(format_row(row))

    def note(self, text: str) -> None:
        if self.enabled:
            log.info(text)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            for handler, stream in self._swapped:
                handler.setStream(stream)
            self.bar.stop()


def _stdout_handlers() -> list[logging.StreamHandler]:
    return [h for h in logging.getLogger().handlers
            if type(h) is logging.StreamHandler and h.stream in (sys.__stdout__, sys.stdout)]
