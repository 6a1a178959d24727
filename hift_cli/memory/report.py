"""The estimate as a report (fpft and every HiFT group, the budget's verdict), and its
rendering: ``hift memprofile``'s tables and lines."""

from __future__ import annotations

from hift_cli.config import Config
from hift_cli.grouping import Group
from hift_cli.memory.arithmetic import Estimator
from hift_cli.memory.counting import CATEGORIES, GIB, SAMPLE_BLOCKS, Settings, gib
from hift_cli.memory.inputs import EstimateInput
from hift_cli.memory import search


def estimate(source: Config | EstimateInput, largest_batch: bool = False) -> dict:
    """Estimated device bytes per category for fpft and for HiFT (every group).

    The meta model's forward passes split it into units and count its activations.
    Where a meta forward pass fails (code that reads tensor values), a real CPU sample
    of the architecture with ``SAMPLE_BLOCKS`` blocks does that instead; the report's
    ``unit_split_method`` and ``activation_method`` say which was used. ``hift.k=auto``
    is resolved here (:func:`resolve_grouping`); with ``hift.memory_budget`` the report's
    ``budget`` says whether the grouping fits, and with ``largest_batch`` the largest
    trainer.batch_size that does. With ``memprofile.world_size`` > 1 every number is per
    GPU, and the report's ``sharding`` says what the rows add for sharding.
    """
    est = Estimator(source)
    inp = est.input
    hcfg = inp.hift
    budget = inp.usable_bytes() if hcfg.memory_budget else None
    resolution = None
    if hcfg.k == "auto" and budget is not None:
        # The report lists the groups (hift memprofile's table): not the log too.
        k, _, resolution = search.resolve_grouping(inp, est, list_groups=False)
        grouping = "balanced"
        hift_groups = est.groups(k, grouping=grouping)
    elif hcfg.k == "auto":  # fpft with k=auto and no budget: one unit per group
        grouping, hift_groups = "contiguous", est.groups(len(est.rest))
    else:
        grouping = "contiguous" if hcfg.m is not None else hcfg.grouping or "contiguous"
        hift_groups = est.groups(hcfg.k, hcfg.m, grouping)
    offload = est.offload(len(hift_groups))
    per_group = [row.as_dict() for row in est.evaluate(hift_groups, offload)]
    fpft = est.fpft().as_dict()
    report = {**_report(inp, est.settings, offload, fpft, per_group, len(est.units),
                        est.total_numel), **est.methods}
    report["grouping"] = grouping
    report["always_active"] = [u.name for u in est.always]
    per = 1 if hcfg.strategy == "fpft" else hcfg.steps_per_group
    report["steps_per_group"] = per
    if offload:  # host <-> device traffic: each group's state in and out once per cycle
        cycle = sum(row["moved"] for row in per_group)
        report["transfer"] = {"bytes_per_cycle": cycle,
                              "bytes_per_step": cycle / (len(per_group) * per)}
    for row, g in zip(per_group, hift_groups):
        row["units"] = [u.name for u in g.units]
    if est.world_size > 1:
        report["sharding"] = _sharding(est, fpft, per_group)
    if budget is not None:
        column = "fpft" if hcfg.strategy == "fpft" else "hift"
        peak = report[column]["total"]
        report["budget"] = {"memory_budget_gib": hcfg.memory_budget,
                            "reserve_gib": inp.reserve_gib(), "fits": peak <= budget,
                            "peak": peak, "headroom": budget - peak,
                            "k": 1 if column == "fpft" else len(hift_groups),
                            "chosen": resolution is not None}
        if resolution is not None:
            report["budget"].update(passes=resolution["passes"],
                                    seconds=resolution["seconds"])
        if largest_batch:
            groups = [Group(0, list(est.units))] if column == "fpft" else hift_groups
            report["budget"]["largest_batch_size"] = search.largest_batch(
                est, groups, offload if column == "hift" else False, budget)
            report["budget"]["largest_batch_method"] = (
                "linear fit through batch b and 2b, confirmed by estimates at the answer"
                " and one above")
    return report


def _sharding(est: Estimator, fpft: dict, per_group: list[dict]) -> dict:
    """What the per-GPU rows of ``memprofile.world_size`` > 1 are made of."""
    wb, n = est.settings.weight_bytes, est.world_size
    gathered = est.gathered_units()
    kept = sum(est.shard[u.name][0] for u in est.units)
    return {
        "world_size": n,
        "method": "FSDP2 fully_shard per unit: each parameter sharded on dim 0, ceil(d0/N)"
                  " rows per GPU; optimizer state and fp32 masters sharded alike",
        "weights_unsharded_bytes": est.total_numel * wb,
        "weights_per_gpu_bytes": kept * wb,
        "gathered_units": [u.name for u in gathered],
        "gathered_units_bytes": sum(u.numel for u in gathered) * wb,
        "unsharded_grad_bytes": {"fpft": fpft["unsharded_gradient"],
                                 "hift": max(r["unsharded_gradient"] for r in per_group)},
    }


def _report(inp: EstimateInput, settings: Settings, offload: bool, fpft: dict, per_group: list[dict],
            num_units: int, total_params: int) -> dict:
    peak = max(per_group, key=lambda r: r["total"])
    hift = {c: max(r[c] for r in per_group) for c in CATEGORIES}
    hift["total"] = peak["total"]
    return {
        "model": inp.shape or inp.model,
        "params": total_params,
        "units": num_units,
        "groups": len(per_group),
        "strategy": inp.hift.strategy,
        "precision": inp.precision,
        "optimizer": inp.optimizer["_target_"],
        "offload": offload,
        "gradient_checkpointing": settings.checkpointing,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "world_size": inp.world_size,
        "fpft": {k: fpft[k] for k in (*CATEGORIES, "total")},
        "hift": hift,
        "hift_peak_group": peak["group"],
        "per_group": per_group,
    }


def _methods_line(report: dict) -> str:
    if report.get("activation_method", "meta") == "meta":
        acts = "activations: meta forward pass"
    else:
        acts = f"activations: scaled from a {SAMPLE_BLOCKS}-block CPU sample"
    if report.get("unit_split_method", "meta") != "meta":
        return f"units: split on a CPU sample; {acts}"
    return acts


def render(report: dict, measured: dict | None = None):
    """A rich table: rows are categories, columns fpft and HiFT (GiB and % of total)."""
    from rich.table import Table

    unit, scale = ("GiB", GIB) if report["fpft"]["total"] >= GIB else ("MiB", 2**20)
    params = report["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    title = (f"{report['model']}: {size} params, {report['units']} units"
             f" in {report['groups']} {report.get('grouping', 'contiguous')} groups"
             f" ({report['strategy']})"
             + (f", always active: {', '.join(report['always_active'])}"
                if report.get("always_active") else "") + f", {report['precision']},"
             f" {report['optimizer'].rsplit('.', 1)[-1]}, batch {report['batch_size']} x"
             f" {report['seq_len']}, offload {'on' if report['offload'] else 'off'},"
             f" checkpointing {'on' if report['gradient_checkpointing'] else 'off'}")
    sharding = report.get("sharding")
    if sharding:
        title = (f"per GPU, {sharding['world_size']} processes sharding the weights"
                 f" (FSDP2) — {title}")
    table = Table(title=title)
    table.add_column(unit, justify="left")
    for name in ("fpft", "hift"):
        table.add_column(name, justify="right")
        table.add_column("%", justify="right")
        if measured:
            table.add_column(f"{name} measured", justify="right")
    for cat in (*CATEGORIES, "total"):
        cells = [cat.replace("_", " ")]
        for name in ("fpft", "hift"):
            value, total = report[name][cat], report[name]["total"]
            cells += [f"{value / scale:.3f}", f"{100 * value / total:.1f}"]
            if measured:
                cells.append(f"{measured[name][cat] / scale:.3f}")
        table.add_row(*cells, style="bold" if cat == "total" else None)
    table.caption = (f"hift rows: the largest over groups; hift total: the peak group"
                     f" ({report['hift_peak_group']})\n{_methods_line(report)}")
    if report.get("transfer"):
        per, moved = report.get("steps_per_group", 1), report["transfer"]
        table.caption += (
            f"\noffload: {moved['bytes_per_cycle'] / scale:.3f} {unit} each way per cycle,"
            f" {moved['bytes_per_step'] / scale:.3f} {unit} per step"
            f" ({report['groups']} groups x {per} step{'s' if per > 1 else ''})")
    if sharding:
        n = sharding["world_size"]
        table.caption += (
            f"\nper GPU of {n}: 1/{n} of every weight, gradient, optimizer state and fp32"
            f" master (dim 0 sharded); weights + {', '.join(sharding['gathered_units'])}"
            f" gathered ({sharding['gathered_units_bytes'] / scale:.3f} {unit}), gradients +"
            f" one unit's unsharded gradient before its reduce-scatter")
    return table


def render_groups(report: dict):
    """A rich table of the HiFT groups: units, parameters and estimated peak of each."""
    from rich.table import Table

    unit, scale = ("GiB", GIB) if report["fpft"]["total"] >= GIB else ("MiB", 2**20)
    always = report.get("always_active") or []
    table = Table(title=f"{report['groups']} {report.get('grouping', 'contiguous')} groups"
                  + (f" (+ always active: {', '.join(always)})" if always else ""))
    for name, justify in (("#", "right"), ("group", "left"), ("units", "right"),
                          ("params", "right"), (f"activations {unit}", "right"),
                          (f"peak {unit}", "right")):
        table.add_column(name, justify=justify)
    for i, row in enumerate(report["per_group"]):
        params = row.get("params", 0)
        table.add_row(str(i), row["group"], str(len(row.get("units", []))),
                      f"{params / 1e6:.2f}M", f"{row['activations'] / scale:.3f}",
                      f"{row['total'] / scale:.3f}",
                      style="bold" if row["group"] == report["hift_peak_group"] else None)
    return table


def budget_lines(report: dict) -> list[str]:
    """"Will it fit?" under hift.memory_budget, in words."""
    b = report.get("budget")
    if not b:
        return []
    what = (f"hift.k=auto chose k={b['k']} (balanced)" if b["chosen"]
            else f"k={b['k']} ({report.get('grouping', 'contiguous')})")
    per_gpu = (f" per GPU ({report['world_size']} processes)"
               if report.get("world_size", 1) > 1 else "")
    reserve = b.get("reserve_gib", 0)
    lines = [f"memory budget {b['memory_budget_gib']:g} GiB less a {reserve:g} GiB reserve:"
             f" {what}; estimated peak{per_gpu}"
             f" {gib(b['peak'])} GiB, {'fits' if b['fits'] else 'does NOT fit'}, headroom"
             f" {gib(b['headroom'])} GiB"]
    if b["chosen"] and b["k"] == 1:
        lines.append("k=1: the budget holds full fine-tuning's peak (one group of every unit)")
    if "largest_batch_size" in b:
        lines.append(f"largest trainer.batch_size that fits at this grouping:"
                     f" {b['largest_batch_size']} (at {report['seq_len']} tokens;"
                     f" {b['largest_batch_method']})")
    return lines
