"""The searches: ``hift.k=auto``'s fewest balanced groups under a budget, and the largest
batch that fits a grouping."""

from __future__ import annotations

import logging
import math
import time

from hift_cli.config import Config, ConfigError, optimizer_kind
from hift_cli.grouping import Group, Unit, make_groups
from hift_cli.memory.arithmetic import Estimator, Row
from hift_cli.memory.counting import gib
from hift_cli.memory.inputs import EstimateInput, as_input

log = logging.getLogger(__name__)


class NoGroupingFits(ConfigError):
    """``hift.k=auto`` found no grouping under the budget; ``k``: the smallest peak's."""

    def __init__(self, k: int, message: str):
        super().__init__(message)
        self.k = k


def choose(est: Estimator, budget: float) -> tuple[list[Group], list[Row]]:
    """The fewest balanced groups whose every row fits ``budget`` (bytes), k = 1, 2, ...
    A grouping whose rows without activations are already over it costs no pass."""
    n = len(est.rest)
    for k in range(1, n + 1):
        groups = est.groups(k, grouping="balanced")
        rows = est.evaluate(groups, est.offload(k), budget)
        if rows is not None:
            return groups, rows
    groups = est.groups(n, grouping="balanced")
    peak = max(r.total for r in est.evaluate(groups, est.offload(n)))
    s = est.settings
    fixes = ([] if s.checkpointing else ["model.gradient_checkpointing=true"]) + (
        [] if optimizer_kind(est.input.optimizer).eight_bit
        or est.input.device_type == "cpu" else ["an 8-bit optimizer (optimizer=adamw8bit)"]
    ) + [
        f"a smaller trainer.batch_size (now {s.batch_size}) or data.max_length"
        f" (now {s.seq_len})"]
    raise NoGroupingFits(n,
        f"hift.memory_budget={est.input.hift.memory_budget:g} GiB: no grouping fits in"
        f" its {gib(est.input.usable_bytes())} GiB left after the"
        f" {est.input.reserve_gib():g} GiB reserve; the smallest peak, one unit per"
        f" group (k={n}), is {gib(peak)} GiB; to fit, try {', '.join(fixes)}")


def largest_batch(est: Estimator, groups: list[Group], offload: bool, budget: float) -> int:
    """The largest trainer.batch_size at which every group fits ``budget`` (bytes).

    Activations are linear in the batch: each group's line is fitted through the run's
    batch b and 2b, and the answer is confirmed by full estimates at it and one above.
    """
    static = est.rows(groups, offload)
    if max(r.total for r in static) > budget:
        return 0  # over it before any activation
    units = [est.active_units(g) for g in groups]
    b0 = est.settings.batch_size
    b1 = 2 * b0
    a0, a1 = est.activations(units, b0), est.activations(units, b1)
    best = 1 << 20
    for row, x0, x1 in zip(static, a0, a1):
        slope = (x1 - x0) / (b1 - b0)
        room = budget - row.total - (x0 - slope * b0)
        if slope > 0:
            best = min(best, math.floor(room / slope))
        elif room < 0:
            best = 0
    batch = max(0, best)

    def fits(b: int) -> bool:
        return b >= 1 and est.evaluate(groups, offload, budget, batch=b) is not None

    while batch >= 1 and not fits(batch):
        batch -= 1
    for _ in range(4):  # a line is exact for these models: at most a step off
        if not fits(batch + 1):
            break
        batch += 1
    return batch


def resolve_grouping(source: Config | EstimateInput, estimator: Estimator | None = None,
                     list_groups: bool = True
                     ) -> tuple[int, list[list[str]], dict]:
    """``hift.k=auto``: the fewest balanced groups whose estimated peak fits
    ``hift.memory_budget``, as ``(k, each group's unit names, report)``; logs the choice
    (and each group, with ``list_groups``).

    Raises:
        ConfigError: no grouping fits (one line: the smallest peak, what would fit).
    """
    start = time.perf_counter()
    est = estimator or Estimator(source)
    inp = est.input
    budget = inp.usable_bytes()
    groups, rows = choose(est, budget)
    seconds = time.perf_counter() - start
    peak = max(r.total for r in rows)
    k = len(groups)
    report = {
        "k": k, "grouping": "balanced", "memory_budget_gib": inp.hift.memory_budget,
        "reserve_gib": inp.reserve_gib(), "peak": peak, "headroom": budget - peak,
        "passes": est.passes,
        "seconds": round(seconds, 2), "always_active": [u.name for u in est.always],
        "groups": [{"group": g.name, "units": [u.name for u in g.units], "params": g.numel,
                    "peak": r.total} for g, r in zip(groups, rows)],
    }
    log.info(f"hift.k=auto: {k} balanced group(s) fit hift.memory_budget="
             f"{inp.hift.memory_budget:g} GiB less its {inp.reserve_gib():g} GiB reserve:"
             f" estimated peak {gib(peak)} GiB, headroom"
             f" {gib(budget - peak)} GiB ({est.passes} activation passes,"
             f" {seconds:.1f} s)" + (f"; always active: {', '.join(report['always_active'])}"
                                    if est.always else ""))
    if k == 1:
        log.info("hift.k=auto: the budget holds full fine-tuning's peak; one group of every"
                 " unit is full fine-tuning (hift.strategy=fpft)")
    for g, r in zip(groups, rows) if list_groups else ():
        log.info(f"  group {g.index}: {g.name} ({g.numel / 1e6:.2f}M params), estimated peak"
                 f" {gib(r.total)} GiB")
    return k, [[u.name for u in g.units] for g in groups], report


def build_groups(source: Config | EstimateInput, units: list[Unit]) -> list[Group]:
    """The training run's groups of ``units`` (those not always active). ``hift.k=auto`` is
    resolved on the meta estimate for ``source`` (the trainer's ``estimate_input()``: its
    device resolved), and the groups are rebuilt from ``units`` by the same unit names."""
    inp = as_input(source)
    hcfg = inp.hift
    if hcfg.strategy == "fpft" or hcfg.k != "auto":
        return make_groups(units, hcfg.strategy, hcfg.k, hcfg.m,
                           None if hcfg.m is not None else hcfg.grouping)
    _, names, _ = resolve_grouping(inp)
    by_name = {u.name: u for u in units}
    return [Group(i, [by_name[n] for n in group]) for i, group in enumerate(names)]
