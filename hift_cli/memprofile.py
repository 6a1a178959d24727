"""``hift memprofile``: the memory breakdown of a recipe, estimated without weights, and
optionally measured on real steps beside the estimate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.console import Console

from hift_cli.config import Config
from hift_cli.memory import estimate, measure, render

log = logging.getLogger(__name__)


def run_memprofile(cfg: Config, output_dir: str | Path) -> dict:
    report = estimate(cfg)
    measured = measure(cfg, output_dir) if cfg.memprofile.measure else None
    if measured:
        report["measured"] = measured
    if cfg.memprofile.format == "json":
        print(json.dumps(report, indent=2))
    else:
        Console().print(render(report, measured))
    return report
