"""Per-group state store: inactive groups' optimizer state (and fp32 masters) in host memory.

Only the active group's state has to be on the GPU. After a group's update its state goes
back to pinned host memory (device-to-host on a side stream, non-blocking); the next
group's state comes in (host-to-device on the same side stream) while the current step's
forward and backward run. Both directions share one side stream, so a slot is never
refilled before its previous contents have left, and two reused device slots (the active
group's and the next one's) mean no allocate/free churn once every group has state.

The store is optimizer-agnostic: a group's "state" is every tensor in
``optimizer.state[p]`` that lives on the training device, plus ``p.data`` itself for
fp32 master parameters. Tensors are packed into one flat buffer per dtype per group and
the optimizer's references are rebound to views of whichever copy is current.

On the CPU (and with ``hift.offload=false``) the engine makes the same calls and the store
does nothing. ``hift.offload=true`` on a CPU still runs the copy-and-rebind path, with
plain copies instead of streams: the tests use that to check offload changes no numbers.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass
class _Layout:
    # Where each moved tensor lives in the group's flat per-dtype buffers:
    # handle (param, state key or None for p.data) -> (dtype, offset, shape).
    entries: dict[tuple[torch.Tensor, str | None], tuple[torch.dtype, int, torch.Size]]
    numel: dict[torch.dtype, int]


@dataclass
class TransferStats:
    stall_seconds: float = 0.0
    h2d_bytes: int = 0
    d2h_bytes: int = 0


class GroupStateStore:
    """Moves per-group optimizer state between host and device.

    Args:
        optimizer: the optimizer holding every group's parameters.
        group_params: per group, the parameters the optimizer updates (fp32 masters in
            ``bf16-mixed``, else the model's own parameters).
        device: the training device.
        enabled: False makes every method a no-op.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group_params: list[list[torch.Tensor]],
                 device: torch.device, enabled: bool, masters: bool = False):
        self.optimizer = optimizer
        self.group_params = group_params
        self.device = device
        self.enabled = enabled
        self.masters = masters  # move p.data too (fp32 masters live off the device)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if (enabled and self.cuda) else None
        self.layouts: dict[int, _Layout] = {}
        self.host: dict[int, dict[torch.dtype, torch.Tensor]] = {}
        self.slots: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]
        self.slot_owner: list[int | None] = [None, None]
        # Groups whose live state is on the device: slot index, or None for state the
        # optimizer just created outside any slot and that stays for a repeated turn.
        self.resident: dict[int, int | None] = {}
        self.ready: dict[int, torch.cuda.Event] = {}
        self.stats = TransferStats()
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    # ------------------------------------------------------------------ layout
    def _handles(self, g: int) -> list[tuple[torch.Tensor, str | None]]:
        """What group g moves: masters' data, and every non-scalar optimizer state tensor
        (scalar step counters stay where the optimizer keeps them)."""
        handles = []
        for p in self.group_params[g]:
            if self.masters:
                handles.append((p, None))
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    handles.append((p, key))
        return handles

    def _get(self, handle: tuple[torch.Tensor, str | None]) -> torch.Tensor:
        p, key = handle
        return p.data if key is None else self.optimizer.state[p][key]

    def _adopt(self, g: int) -> None:
        """Build group g's layout and host buffers from its live tensors.

        Runs when the store first sees a group, and once more after the group's first
        update has created its optimizer state; bindings are left as they are.
        """
        entries, numel = {}, {}
        for handle in self._handles(g):
            t = self._get(handle)
            off = numel.get(t.dtype, 0)
            entries[handle] = (t.dtype, off, t.shape)
            numel[t.dtype] = off + t.numel()
        self.layouts[g] = _Layout(entries, numel)
        self.host[g] = {dt: torch.empty(n, dtype=dt, pin_memory=self.cuda)
                        for dt, n in numel.items()}

    def _bind(self, g: int, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        for (p, key), (dtype, off, shape) in self.layouts[g].entries.items():
            view = buffers[dtype][off: off + shape.numel()].view(shape)
            if key is None:
                p.data = view
            else:
                self.optimizer.state[p][key] = view

    # ------------------------------------------------------------------ moves
    def prefetch(self, g: int) -> None:
        """Start copying group g's state to the device (no-op if already there)."""
        if not self.enabled or g not in self.layouts or g in self.resident:
            return
        index = self.slot_owner.index(None)
        slot = self.slots[index]
        start = time.perf_counter()
        with self._side():
            for dtype, host in self.host[g].items():
                if dtype not in slot or slot[dtype].numel() < host.numel():
                    # Sized for the largest group known so far: grows only while the
                    # first cycle is still creating optimizer state.
                    need = max(layout.numel.get(dtype, 0) for layout in self.layouts.values())
                    slot[dtype] = torch.empty(need, dtype=dtype, device=self.device)
                slot[dtype][: host.numel()].copy_(host, non_blocking=True)
                self.stats.h2d_bytes += host.numel() * host.element_size()
            if self.cuda:
                self.ready[g] = torch.cuda.Event()
                self.ready[g].record(self.stream)
        if not self.cuda:
            self.stats.stall_seconds += time.perf_counter() - start
        self._bind(g, slot)  # safe early: only the optimizer reads them, after wait(g)
        self.slot_owner[index] = g
        self.resident[g] = index

    def wait(self, g: int) -> None:
        """Before group g's update: make sure its state has arrived on the device."""
        if not self.enabled or g not in self.layouts:
            return
        if g not in self.resident:
            self.prefetch(g)  # nothing prefetched it (first step): fetch now, and stall
        if self.cuda and g in self.ready:
            compute = torch.cuda.current_stream(self.device)
            arrive = torch.cuda.Event(enable_timing=True)
            resume = torch.cuda.Event(enable_timing=True)
            arrive.record(compute)
            compute.wait_event(self.ready.pop(g))
            resume.record(compute)
            self._stall_events.append((arrive, resume))

    def offload(self, g: int, keep: bool = False) -> None:
        """After group g's update (or at setup, for masters): send its state to the host.

        Args:
            keep: the next step trains g again (a random order repeating a group across
                a cycle boundary): leave it on the device.
        """
        if not self.enabled:
            return
        if g not in self.layouts or set(self.layouts[g].entries) != set(self._handles(g)):
            self._adopt(g)  # new optimizer state appeared with this update (one-time)
        if keep:
            self.resident.setdefault(g, None)  # the live tensors stay the truth
            return
        layout = self.layouts[g]
        start = time.perf_counter()
        with self._side(wait_for_compute=True):
            for handle, (dtype, off, shape) in layout.entries.items():
                t = self._get(handle)
                self.host[g][dtype][off: off + t.numel()].copy_(t.reshape(-1), non_blocking=True)
                self.stats.d2h_bytes += t.numel() * t.element_size()
                if self.cuda and t.is_cuda:
                    t.record_stream(self.stream)  # keep its memory until the copy is done
        if not self.cuda:
            self.stats.stall_seconds += time.perf_counter() - start
        self._bind(g, self.host[g])
        index = self.resident.pop(g, None)
        if index is not None:
            self.slot_owner[index] = None

    def _side(self, wait_for_compute: bool = False):
        if not self.cuda:
            return contextlib.nullcontext()
        if wait_for_compute:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget every layout (after optimizer state was replaced, e.g. on resume);
        the device slots are kept for reuse."""
        self.synchronize()
        self.layouts.clear()
        self.host.clear()
        self.resident.clear()
        self.ready.clear()
        self.slot_owner = [None, None]

    def synchronize(self) -> None:
        """Wait for every transfer (before reading host copies, e.g. to save them)."""
        if self.stream is not None:
            self.stream.synchronize()

    def take_stats(self) -> TransferStats:
        """Transfer statistics since the last call (reads finished CUDA timing events)."""
        if self._stall_events:
            torch.cuda.current_stream(self.device).synchronize()
            for arrive, resume in self._stall_events:
                self.stats.stall_seconds += arrive.elapsed_time(resume) / 1000.0
            self._stall_events.clear()
        stats, self.stats = self.stats, TransferStats()
        return stats

    def device_bytes(self) -> int:
        """Bytes held by the device slots: the store's whole device footprint."""
        return sum(b.numel() * b.element_size() for slot in self.slots for b in slot.values())
