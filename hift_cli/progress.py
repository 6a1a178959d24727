"""Where a run's output goes: ``metrics.jsonl``, the trackers, and the progress display (a
rich progress bar on a terminal, plain log lines otherwise)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hift_cli.trackers import Trackers

log = logging.getLogger("hift_cli.engine")
FILE_WIDTH = 200  # columns of rich output that goes to a file or a pipe (not a terminal)


def console(**kwargs) -> Console:
    """A rich console: the terminal's width, or, printing to a file or a pipe (a log, CI),
    wide enough that tables are not cut at rich's default of 80 columns."""
    out = Console(**kwargs)
    return out if out.is_terminal else Console(width=FILE_WIDTH, **kwargs)


def format_row(row: dict, total: int | None = None, eta: float | None = None) -> str:
    """A step's log line (no progress bar): ``step 12/40``, loss, LR, speed, ETA."""
    step = f"{row['step']}/{total}" if total else f"{row['step']}"
    return (f"step {step} cycle {row['cycle']}"
            + (f" group {row['group']}" if "group" in row else "")  # another update rule: none
            + f" | loss {row['train/loss']:.4f} | lr {row['lr']:.2e}"
            f" | {row['tokens_per_second']:.0f} tok/s"
            + (f" | ETA {_duration(eta)}" if eta is not None else ""))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class TrainProgress:
    """``update(row)`` after every step; ``note(text)`` for one-off messages."""

    def __init__(self, total_steps: int, console: Console | None = None, enabled: bool = True,
                 start_step: int = 0):
        self.console = console or Console()
        self.total = total_steps
        self.enabled = enabled  # data parallel: only rank 0 shows progress
        self.bar: Progress | None = None
        self.start_step, self.step_seconds = start_step, 0.0  # this run's steps' time

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
        self.step_seconds += row["step_seconds"]
        if self.bar is not None:
            stats = (f"loss {row['train/loss']:.4f}  lr {row['lr']:.2e}"
                     f"  {row['tokens_per_second']:.0f} tok/s")
            self.bar.update(self.task, completed=row["step"], stats=stats)
        elif log_line and self.enabled:
            # The steps left at this run's mean step time (evaluations not counted).
            done = row["step"] - self.start_step
            eta = self.step_seconds / done * (self.total - row["step"]) if done > 0 else None
            log.info(format_row(row, self.total, eta))

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


class RunLog:
    """A training run's metrics writer: each row goes to ``<output_dir>/metrics.jsonl``
    (appended: a resumed run goes on in the same file) and to the trackers in
    ``trainer.loggers``; step rows also move the progress display. ``enabled=False``
    (ranks other than 0) writes and shows nothing."""

    def __init__(self, output_dir: Path, cfg, start_step: int, total_steps: int,
                 enabled: bool = True):
        self.output_dir, self.cfg, self.enabled = Path(output_dir), cfg, enabled
        self.start_step, self.total_steps = start_step, total_steps
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "RunLog":
        with self._stack as stack:
            self.file = None
            if self.enabled:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self.file = stack.enter_context(open(self.output_dir / "metrics.jsonl", "a"))
            self.trackers = stack.enter_context(Trackers(
                self.cfg.trainer.loggers, self.output_dir, self.cfg, enabled=self.enabled,
                start_step=self.start_step))
            self.progress = stack.enter_context(TrainProgress(
                self.total_steps, enabled=self.enabled, start_step=self.start_step))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def record(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self.trackers.log(row)  # TensorBoard / W&B / MLflow (trainer.loggers)

    def step(self, row: dict, log_line: bool) -> None:
        """A step's row; ``log_line``: also as a log line when there is no progress bar."""
        self.record(row)
        self.progress.update(row, log_line=log_line)

    def note(self, text: str) -> None:
        self.progress.note(text)
