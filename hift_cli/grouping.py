"""Split a model into HiFT units and groups, and order the groups per cycle.

A *unit* is the embeddings, one transformer block, or the final norm + head. Units are
found from the model's structure, never its name: the blocks are the largest stack of
same-class modules in an ``nn.ModuleList``; every other parameter-owning module goes to
the embeddings unit if it runs before the first block in a forward pass, else to the head
unit. A tied weight (embeddings = LM head) belongs to the unit that uses it first.

A unit larger than ``hift.max_unit_params`` (by default the largest block: a 128k-token
vocabulary makes Llama-3-8B's embeddings 2.4 blocks) is cut into *sub-units* along the
first dimension of its matrices (:func:`split_units`): ``embeddings.0`` holds vocabulary
rows 0..n, ``embeddings.1`` the next ones, and so on. The model itself is untouched; what a
group trains of each parameter is a :class:`Piece` (all of it, or a range of its rows).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from hift_cli.config import ConfigError


@dataclass(frozen=True)
class Piece:
    """What a unit or group trains of one parameter: rows ``[start, stop)`` of its first
    dimension, or all of it (``whole``)."""

    name: str
    param: nn.Parameter
    start: int
    stop: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == (self.param.shape[0] if self.param.dim() else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape) if self.whole else (self.stop - self.start,
                                                           *self.param.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """This piece's rows of ``t`` (a tensor shaped like the parameter): a view."""
        return t if self.whole else t[self.start:self.stop]


def whole(name: str, p: nn.Parameter) -> Piece:
    return Piece(name, p, 0, p.shape[0] if p.dim() else 1)


def merge_pieces(pieces) -> list[Piece]:
    """Adjacent row ranges of the same parameter as one piece (the optimizer then sees one
    tensor: all of a split unit's sub-units in one group train exactly as the unit)."""
    out: list[Piece] = []
    for piece in pieces:
        last = out[-1] if out else None
        if last is not None and last.param is piece.param and last.stop == piece.start:
            out[-1] = Piece(last.name, last.param, last.start, piece.stop)
        else:
            out.append(piece)
    return out


@dataclass
class Unit:
    name: str  # "embeddings", "block.3", "head"; a sub-unit: "embeddings.1"
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    # Sub-units: the parameters of which it holds only rows [start, stop).
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    parent: str | None = None  # a sub-unit's unit

    @property
    def pieces(self) -> list[Piece]:
        return [Piece(n, p, *self.rows[n]) if n in self.rows else whole(n, p)
                for n, p in self.params.items()]

    @property
    def numel(self) -> int:
        return sum(piece.numel for piece in self.pieces)


@dataclass
class Group:
    index: int
    units: list[Unit]

    @functools.cached_property
    def params(self) -> dict[str, nn.Parameter]:
        """The model parameters it trains (all or part of each); read at every step."""
        return {n: p for u in self.units for n, p in u.params.items()}

    @functools.cached_property
    def pieces(self) -> list[Piece]:
        """What the optimizer updates for this group: sub-units' adjacent rows merged."""
        return merge_pieces(piece for u in self.units for piece in u.pieces)

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


def split_units(units: list[Unit], max_params: int | None) -> list[Unit]:
    """Units over ``max_params`` parameters cut into the fewest sub-units of at most about
    that many (a matrix row over at most), in order.

    A unit's parameters are laid end to end, matrices (2+ dims) by rows and vectors whole,
    and the sequence is cut into n = ceil(numel / max_params) near-equal parts at row
    boundaries; a matrix cut in the middle gives each side a row range. Vectors (a final
    norm) stay whole in the part they fall in.
    """
    if not max_params:
        return list(units)
    out: list[Unit] = []
    for unit in units:
        total = unit.numel
        n = math.ceil(total / max_params)
        if n <= 1 or unit.rows:
            out.append(unit)
            continue
        subs = [Unit(f"{unit.name}.{i}", parent=unit.name) for i in range(n)]
        i, done = 0, 0  # current sub-unit, elements placed so far

        def add(name, p, start, stop):
            sub = subs[i]
            sub.params[name] = p
            if (start, stop) != (0, p.shape[0]):
                sub.rows[name] = (start, stop)

        for name, p in unit.params.items():
            if p.dim() < 2:
                add(name, p, 0, p.shape[0] if p.dim() else 1)
                done += p.numel()
                continue
            row, start = p.numel() // p.shape[0], 0
            while start < p.shape[0]:
                boundary = total * (i + 1) / n  # where sub-unit i ends
                take = (p.shape[0] - start if i == n - 1 else
                        min(p.shape[0] - start, max(0, round((boundary - done) / row))))
                if take:
                    add(name, p, start, start + take)
                    start += take
                    done += take * row
                if i < n - 1 and (done >= boundary - row / 2 or not take):
                    i += 1
        out.extend(s for s in subs if s.params)
    return out


def row_gradients(model: nn.Module, head: nn.Module | None = None
                  ) -> dict[int, list[nn.Embedding]]:
    """Parameters whose gradient can come for some rows only, by ``id``, with the
    embedding modules that must then give sparse gradients: those used only by
    ``nn.Embedding`` modules and by ``head`` (the LM head of a chunked loss, which computes
    its rows' gradient itself). Others get a dense gradient that is then cut into rows."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    return {pid: [m for m in modules if isinstance(m, nn.Embedding)]
            for pid, modules in owners.items()
            if all(isinstance(m, nn.Embedding) or m is head for m in modules)}


def plan_units(units: list[Unit], hcfg, sharded: bool = False) -> tuple[list[Unit], list[Unit]]:
    """``(always, rest)`` for a run: ``hift.always_active``'s units, and the others, which
    the groups are made of, with those over ``hift.max_unit_params`` cut into sub-units
    (not for fpft, one group anyway, nor sharded weights, already 1/N per GPU)."""
    always, rest = (split_always_active(units, hcfg.always_active)
                    if hcfg.strategy != "fpft" and hcfg.always_active else ([], list(units)))
    if hcfg.strategy == "fpft" or sharded or hcfg.max_unit_params is None:
        return always, rest
    limit = largest_block(units) if hcfg.max_unit_params == "block" else hcfg.max_unit_params
    return always, split_units(rest, limit)


def largest_block(units: list[Unit]) -> int:
    """Parameters of the largest transformer block: ``hift.max_unit_params=block``."""
    return max((u.numel for u in units if u.name.startswith("block.") and u.parent is None),
               default=0)


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


def _listing(units: list[Unit]) -> str:
    """``embeddings, 3 blocks, head``: the units by kind, in order (sub-units counted)."""
    parts: list[list] = []
    for u in units:
        kind = "block" if u.name.startswith("block.") else (u.parent or u.name)
        if parts and parts[-1][0] == kind:
            parts[-1][1] += 1
        else:
            parts.append([kind, 1])
    return ", ".join(kind if count == 1 else f"{count} blocks" if kind == "block"
                     else f"{kind} ({count} sub-units)" for kind, count in parts)


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
                f"hift.k={k} but there are only {n} units to group"
                f" ({_listing(units)}); use hift.k <= {n}")
        if grouping == "balanced":
            sizes = balanced_sizes([u.numel for u in units], k)
        else:
            sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    else:
        assert m is not None
        if m > n:
            raise ConfigError(f"hift.m={m} but there are only {n} units to group"
                              f" ({_listing(units)}); use hift.m <= {n}")
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

    A group stays active for ``steps_per_group`` (K) consecutive steps; a cycle is
    ``num_groups`` x K steps. Step ``t`` is in cycle ``t // (k K)``, at position
    ``(t % (k K)) // K`` of its order. ``random`` draws a fresh permutation per cycle from
    ``(seed, cycle)`` alone, so any step's group can be recomputed (resume needs no saved
    order).
    """

    def __init__(self, strategy: str, num_groups: int, seed: int, steps_per_group: int = 1):
        self.strategy = strategy
        self.num_groups = num_groups
        self.seed = seed
        self.steps_per_group = steps_per_group

    @property
    def cycle_steps(self) -> int:
        """Steps in one cycle: every group active for its K steps."""
        return self.num_groups * self.steps_per_group

    def order(self, cycle: int) -> list[int]:
        k = self.num_groups
        if self.strategy == "top2down":
            return list(reversed(range(k)))
        if self.strategy == "random":
            perm = list(range(k))
            random.Random(self.seed * 1_000_003 + cycle).shuffle(perm)
            return perm
        return list(range(k))  # bottom2up, fpft

    def pairs(self) -> set[tuple[int, int]]:
        """The groups that can train at consecutive steps, as ``(a, b)`` with a != b: what
        the state store's two device slots can hold at once (random: any two)."""
        k = self.num_groups
        if self.strategy == "random":
            return {(a, b) for a in range(k) for b in range(k) if a != b}
        order = self.order(0)
        return {(order[i], order[(i + 1) % k]) for i in range(k) if k > 1}

    def cycle_of(self, step: int) -> int:
        return step // self.cycle_steps

    def group_at(self, step: int) -> int:
        cycle, at = divmod(step, self.cycle_steps)
        return self.order(cycle)[at // self.steps_per_group]

    def num_cycles(self, max_steps: int) -> int:
        return math.ceil(max_steps / self.cycle_steps)

    def ends_cycle(self, step: int) -> bool:
        return (step + 1) % self.cycle_steps == 0
