"""The arithmetic: each group's row of device bytes (weights, gradients, optimizer states,
fp32 masters, activations, other) for one config, from the counts of counting.py and
activations.py (or sample.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from hift_cli.config import Config
from hift_cli.grouping import (ForwardPassError, Group, GroupSchedule, Piece, Unit, find_units,
                               make_groups, plan_units, row_gradients)
from hift_cli.loss import chunk_tokens, chunkable
from hift_cli.memory import activations
from hift_cli.memory.activations import counting_kernels
from hift_cli.memory.counting import (Settings, fsdp_shard, meta_model, optimizer_state_bytes,
                                      sample_model, update_temporaries)
from hift_cli.memory.inputs import EstimateInput, as_input
from hift_cli.memory.sample import sampled_or_fail
from hift_cli.offload import offload_enabled


@dataclasses.dataclass
class Row:
    """One group's device bytes at its peak (per GPU), each term by its name. The report's
    categories add some of them up: :meth:`as_dict`."""

    group: str
    params: int  # the group's parameters
    weights: int  # every parameter's weights this GPU keeps (its shards when sharded)
    gathered_weights: int  # sharded: the full weights of the units FSDP2 holds at once
    gradients: int  # the active group's and always-active units' gradients
    unsharded_gradient: int  # sharded: the largest active unit's before its reduce-scatter
    optimizer_states: int
    fp32_masters: int
    activations: int
    prefetch_slot: int  # offload: the store's other slot, the next group's state
    update_temporaries: int  # what the optimizer step allocates for a moment
    moved: int  # offload: the bytes a switch to (and away from) this group copies each way
    sharded: bool = False

    @property
    def other(self) -> int:
        """The other slot, and the update's temporaries where they outgrow the activations
        (freed by then): the peak is one or the other."""
        return self.prefetch_slot + max(self.update_temporaries - self.activations, 0)

    @property
    def total(self) -> int:
        """The peak: every category (``CATEGORIES``), so every term once."""
        return (self.weights + self.gathered_weights + self.gradients + self.unsharded_gradient
                + self.optimizer_states + self.fp32_masters + self.activations + self.other)

    def as_dict(self) -> dict:
        """The report's row: the categories (weights with the gathered ones, gradients with
        the unsharded one), the total and the named terms."""
        row = {"group": self.group,
               "weights": self.weights + self.gathered_weights,
               "gradients": self.gradients + self.unsharded_gradient,
               "optimizer_states": self.optimizer_states, "fp32_masters": self.fp32_masters,
               "activations": self.activations, "other": self.other}
        if self.sharded:
            row.update(gathered_weights=self.gathered_weights,
                       unsharded_gradient=self.unsharded_gradient)
        row["total"] = self.total
        row.update(prefetch_slot=self.prefetch_slot, update_temporaries=self.update_temporaries,
                   params=self.params, moved=self.moved)
        return row


class Estimator:
    """The estimate's pieces for one config, built once: the meta model, its units (and the
    always-active ones, which the groups leave), every parameter's optimizer-state bytes.
    Rows for any grouping of the units come without a forward pass but for activations,
    which are memoised per (batch, active units): a k scan repeats no pass."""

    def __init__(self, source: Config | EstimateInput):
        self.input = inp = as_input(source)
        self.settings = Settings.of(inp)
        self.model = meta_model(inp)
        self.sample: nn.Module | None = None
        self.methods = {"unit_split_method": "meta", "activation_method": "meta"}
        try:
            with counting_kernels():
                self.units = find_units(self.model)
        except ForwardPassError:
            self.sample = sample_model(inp)
            self.units = find_units(self.model, reference=self.sample)
            self.methods["unit_split_method"] = "cpu-sample"
        # What one GPU keeps of each unit (memprofile.world_size > 1: sharded with FSDP2).
        self.world_size = inp.world_size
        # The engine's units: hift.always_active's, and the rest with units over
        # hift.max_unit_params cut into sub-units (not when sharded), in forward order.
        order = {u.name: i for i, u in enumerate(self.units)}
        self.always, self.rest = plan_units(self.units, inp.hift, self.world_size > 1)
        self.units = sorted([*self.always, *self.rest], key=lambda u: order[u.parent or u.name])
        all_params = list({id(p): p for u in self.units for p in u.params.values()}.values())
        self.total_numel = sum(p.numel() for p in all_params)
        self.states = optimizer_state_bytes(inp.optimizer, all_params,
                                            self.settings.state_dtype)
        # What the update allocates for a moment (after backward: activations are gone).
        self.update_temps = update_temporaries(inp.optimizer, self.settings.state_dtype,
                                               multi_tensor=inp.device_type != "cpu")
        self._piece_states: dict[tuple, int] = {}
        self.master_bytes = 4 if self.settings.mixed else 0
        self.shard = {u.name: fsdp_shard(u.params.values(), self.states, self.world_size)
                      for u in self.units}
        # The engine's loss: chunked where the model allows; and the parameters whose
        # sub-units get gradients for their rows only (embeddings, the chunked head).
        self.settings = dataclasses.replace(self.settings, loss_chunk=self._loss_chunk())
        head = self.model.get_output_embeddings() if self.settings.loss_chunk else None
        self.routable = row_gradients(self.model, head)
        self.passes = 0  # activation passes run (meta, or sampled groups)
        self._acts: dict[tuple, int] = {}
        self._meta_error: Exception | None = None

    def _loss_chunk(self) -> int | None:
        """Tokens per chunk of the engine's chunked loss for this model, or None (plain)."""
        inp = self.input
        vocab = getattr(self.model.config, "vocab_size", None)
        if inp.task != "causal_lm" or not vocab:
            return None
        chunk = chunk_tokens(inp.loss_chunk_tokens, vocab)
        if chunk is None:
            return None
        try:
            with counting_kernels():
                ok = chunkable(self.model)
        except Exception:  # a meta forward that reads values: ask the CPU sample
            if self.sample is None:
                self.sample = sample_model(inp)
            ok = chunkable(self.sample)
        return chunk if ok else None

    def piece_state(self, piece: Piece) -> int:
        """Optimizer-state bytes of the tensor the optimizer updates for ``piece``."""
        if piece.whole:
            return self.states[id(piece.param)]
        shape = piece.shape
        if shape not in self._piece_states:
            probe = torch.empty(shape, device="meta")
            self._piece_states[shape] = optimizer_state_bytes(
                self.input.optimizer, [probe], self.settings.state_dtype)[id(probe)]
        return self._piece_states[shape]

    def gradient_bytes(self, pieces: list[Piece]) -> int:
        """Gradients while ``pieces`` train: each piece's (fp32 on the masters in
        bf16-mixed); a sub-unit whose parameter cannot give its rows alone costs the
        parameter's whole dense gradient (in bf16-mixed, beside its rows' fp32 one)."""
        mb, wb = self.master_bytes, self.settings.weight_bytes
        total = 0
        for pc in pieces:
            dense = pc.param.numel() * wb if (not pc.whole and id(pc.param)
                                              not in self.routable) else 0
            # bf16-mixed: fp32 rows beside a dense bf16 gradient; else the rows are a view
            # of the dense gradient, or the gradient itself.
            total += pc.numel * mb + dense if mb else (dense or pc.numel * wb)
        return total

    def groups(self, k: int | None, m: int | None = None,
               grouping: str | None = None) -> list[Group]:
        """HiFT groups of the units that are not always active."""
        return make_groups(self.rest, "bottom2up", k, m, grouping)

    def offload(self, num_groups: int) -> bool:
        """The engine's rule (e.g. no offload with k <= 2); estimates are for the GPU you
        train on unless trainer.device=cpu."""
        return offload_enabled(self.input, self.input.device_type, num_groups)[0]

    def active_units(self, group: Group) -> list[Unit]:
        """What requires grad while ``group`` trains: it and the always-active units."""
        names = {u.name for u in (*self.always, *group.units)}
        return [u for u in self.units if u.name in names]

    def activations(self, unit_lists: list[list[Unit]], batch: int | None = None) -> list[int]:
        """Activation bytes while each list of units is active (memoised)."""
        settings = (self.settings if batch is None
                    else dataclasses.replace(self.settings, batch_size=batch))
        keys = [(settings.batch_size, tuple(u.name for u in units)) for units in unit_lists]
        todo = {key: units for key, units in zip(keys, unit_lists) if key not in self._acts}
        if todo:
            groups = [Group(i, units) for i, units in enumerate(todo.values())]
            acts = None
            if self._meta_error is None:
                try:
                    acts = activations.activation_bytes(self.model, groups, settings)
                except Exception as e:  # code that reads tensor values: .item(), nonzero()
                    self._meta_error = e
                    self.methods["activation_method"] = "cpu-sample-scaled"
                    announce = True
            else:
                announce = False
            if acts is None:
                if self.sample is None:
                    with contextlib.suppress(Exception):  # else sampled_or_fail says why
                        self.sample = sample_model(self.input)
                acts = sampled_or_fail(self.input, self.sample, self.model, groups, settings,
                                        self._meta_error, announce)
            self.passes += len(groups)
            self._acts.update(zip(todo, acts))
        return [self._acts[key] for key in keys]

    def gathered_units(self) -> list[Unit]:
        """The units whose full weights FSDP2 holds at once at most, as the engine wraps
        them (``distributed.shard_model``): the root (every unit that is not a block:
        embeddings, final norm, head), gathered for the whole step, plus the running
        block and the next one, prefetched (bounded by the two largest blocks)."""
        blocks = [u for u in self.units if u.name.startswith("block.")]
        root = [u for u in self.units if not u.name.startswith("block.")]
        return root + sorted(blocks, key=lambda u: -u.numel)[:2]

    def rows(self, groups: list[Group], offload: bool, acts: list[int] | None = None,
             always: bool = True) -> list[Row]:
        """Each group's row, per GPU; activations 0 where ``acts`` is None (a lower bound).

        Sizes are what one GPU keeps (``self.shard``: all of it with world_size=1). With
        world_size > 1 two more terms: the full weights of the gathered units, and the
        full gradient of the largest active unit before its reduce-scatter.
        """
        mb, wb = self.master_bytes, self.settings.weight_bytes
        sharded = self.world_size > 1
        always_units = self.always if always else []
        always_pieces = [pc for u in always_units for pc in u.pieces]

        def kept(pieces) -> tuple[int, int]:  # (elements, optimizer-state bytes) on this GPU
            if sharded:  # nothing is cut into sub-units: whole parameters
                return fsdp_shard([pc.param for pc in pieces], self.states, self.world_size)
            return sum(pc.numel for pc in pieces), sum(self.piece_state(pc) for pc in pieces)

        # What the optimizer holds: every group's pieces (a unit's sub-units in one group
        # are one tensor) and the always-active units'.
        all_numel, all_states = kept([pc for g in groups for pc in g.pieces] + always_pieces)
        # Always-active units' state and masters stay on the device, outside the slots.
        always_numel, always_states = kept(always_pieces)
        gathered = sum(u.numel for u in self.gathered_units()) * wb if sharded else 0
        kept_by_group = [kept(g.pieces) for g in groups]
        # The store's device slots hold the active group and the next one, at the two ends
        # of one buffer as large as the largest pair that can follow each other.
        own = [s + n * mb for n, s in kept_by_group]
        pairs = GroupSchedule(self.input.hift.strategy, len(groups), 0).pairs()
        slots = max([own[a] + own[b] for a, b in pairs] + own)
        a, b, c = self.update_temps
        rows = []
        for i, (g, (g_numel, g_states)) in enumerate(zip(groups, kept_by_group)):
            numel = g_numel + always_numel
            unsharded_grad = (max(u.numel for u in (*g.units, *always_units)) * wb
                              if sharded else 0)
            act = acts[i] if acts is not None else 0
            sizes = sorted((pc.numel for pc in [*g.pieces, *always_pieces]), reverse=True)
            largest, second = (sizes + [0])[:2]
            if sharded:  # each rank updates its shard
                largest, second = (math.ceil(n / self.world_size) for n in (largest, second))
            temps = int((a * numel + b * largest + c * second)
                        * self.settings.state_dtype.itemsize)
            rows.append(Row(
                group=g.name, params=g.numel, weights=all_numel * wb, gathered_weights=gathered,
                # bf16-mixed: the group's bf16 grads become fp32 grads on its masters,
                # one parameter at a time, so the fp32 ones set the peak.
                gradients=(numel * (mb or wb) if sharded
                           else self.gradient_bytes([*g.pieces, *always_pieces])),
                unsharded_gradient=unsharded_grad,
                optimizer_states=g_states + always_states if offload else all_states,
                fp32_masters=(numel if offload else all_numel) * mb, activations=act,
                prefetch_slot=slots - own[i] if offload else 0, update_temporaries=temps,
                moved=own[i] if offload else 0, sharded=sharded))
        return rows

    def evaluate(self, groups: list[Group], offload: bool, budget: float | None = None,
                 batch: int | None = None) -> list[Row] | None:
        """Every group's row; with a ``budget`` (bytes), None as soon as one group is
        over it, trying first the groups without activations over it (no pass), then the
        bottom group (activations spanning the most layers), then the others."""
        static = self.rows(groups, offload)
        if budget is not None:
            if max(r.total for r in static) > budget:
                return None
            for i in [0, *sorted(range(1, len(groups)), key=lambda i: -static[i].total)]:
                (act,) = self.activations([self.active_units(groups[i])], batch)
                # static holds the update's temporaries; the peak, the larger of the two
                if static[i].total + max(act - static[i].update_temporaries, 0) > budget:
                    return None
        acts = self.activations([self.active_units(g) for g in groups], batch)
        return self.rows(groups, offload, acts)

    def fpft(self) -> Row:
        acts = self.activations([self.units])
        return self.rows([Group(0, list(self.units))], False, acts, always=False)[0]
