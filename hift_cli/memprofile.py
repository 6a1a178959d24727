"""``hift memprofile``: the memory breakdown of a recipe, estimated without weights, and
optionally measured on real steps beside the estimate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.console import Console

from hift_cli.config import Config
from hift_cli.memory import budget_lines, estimate, measure, render, render_groups

log = logging.getLogger(__name__)


def run_memprofile(cfg: Config, output_dir: str | Path) -> dict:
    # With a budget: also the largest batch that fits (a few more activation passes).
    report = estimate(cfg, largest_batch=cfg.hift.memory_budget is not None)
    measured = measure(cfg, output_dir) if cfg.memprofile.measure else None
    if measured:
        report["measured"] = measured
    if cfg.memprofile.format == "json":
        print(json.dumps(report, indent=2))
    else:
        console = Console()
        console.print(render(report, measured))
        if cfg.hift.strategy != "fpft":
            console.print(render_groups(report))
        for line in budget_lines(report):
            console.print(line, highlight=False)
    return report
