"""``hift memprofile``: parameters and bytes per HiFT group, without loading weights.

The model is built on the meta device from its config, so any size costs no memory.
"""

from __future__ import annotations

import json

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hift_cli.config import Config
from hift_cli.grouping import find_units, make_groups
from hift_cli.models import DTYPES, load_config, resolve

GIB = 2**30


def group_profile(cfg: Config) -> dict:
    """Units and groups of the configured model with parameter counts and bytes."""
    path = resolve(cfg.model.name_or_path)
    config = load_config(path, cfg.model.trust_remote_code)
    cls = (AutoModelForCausalLM if cfg.model.task == "causal_lm"
           else AutoModelForSequenceClassification)
    dtype = DTYPES[cfg.model.dtype]
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype,
                                trust_remote_code=cfg.model.trust_remote_code)
    units = find_units(model)
    groups = make_groups(units, cfg.hift.strategy, cfg.hift.k, cfg.hift.m)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    total = sum(u.numel for u in units)
    return {
        "model": cfg.model.name_or_path,
        "dtype": cfg.model.dtype,
        "strategy": cfg.hift.strategy,
        "num_units": len(units),
        "num_groups": len(groups),
        "total_params": total,
        "total_bytes": total * itemsize,
        "groups": [
            {"index": g.index, "units": [u.name for u in g.units], "params": g.numel,
             "bytes": g.numel * itemsize, "fraction": g.numel / total}
            for g in groups
        ],
    }


def run_memprofile(cfg: Config) -> dict:
    profile = group_profile(cfg)
    if cfg.memprofile.format == "json":
        print(json.dumps(profile, indent=2))
        return profile
    table = Table(title=f"hift memprofile: {profile['model']} ({profile['dtype']},"
                        f" {profile['num_units']} units, {profile['num_groups']} groups,"
                        f" {profile['strategy']})")
    table.add_column("group", justify="right")
    table.add_column("units")
    table.add_column("params", justify="right")
    table.add_column("weights GiB", justify="right")
    table.add_column("% of model", justify="right")
    for g in profile["groups"]:
        units = g["units"][0] if len(g["units"]) == 1 else f"{g['units'][0]} .. {g['units'][-1]}"
        table.add_row(str(g["index"]), units, f"{g['params']:,}", f"{g['bytes'] / GIB:.3f}",
                      f"{100 * g['fraction']:.1f}")
    table.add_row("all", "", f"{profile['total_params']:,}",
                  f"{profile['total_bytes'] / GIB:.3f}", "100.0", style="bold")
    Console().print(table)
    return profile
