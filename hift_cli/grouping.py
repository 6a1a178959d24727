"""Split a model into HiFT units and groups, and order the groups per cycle.

A *unit* is the embeddings, one transformer block, or the final norm + head. Units are
found from the model's structure, never its name: the blocks are the largest stack of
same-class modules in an ``nn.ModuleList``; every other parameter-owning module goes to
the embeddings unit if it runs before the first block in a forward pass, else to the head
unit. A tied weight (embeddings = LM head) belongs to the unit that uses it first.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from hift_cli.config import ConfigError


@dataclass
class Unit:
    name: str  # "embeddings", "block.3", "head"
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


@dataclass
class Group:
    index: int
    units: list[Unit]

    @functools.cached_property
    def params(self) -> dict[str, nn.Parameter]:
        # Read several times per training step; units do not change after grouping.
        return {n: p for u in self.units for n, p in u.params.items()}

    @functools.cached_property
    def numel(self) -> int:  # read at every training step
        return sum(u.numel for u in self.units)

    @property
    def name(self) -> str:
        names = [u.name for u in self.units]
        return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the homogeneous stack with most parameters."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            numel = sum(p.numel() for p in module.parameters())
            if len(classes) == 1 and numel > 0:
                candidates.append((numel, name, module))
    if not candidates:
        raise ConfigError(
            f"cannot split {type(model).__name__} into units: no stack of transformer blocks"
            " (nn.ModuleList of identical layers) found"
        )
    candidates.sort(key=lambda c: -c[0])
    numel, name, stack = candidates[0]
    # A second, unrelated stack of similar size (encoder + decoder) has no single order.
    for other_numel, other_name, _ in candidates[1:]:
        nested = other_name.startswith(name + ".") or name.startswith(other_name + ".")
        if not nested and other_numel >= 0.25 * numel:
            raise ConfigError(
                f"cannot split {type(model).__name__} into units: two block stacks"
                f" ({name}, {other_name}); hift supports decoder-only and encoder models"
            )
    return name, stack


class ForwardPassError(ConfigError):
    """The 2-token pass failed: on a meta model the memory estimate retries on a sample."""


def _forward_order(model: nn.Module, stack: nn.ModuleList) -> list[nn.Module]:
    """Modules that own parameters directly, in the order a forward pass first calls them.

    One tiny no-grad forward pass (2 tokens) is the cheapest structural way to tell a
    final norm from an embedding norm: registration order lies for some models (OPT
    registers its final layer norm before its layers). It also runs on the meta device,
    so a 7B model can be split without its weights.
    """
    order: list[nn.Module] = []
    seen: set[int] = set()

    def record(module, *_):
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_pre_hook(record) for m in owners]
    hooks += [b.register_forward_pre_hook(record) for b in stack]
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # No attention mask: mask helpers call .item(), which meta tensors refuse.
            model(input_ids=ids)
    except Exception as e:
        raise ForwardPassError(
            f"cannot split {type(model).__name__} into units: a 2-token forward pass failed"
            f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return order


def _order_by_name(model: nn.Module, reference: nn.Module) -> list[nn.Module]:
    """``model``'s modules in the forward order of ``reference``, the same architecture
    with fewer blocks: its modules have the same names."""
    names = {id(m): n for n, m in reference.named_modules()}
    modules = dict(model.named_modules())
    order = _forward_order(reference, block_stack(reference)[1])
    return [modules[names[id(m)]] for m in order if names[id(m)] in modules]


def find_units(model: nn.Module, reference: nn.Module | None = None) -> list[Unit]:
    """Split ``model`` into units, bottom (embeddings) to top (head).

    Every trainable parameter lands in exactly one unit. ``reference`` (a real copy of
    the architecture with fewer blocks) runs the forward pass instead of ``model``, for
    meta models whose forward pass fails on meta tensors.
    """
    stack_name, stack = block_stack(model)
    order = _forward_order(model, stack) if reference is None else _order_by_name(model, reference)
    block_ids = {id(b): i for i, b in enumerate(stack)}
    embeddings, head = Unit("embeddings"), Unit("head")
    blocks = [Unit(f"block.{i}") for i in range(len(stack))]

    # Names as named_parameters() gives them (first name of a tied weight).
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    owner_unit: dict[int, Unit] = {}
    for i, block in enumerate(stack):
        for p in block.parameters():
            owner_unit.setdefault(id(p), blocks[i])
    first_block_seen = False
    for module in order:
        if id(module) in block_ids:
            first_block_seen = True
            continue
        unit = head if first_block_seen else embeddings
        for p in module.parameters(recurse=False):
            owner_unit.setdefault(id(p), unit)
    # Parameters the forward pass never touched (e.g. an unused pooler) go to the head.
    units = [embeddings, *blocks, head]
    for pid, (name, p) in params.items():
        owner_unit.get(pid, head).params[name] = p
    return [u for u in units if u.params]


def split_always_active(units: list[Unit], names) -> tuple[list[Unit], list[Unit]]:
    """``(always, rest)``: the units named in ``hift.always_active`` (trained at every
    step) and the others, which the k groups are made of; both in forward order."""
    names = list(dict.fromkeys(names))
    known = [u.name for u in units]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"hift.always_active: no unit {unknown[0]!r} in this model (units:"
                          f" {', '.join(known)})")
    always = [u for u in units if u.name in names]
    rest = [u for u in units if u.name not in names]
    if not rest:
        raise ConfigError("hift.always_active names every unit: that is full fine-tuning"
                          " (hift.strategy=fpft)")
    return always, rest


def make_groups(units: list[Unit], strategy: str, k: int | None, m: int | None,
                grouping: str | None = None) -> list[Group]:
    """Partition units (bottom to top) into contiguous groups.

    ``m`` gives groups of m units from the bottom (the last may be smaller); ``k`` gives k
    groups: ``contiguous`` (the default) sizes them in units, differing by at most one;
    ``balanced`` minimises the largest group's parameters (:func:`balanced_sizes`).
    ``fpft`` is a single group of everything.
    """
    n = len(units)
    if strategy == "fpft":
        return [Group(0, list(units))]
    if k is not None:
        if k > n:
            raise ConfigError(
                f"hift.k={k} but the model has only {n} units"
                f" (embeddings, {n - 2} blocks, head); use hift.k <= {n}"
            )
        if grouping == "balanced":
            sizes = balanced_sizes([u.numel for u in units], k)
        else:
            sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    else:
        assert m is not None
        if m > n:
            raise ConfigError(f"hift.m={m} but the model has only {n} units; use hift.m <= {n}")
        sizes = [m] * (n // m) + ([n % m] if n % m else [])
    groups, start = [], 0
    for i, size in enumerate(sizes):
        groups.append(Group(i, units[start : start + size]))
        start += size
    return groups


def balanced_sizes(sizes: list[int], k: int) -> list[int]:
    """Units per group of the k contiguous groups (bottom to top) whose largest sum of
    ``sizes`` is the smallest possible (the linear partition problem; exact).

    Binary search on that largest sum, each candidate checked greedily. Among the optimal
    partitions, the top groups are filled first: the bottom groups, whose activations span
    the most layers, get what is left.
    """
    n = len(sizes)
    assert 1 <= k <= n

    def groups_needed(cap: int) -> int:
        count, total = 1, 0
        for s in sizes:
            if total + s > cap:
                count, total = count + 1, 0
            total += s
        return count

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if groups_needed(mid) <= k:
            hi = mid
        else:
            lo = mid + 1
    # Fill from the top, leaving at least one unit for each group still to come.
    counts: list[int] = []
    total, count = 0, 0
    for i in range(n - 1, -1, -1):
        left_groups = k - len(counts) - 1  # groups below the current one
        if count and (total + sizes[i] > lo or i + 1 == left_groups):
            counts.append(count)
            total, count = 0, 0
        total += sizes[i]
        count += 1
    counts.append(count)
    return counts[::-1]


class GroupSchedule:
    """Which group trains at each step.

    Step ``t`` is position ``t % k`` of cycle ``t // k``. ``random`` draws a fresh
    permutation per cycle from ``(seed, cycle)`` alone, so any step's group can be
    recomputed (resume needs no saved order).
    """

    def __init__(self, strategy: str, num_groups: int, seed: int):
        self.strategy = strategy
        self.num_groups = num_groups
        self.seed = seed

    def order(self, cycle: int) -> list[int]:
        k = self.num_groups
        if self.strategy == "top2down":
            return list(reversed(range(k)))
        if self.strategy == "random":
            perm = list(range(k))
            random.Random(self.seed * 1_000_003 + cycle).shuffle(perm)
            return perm
        return list(range(k))  # bottom2up, fpft

    def group_at(self, step: int) -> int:
        cycle, pos = divmod(step, self.num_groups)
        return self.order(cycle)[pos]

    def num_cycles(self, max_steps: int) -> int:
        return math.ceil(max_steps / self.num_groups)

    def ends_cycle(self, step: int) -> bool:
        return (step + 1) % self.num_groups == 0
