"""Run reports: ``loss.png`` beside every run's metrics, and a summary after a sweep."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from hift_cli.progress import console

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("train/loss", "eval/loss", "eval/accuracy", "eval/exact_match",
                "tokens_per_second", "train/seconds")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_path: Path, steps_per_cycle: int) -> Path:
    """Train loss (and eval loss when logged) against step, cycle boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", lw=1.5, label="eval loss")
    last = max([s for s, _ in train] + [s for s, _ in evals] + [0])
    if steps_per_cycle > 1 and last // steps_per_cycle <= 200:  # beyond that, a grey wall
        for boundary in range(steps_per_cycle, last + 1, steps_per_cycle):
            ax.axvline(boundary, color="0.85", lw=0.8, zorder=0)
        ax.set_title(f"{last} steps; grey lines: cycle boundaries ({steps_per_cycle} groups)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def summarize_sweep(sweep_dir: Path) -> list[dict]:
    """One row per job of a multirun: its overrides and final metrics; writes summary.csv."""
    rows = []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = [line.removeprefix("- ").strip() for line in
                     overrides_file.read_text().splitlines()] if overrides_file.exists() else []
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(overrides)}
        summary = job / "summary.json"
        if summary.exists():
            data = json.loads(summary.read_text())
            row.update({k: data.get(k) for k in SUMMARY_KEYS})
        else:
            row["status"] = "no summary (failed or interrupted)"
        memory = job / "memory_report.json"
        if memory.exists():
            report = json.loads(memory.read_text())
            measured = report.get("measured", {})
            row["peak_memory_gib"] = (measured.get("cuda_peak_allocated")
                                      or measured.get("peak_rss", 0)) / 2**30
            row["estimated_hift_gib"] = report["hift"]["total"] / 2**30
        rows.append(row)
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(Path(sweep_dir) / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return rows


class MultirunSummary(Callback):
    """After ``hift train -m ...``: a table of every job and ``summary.csv`` in the sweep dir."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from rich.table import Table

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize_sweep(sweep_dir)
        if not rows:
            return
        table = Table(title=f"sweep {sweep_dir}")
        columns = [c for c in ("job", "overrides", *SUMMARY_KEYS, "peak_memory_gib")
                   if any(r.get(c) is not None for r in rows)]
        for c in columns:
            table.add_column(c, justify="left" if c in ("job", "overrides") else "right")
        for r in rows:
            table.add_row(*[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                            for c in columns])
        console().print(table)
        log.info(f"Wrote {sweep_dir / 'summary.csv'}")
