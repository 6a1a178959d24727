"""The fallback for models whose forward pass cannot run on meta tensors: activations
measured on a real CPU sample of the architecture with fewer blocks and shorter sequences,
split into per-block and outside parts, and scaled to the configured depth, batch and
length."""

from __future__ import annotations

import logging
import math

from torch import nn

from hift_cli.config import ConfigError
from hift_cli.grouping import Group, Unit, block_stack, find_units
from hift_cli.memory.activations import saved_bytes
from hift_cli.memory.counting import SAMPLE_BLOCKS, Settings, sample_model
from hift_cli.memory.inputs import EstimateInput

log = logging.getLogger(__name__)


SAMPLE_LENGTHS = (8, 16, 24)  # its sequence lengths (a quadratic in length fits them)


def _block_states(units: set[str], num_blocks: int):
    """What requires grad in each block while ``units`` are active: "params" (the first
    active block above frozen embeddings), "both", "input" (frozen, above an active unit)
    or None (nothing: the block saves nothing). The rest of the model's saved bytes
    depend on the flags (embeddings active, head active, a unit below the head active)."""
    grad_in, states = "embeddings" in units, []
    for i in range(num_blocks):
        active = f"block.{i}" in units
        states.append(("both" if grad_in else "params") if active
                      else ("input" if grad_in else None))
        grad_in = grad_in or active
    return ("embeddings" in units, "head" in units, grad_in), states


def _sample_stats(sample: nn.Module, units: dict[str, Unit], batch: int, seq_len: int,
                  causal: bool, needed: set, loss_chunk: int | None = None) -> dict:
    """Saved bytes of a sample model, split into what the groups of a deeper model are
    made of: the part outside the blocks per flags (those ``needed``), and a block's part
    per state (the first saving block separately: it also saves tensors shared by all
    blocks, such as rotary tables and masks), with the block inputs checkpointing keeps."""
    blocks = list(block_stack(sample)[1])
    n = len(blocks)
    # The first three give every block state; the others only their outside part.
    patterns = [set(units), {"embeddings"}, {"block.0"}, {f"block.{n - 1}", "head"}, {"head"}]
    stats: dict = {}
    for i, names in enumerate(patterns):
        names &= set(units)
        flags, states = _block_states(names, n)
        if i >= 3 and flags not in needed:
            continue
        active = [p for name in names for p in units[name].params.values()]
        saved = saved_bytes(sample, blocks, active, batch, seq_len, causal, loss_chunk)
        stats[("outside", flags)] = saved.outside
        per_block = saved.per_block()
        first = True
        for j, state in enumerate(states):
            if state is not None:
                stats[("first" if first else "own", state)] = per_block.get(j, 0)
                stats[("input", state)] = saved.block_inputs.get(j, 0)
                first = False
    return stats


def _fit(points: dict[int, dict], x: int) -> dict:
    """Each statistic at ``x``, interpolated from its values at the points' keys: exact
    for sizes linear in batch and quadratic in length (a length x length matrix)."""
    out = {}
    for key in set().union(*points.values()):
        out[key] = sum(value.get(key, 0) * math.prod((x - xk) / (xj - xk) for xk in points
                                                      if xk != xj)
                       for xj, value in points.items())
    return out


def sampled_activation_bytes(sample: nn.Module, groups: list[Group], num_blocks: int,
                             settings: Settings) -> list[int]:
    """Activations per group, scaled from a real CPU sample of the architecture with
    fewer blocks, measured at batch 2 and 3 and three short lengths (for models whose
    meta forward fails)."""
    batch, seq_len = settings.batch_size, settings.seq_len
    # Batch 1 is a special case for some models (Bloom's ALiBi broadcasts it).
    batches = (batch,) if batch <= 3 else (2, 3)
    lengths = (seq_len,) if seq_len <= max(SAMPLE_LENGTHS) else SAMPLE_LENGTHS
    shapes = [_block_states({u.parent or u.name for u in g.units}, num_blocks) for g in groups]
    needed = {flags for flags, _ in shapes}
    units = {u.name: u for u in find_units(sample)}
    stats = _fit({b: _fit({n: _sample_stats(sample, units, b, n, settings.causal, needed,
                                            settings.loss_chunk)
                           for n in lengths}, seq_len) for b in batches}, batch)
    result = []
    for flags, states in shapes:
        parts, inputs, first = [], 0, True
        for state in states:
            if state is not None:
                key = ("first", state) if first or ("own", state) not in stats else ("own", state)
                parts.append(stats[key])
                inputs += stats[("input", state)] if stats[key] else 0
                first = False
        outside = stats[("outside", flags)]
        total = (outside + inputs + max(parts, default=0) if settings.checkpointing
                 else outside + sum(parts))
        result.append(round(total))
    return result


def sampled_or_fail(inp: EstimateInput, sample: nn.Module | None, model: nn.Module,
                     groups: list[Group], settings: Settings, error: Exception,
                     announce: bool = True) -> list[int]:
    """Activations from the CPU sample, for a model whose meta forward pass failed."""
    def reason(e: Exception) -> str:  # the first sentence: torch's can run for lines
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].split('. ')[0]}"

    if announce:
        log.info(f"the meta forward pass of {type(model).__name__} failed ({reason(error)});"
                 f" measuring activations on a {SAMPLE_BLOCKS}-block CPU sample")
    try:
        sample = sample if sample is not None else sample_model(inp)
        return sampled_activation_bytes(sample, groups, len(block_stack(model)[1]), settings)
    except Exception as e:
        raise ConfigError(f"cannot estimate the activations of {type(model).__name__}: its"
                          f" forward pass fails on meta tensors ({reason(error)}) and on a"
                          f" CPU sample ({reason(e)})") from None
