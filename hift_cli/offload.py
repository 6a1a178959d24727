"""Per-group state store: inactive groups' optimizer state (and fp32 masters) in host memory.

Only the active group's state has to be on the GPU. After a group's update its state goes
back to pinned host memory (device-to-host, non-blocking); the next group's state comes in
(host-to-device) while the current step's forward and backward run. Each direction has its
own copy stream, so the link carries both at once. The two device slots (the active
group's and the next one's) are the two ends of one reused buffer (the arena), as large as
the largest pair of groups that can follow each other: the device holds no more than those
two groups' state, with no allocate/free churn. With k <= 2 the two slots would hold every
group anyway, so offloading is turned off (copies that save nothing).

A group's write-back and the next group's fill share a slot's memory, so both are cut at
fixed boundaries of the arena (``chunk_bytes``, 64 MiB): the fill of a chunk waits only
for the write-back of that chunk (an event per chunk), and the two directions run side by
side, one chunk apart. A fill also waits for the write-back of its own group's host
buffers (an event per group), and new device memory is filled only after the compute
stream's earlier work.

The store is optimizer-agnostic: a group's "state" is every non-scalar tensor in
``optimizer.state[p]``, plus ``p.data`` itself for fp32 master parameters. Tensors are
packed into one flat buffer per dtype per group, and the optimizer's references point at
views of whichever copy is current: the device slot between :meth:`wait` and
:meth:`release` and its write-back, the host buffer otherwise.

Host memory is allocated once per group, at its exact size, in its final layout: the
state the optimizer will create is known in advance by stepping a fresh optimizer of the
same class on a meta tensor of each parameter shape. On CUDA the buffers are page-locked
with ``cudaHostRegister`` (not PyTorch's pinned caching allocator, which rounds each
request up to a power of two and keeps freed blocks: for LLaMA-7B that is ~165 GiB pinned
where 75 GiB is needed).

Tensors start at 256-byte boundaries of their buffers (CUDA kernels, reductions among
them, group work by alignment: a tensor must not compute differently for having moved).

Where it syncs: :meth:`wait` makes the compute stream wait for the group's copy (an event,
no host sync); :meth:`updating` wraps the group's update on the compute stream, which the
write-back then waits for; :meth:`synchronize` (before a checkpoint and at the end of
``train()``) waits for the copy streams on the host.

On the CPU (and with ``hift.offload=false``) the engine makes the same calls. With
``hift.offload=true`` on a CPU the copy-and-rebind path runs with plain copies. Strict
mode (``HIFT_STRICT_OFFLOAD=1``; the tests set it) runs the store on a model of the CUDA
streams (:class:`hift_cli.streams.StreamModel`): copies are queued and only happen when
something waits for them, and a copy or use of memory that nothing orders after the last
conflicting one raises :class:`~hift_cli.streams.StreamRace`. A group's tensors are also
unusable (bound to a poison tensor of the wrong size and dtype) from its write-back until
:meth:`wait`, so any use of state that has not arrived fails loudly.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from hift_cli.config import Config, optimizer_kind
from hift_cli.distributed import is_sharded, local, rebind_local, wrap_like
from hift_cli.streams import HOST, CudaStreams, NoStreams, StreamModel

log = logging.getLogger(__name__)

Handle = tuple[torch.Tensor, "str | None"]  # (parameter, state key or None for p.data)
ALIGN_BYTES = 256  # where each tensor starts in a flat buffer
CHUNK_BYTES = 64 * 2**20  # the arena's chunks: a fill waits for the write-back of its chunk


def offload_enabled(cfg: Config, device_type: str, num_groups: int) -> tuple[bool, str]:
    """Whether the store moves state, and why: the one rule for the engine and the
    estimate.

    Args:
        cfg: the run's config (``hift.offload``: None means on with CUDA, off on a CPU).
        device_type: the training device's type (``cuda``, ``cpu``).
        num_groups: number of HiFT groups.
    """
    requested = cfg.hift.offload
    if cfg.hift.strategy == "fpft":
        return False, "fpft: every parameter trains at every step"
    if requested is False:
        return False, "hift.offload=false"
    if requested is None and device_type != "cuda":
        return False, "no CUDA device"
    if num_groups <= 2:
        return False, (f"{num_groups} group(s): the two device slots would hold every group's"
                       " state anyway")
    if optimizer_kind(cfg.optimizer).paged:
        return False, "paged optimizer: CUDA pages its state itself"
    return True, "on"


def state_shapes(factory: Callable, shape: tuple, dtype: torch.dtype,
                 devices: tuple[str, ...] = ("meta", "cpu")
                 ) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The non-scalar state tensors ``factory([param])`` creates at its first step.

    Steps a fresh optimizer on a parameter of that shape, on the first device where the
    optimizer can step (meta costs nothing; CUDA-only optimizers need the training device).

    Raises:
        RuntimeError: no device worked.
    """
    errors = []
    for device in dict.fromkeys(devices):
        try:
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            p.grad = torch.zeros_like(p)
            opt = factory([p])
            opt.step()
            return {k: (v.shape, v.dtype) for k, v in opt.state[p].items()
                    if torch.is_tensor(v) and v.dim() > 0}
        except Exception as e:  # any optimizer, any failure: try the next device
            errors.append(f"{device}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise RuntimeError("; ".join(errors))


@dataclass
class _Layout:
    """Where each tensor of a group lives in its flat per-dtype buffers."""

    entries: dict = field(default_factory=dict)  # Handle -> (dtype, offset, shape)
    numel: dict = field(default_factory=dict)  # dtype -> elements
    masters_numel: dict = field(default_factory=dict)  # dtype -> elements of the masters prefix

    def add(self, handle: Handle, shape: torch.Size, dtype: torch.dtype) -> None:
        off = self.numel.get(dtype, 0)
        self.entries[handle] = (dtype, off, torch.Size(shape))
        step = max(1, ALIGN_BYTES // dtype.itemsize)  # the next tensor starts aligned
        self.numel[dtype] = -(-(off + shape.numel()) // step) * step
        if handle[1] is None:
            self.masters_numel[dtype] = self.numel[dtype]

    def matches(self, handle: Handle, t: torch.Tensor) -> bool:
        entry = self.entries.get(handle)
        return entry is not None and entry[0] == t.dtype and entry[2] == t.shape

    @property
    def nbytes(self) -> int:
        return sum(n * dt.itemsize for dt, n in self.numel.items())


@dataclass
class TransferStats:
    stall_seconds: float = 0.0
    h2d_bytes: int = 0
    d2h_bytes: int = 0


def _unregister(ptr: int) -> None:
    with contextlib.suppress(Exception):  # runs from a finalizer: must not raise
        torch.cuda.cudart().cudaHostUnregister(ptr)


def page_lock(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory where it is (``cudaHostRegister``); False if CUDA refused.

    A refusal leaves the CUDA runtime's last error set, which PyTorch's next kernel-launch
    check would raise as an unrelated error: it is reset here.

    Raises:
        RuntimeError: CUDA refused and its error could not be reset.
    """
    storage = t.untyped_storage()
    rc = int(torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0))
    if rc == 0:
        return True
    if not clear_cuda_error():
        raise RuntimeError(
            f"cudaHostRegister failed (CUDA error {rc}) and the error could not be reset (no"
            " libcudart found); set hift.offload=false to train without offloading")
    return False


def clear_cuda_error() -> bool:
    """Reset the CUDA runtime's last error (``cudaGetLastError``) through the libcudart
    this process loaded; False if none was found."""
    for name in _cudart_libraries():
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).cudaGetLastError()
            return True
    return False


def _cudart_libraries() -> list[str]:
    """The libcudart this process mapped (PyTorch's), then the usual names."""
    loaded = []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libcudart.so" in os.path.basename(path) and path not in loaded:
                    loaded.append(path)
    return loaded + ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]


@dataclass(frozen=True)
class Delays:
    """Race amplifiers (see :class:`GroupStateStore`): ``copy`` runs on a copy stream
    before each copy, ``update`` on the compute stream right before each update."""
    copy: Callable[[], None] | None = None
    update: Callable[[], None] | None = None


@dataclass(frozen=True)
class Footprint:
    """What a :class:`GroupStateStore` holds (:meth:`GroupStateStore.footprint`)."""
    device_bytes: int  # the device slots: the store's whole device footprint
    host_bytes: int  # the host buffers held now
    allocated_host_bytes: int  # every host buffer ever allocated (a re-layout allocates more)
    pinned: bool  # every host buffer page-locked (CUDA)
    writebacks: dict[str, int]  # write-backs so far: "flat" (a copy per dtype), "per_tensor"
    exact_host_bytes: int | None = None  # what the buffers should total (footprint(exact))


class GroupStateStore:
    """Moves per-group optimizer state between host and device.

    Args:
        optimizer: the optimizer holding every group's parameters.
        group_params: per group, the parameters the optimizer updates (fp32 masters in
            ``bf16-mixed``, else the model's own parameters).
        device: the training device.
        enabled: False makes every method a no-op.
        masters: move ``p.data`` too (fp32 masters live off the device).
        factory: builds a fresh optimizer of the same kind from a parameter list (to
            learn its state layout in advance); None: layouts are learnt at the first update.
        strict: simulate a GPU on the CPU (see the module docstring); None reads
            ``HIFT_STRICT_OFFLOAD``.
        pairs: the groups ``(a, b)`` that can train at consecutive steps (the slots hold
            one such pair at a time); None: any two.
        chunk_bytes: the arena's chunk (a fill waits for the write-back of its chunk).
        delays: race amplifiers (the GPU check's ``races`` stage; a debugging aid): run on a
            copy stream before each copy, and on the compute stream right before each
            update.

    The protocol, all a caller uses: :meth:`prefetch`, :meth:`wait`, :meth:`updating`,
    :meth:`release`, :meth:`flush`, :meth:`synchronize`, :meth:`readable`, :meth:`load`,
    :meth:`take_stats`, :meth:`footprint`, :meth:`holds`, :meth:`close`, and ``enabled``,
    ``strict``, ``pending`` (strict mode's queued copies).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group_params: list[list[torch.Tensor]],
                 device: torch.device, enabled: bool, masters: bool = False,
                 factory: Callable | None = None, strict: bool | None = None,
                 pairs: set[tuple[int, int]] | None = None, chunk_bytes: int = CHUNK_BYTES,
                 delays: Delays | None = None):
        self._optimizer = optimizer
        k = len(group_params)
        self._pairs = pairs if pairs is not None else {
            (a, b) for a in range(k) for b in range(k) if a != b}
        self._group_params = group_params
        self._device = device
        self.enabled = enabled
        self._masters = masters
        self._cuda = device.type == "cuda"
        if strict is None:
            strict = os.environ.get("HIFT_STRICT_OFFLOAD") == "1"
        self.strict = bool(strict) and enabled and not self._cuda
        self._streams = (CudaStreams(device) if enabled and self._cuda
                         else StreamModel() if self.strict else NoStreams())
        self._chunk_bytes = chunk_bytes
        delays = delays or Delays()
        self._streams.delay = delays.copy
        self._update_delay = delays.update
        self._layouts: dict[int, _Layout] = {}
        self._host: dict[int, dict[torch.dtype, torch.Tensor]] = {}
        # The device slots: slot 0 at the start of the arena, slot 1 at its end.
        self._arena: dict[torch.dtype, torch.Tensor] = {}
        self._slot_owner: list[int | None] = [None, None]
        self._in_slot: dict[int, dict[torch.dtype, torch.Tensor]] = {}  # group -> its slot
        self._at: dict[int, dict[torch.dtype, int] | None] = {}  # its slot's arena offsets
        # Groups whose state is on the device: slot index, or None for state that lives
        # outside the slots (created by the group's first update) or that has none yet.
        self._resident: dict[int, int | None] = {}
        self._unbound: set[int] = set()  # fetched into a slot, not yet waited for
        # Events: a group's fill done; an arena chunk's last write-back done, keyed by
        # (dtype, chunk); a group's host buffers written back.
        self._ready: dict[int, object] = {}
        self._drained: dict[tuple[torch.dtype, int], object] = {}
        self._landed: dict[int, object] = {}
        # Groups updated whose write-back has not gone out yet, with the compute stream's
        # event after the update (see release).
        self._deferred: dict[int, object] = {}
        self._allocated_host_bytes = 0  # every host buffer ever allocated (sizing check)
        self._writebacks = collections.Counter()  # "flat" (a copy per dtype) / "per_tensor"
        self._stats = TransferStats()
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._registered: dict[int, list] = {}  # group -> finalizers that un-register
        self._reading = 0  # depth of readable() blocks
        # Strict mode binds away groups here: wrong size and dtype, so any use fails.
        self._poison = torch.empty(0, dtype=torch.bool)
        if enabled:
            predicted: dict[tuple, dict | None] = {}
            for g in range(len(group_params)):
                self._setup_group(g, factory, predicted)
            log.info(f"State store: {self._allocated_host_bytes / 2**30:.3f} GiB of host"
                     f" memory for {len(group_params)} groups"
                     + (" (page-locked)" if self._cuda else "")
                     + (" (strict mode)" if self.strict else ""))

    # ------------------------------------------------------------------ layout
    def _handles(self, g: int) -> list[Handle]:
        """What group g moves now: masters' data, and every non-scalar optimizer state
        tensor that exists (scalar step counters stay where the optimizer keeps them)."""
        handles = []
        for p in self._group_params[g]:
            if self._masters:
                handles.append((p, None))
            for key, value in self._optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    handles.append((p, key))
        return handles

    def _get(self, handle: Handle) -> torch.Tensor:
        """The tensor a handle names; of a sharded one (trainer.shard_weights), this
        rank's part: the store moves only that."""
        p, key = handle
        if key is None:
            return local(p) if is_sharded(p) else p.data
        return local(self._optimizer.state[p][key])

    def _set(self, handle: Handle, t: torch.Tensor) -> None:
        p, key = handle
        current = p if key is None else self._optimizer.state[p][key]
        if is_sharded(current):
            rebind_local(current, t)
        elif key is None:
            p.data = t
        else:
            self._optimizer.state[p][key] = t

    def _setup_group(self, g: int, factory: Callable | None, predicted: dict) -> None:
        """Group g's layout (masters first, then the state its first update will create)
        and its host buffers; the masters move in."""
        layout = _Layout()
        for p in self._group_params[g] if self._masters else []:
            layout.add((p, None), local(p).shape, p.dtype)
        for p in self._group_params[g]:
            key = (tuple(local(p).shape), p.dtype)
            if key not in predicted:
                predicted[key] = self._predict(factory, p)
            for name, (shape, dtype) in (predicted[key] or {}).items():
                layout.add((p, name), shape, dtype)
        self._allocate(g, layout)
        handles = self._handles(g)
        if not self._covers(g, handles):
            self._relayout(g, handles)
        for handle in handles:  # masters (and state, if any) move in now
            self._host_view(g, handle).copy_(self._get(handle))
        self._streams.use(HOST, writes=self._host[g].values(),
                          what=f"group {g}'s host buffers")
        self._bind_away(g)

    def _predict(self, factory: Callable | None, p: torch.Tensor) -> dict | None:
        if factory is None:
            return None
        try:
            return state_shapes(factory, tuple(local(p).shape), p.dtype,
                                ("meta", str(self._device), "cpu"))
        except RuntimeError as e:
            log.warning(f"Cannot tell the optimizer's state layout in advance ({e}); host"
                        " buffers are sized at each group's first update instead")
            return None

    def _allocate(self, g: int, layout: _Layout) -> None:
        self._drop_host_buffers(g)
        self._layouts[g] = layout
        self._host[g] = {dt: self._host_buffer(g, n, dt) for dt, n in layout.numel.items()}
        self._allocated_host_bytes += layout.nbytes

    def _host_buffer(self, g: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An exact-size host buffer; page-locked on CUDA without the pinned caching
        allocator (which rounds up to a power of two and caches freed blocks)."""
        t = torch.empty(numel, dtype=dtype)
        if not self._cuda or numel == 0:
            return t
        if not page_lock(t):
            log.warning("cudaHostRegister failed; using PyTorch's pinned allocator")
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # Un-registered when the memory goes, or by _drop_host_buffers / close (whichever
        # comes first); not at exit, when the CUDA context may be gone.
        unregister = weakref.finalize(storage, _unregister, ptr)
        unregister.atexit = False
        self._registered.setdefault(g, []).append(unregister)
        return t

    def _drop_host_buffers(self, g: int) -> None:
        """Drop group g's host buffers (a layout that was not predicted)."""
        if g not in self._host:
            return
        self.synchronize()
        self._streams.forget(self._host[g].values())
        for unregister in self._registered.pop(g, []):
            unregister()
        del self._host[g]

    def _covers(self, g: int, handles: list[Handle]) -> bool:
        layout = self._layouts.get(g)
        return layout is not None and all(layout.matches(h, self._get(h)) for h in handles)

    def _relayout(self, g: int, handles: list[Handle]) -> None:
        log.warning(f"Group {g}: the optimizer's state differs from the predicted layout;"
                    " its host buffers are allocated again")
        layout = _Layout()
        for h in sorted(handles, key=lambda h: h[1] is not None):  # masters first
            t = self._get(h)
            layout.add(h, t.shape, t.dtype)
        self._allocate(g, layout)

    def _host_view(self, g: int, handle: Handle) -> torch.Tensor:
        dtype, off, shape = self._layouts[g].entries[handle]
        return self._host[g][dtype][off: off + shape.numel()].view(shape)

    def _bind(self, g: int, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        for handle in self._handles(g):
            dtype, off, shape = self._layouts[g].entries[handle]
            self._set(handle, buffers[dtype][off: off + shape.numel()].view(shape))

    def _bind_away(self, g: int) -> None:
        """Group g's state is not on the device: host views, or poison in strict mode."""
        if self.strict:
            for handle in self._handles(g):
                self._set(handle, self._poison)
        else:
            self._bind(g, self._host[g])

    # ------------------------------------------------------------------ moves
    def prefetch(self, g: int) -> None:
        """Start copying group g's state to the device (no-op if already there)."""
        if not self.enabled:
            return
        if g in self._resident:
            self._deferred.pop(g, None)  # trains again before its write-back went out
            return
        handles = self._handles(g)
        if not handles:  # nothing yet (no masters, no state before its first update)
            self._resident[g] = None
            return
        if None not in self._slot_owner:
            self.flush()  # a slot is held by a group whose write-back was put off
        index = self._slot_owner.index(None)
        slot = self._in_slot[g] = self._slot(index, g)
        host, layout, s = self._host[g], self._layouts[g], self._streams
        has_state = any(key is not None for _, key in handles)
        count = layout.numel if has_state else layout.masters_numel
        if g in self._landed:  # its host buffers: their last write-back must have landed
            s.wait(s.h2d, self._landed.pop(g))
        for dtype, n in count.items():
            for lo, hi, chunk in self._chunks(g, dtype, n):
                if chunk in self._drained:  # the slot's previous contents have left
                    s.wait(s.h2d, self._drained.pop(chunk))
                self._copy(s.h2d, slot[dtype][lo:hi], host[dtype][lo:hi],
                           f"group {g}'s fill of slot {index}")
        self._stats.h2d_bytes += sum(n * dt.itemsize for dt, n in count.items())
        self._ready[g] = s.record(s.h2d)
        self._slot_owner[index] = g
        self._resident[g] = index
        self._unbound.add(g)

    def _chunks(self, g: int, dtype: torch.dtype, n: int):
        """Group g's first ``n`` elements of ``dtype`` in its slot, cut at the arena's
        chunk boundaries: ``(lo, hi, chunk)`` with slot-relative ``lo:hi`` and the
        arena chunk's key (None: a slot outside the arena, one piece)."""
        at = self._at.get(g)
        if at is None:
            if n:
                yield 0, n, None
            return
        size = max(1, self._chunk_bytes // dtype.itemsize)
        start = lo = at[dtype]
        while lo < start + n:
            hi = min((lo // size + 1) * size, start + n)
            yield lo - start, hi - start, (dtype, lo // size)
            lo = hi

    def _copy(self, stream, dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
        """``dst.copy_(src)`` on a copy stream (a plain copy, timed, without streams)."""
        def copy(dst=dst, src=src):
            dst.copy_(src, non_blocking=True)

        if self._streams.eager:
            start = time.perf_counter()
            copy()
            self._stats.stall_seconds += time.perf_counter() - start
            return
        self._streams.run(stream, copy, reads=(src,), writes=(dst,), what=what)

    def _arena_size(self) -> dict[torch.dtype, int]:
        """Elements per dtype the two slots need: the largest sum over the pairs of groups
        that can follow each other (and the largest group alone)."""
        def n(g: int, dtype: torch.dtype) -> int:
            return self._layouts[g].numel.get(dtype, 0) if g in self._layouts else 0

        dtypes = {dt for layout in self._layouts.values() for dt in layout.numel}
        return {dt: max([n(a, dt) + n(b, dt) for a, b in self._pairs]
                        + [n(g, dt) for g in self._layouts]) for dt in dtypes}

    def _slot(self, index: int, g: int) -> dict[torch.dtype, torch.Tensor]:
        """Group g's device slot at end ``index`` of the arena (allocated at the first
        fetch; grows only if a layout was not predicted)."""
        need = self._layouts[g].numel
        other = self._slot_owner[1 - index]
        beside = self._layouts[other].numel if other is not None else {}
        fits = all(dt in self._arena and n + beside.get(dt, 0) <= self._arena[dt].numel()
                   for dt, n in need.items())
        if not fits and other is not None:
            # A layout that was not predicted, beside a group in the other slot: a buffer of
            # its own this once (freed when the group leaves; the copy streams keep it).
            slot = {dt: torch.empty(n, dtype=dt, device=self._device)
                    for dt, n in need.items()}
            self._fill_after_compute(slot)
            self._at[g] = None
            return slot
        if not fits:
            if self._arena:
                self.synchronize()  # no copy may still use the arena being replaced
                self._streams.forget(self._arena.values())
            size = self._arena_size()
            self._arena = {dt: torch.empty(max(size.get(dt, 0), need.get(dt, 0)), dtype=dt,
                                          device=self._device) for dt in {*size, *need}}
            self._drained.clear()  # events of the old arena's chunks
            self._fill_after_compute(self._arena)
        if index == 0:
            self._at[g] = {dt: 0 for dt in need}
        else:
            self._at[g] = {dt: self._arena[dt].numel() - n for dt, n in need.items()}
        return {dt: self._arena[dt][self._at[g][dt]:][:n] for dt, n in need.items()}

    def _fill_after_compute(self, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        """New device memory is about to be written on the copy streams: it was allocated
        on the compute stream, whose queued work (a deterministic-mode fill, or kernels
        still using the block the allocator handed out) must come first; and its memory
        must not go back to the allocator before the copy streams are done with it."""
        s = self._streams
        s.allocated(buffers.values())
        s.after(s.h2d, s.compute)
        for b in buffers.values():
            s.keep(b, s.h2d)
            s.keep(b, s.d2h)

    def wait(self, g: int) -> None:
        """Before group g's state is used: make sure it has arrived on the device."""
        if not self.enabled:
            return
        self._deferred.pop(g, None)  # used again before its write-back went out: it stays
        ahead = g in self._resident
        if not ahead:
            self.prefetch(g)  # nothing fetched it ahead: fetch now (not counted as stall)
        if g in self._unbound:
            s, ready = self._streams, self._ready.pop(g)
            if self._cuda and ahead:  # time what the compute stream waits: the stall
                compute = s.compute
                arrive = torch.cuda.Event(enable_timing=True)
                resume = torch.cuda.Event(enable_timing=True)
                arrive.record(compute)
                compute.wait_event(ready)
                resume.record(compute)
                self._stall_events.append((arrive, resume))
            else:
                s.wait(s.compute, ready)
            self._bind(g, self._in_slot[g])
            self._unbound.discard(g)

    @contextlib.contextmanager
    def updating(self, g: int):
        """Around group g's update (the optimizer step, the masters' write-back into the
        weights) on the compute stream: its write-back waits for all of it. The GPU
        check's update delay runs here, right before the update: a write-back that
        did not wait for the update would copy the state before it."""
        if self._update_delay is not None:
            self._update_delay()
        yield
        if self.enabled and g in self._layouts:
            self._streams.use(self._streams.compute,
                              writes=[self._get(h) for h in self._handles(g)],
                              what=f"group {g}'s update")

    def release(self, g: int) -> None:
        """After group g's update (or its skipped update): its state is to go back to the
        host, at the next :meth:`flush` (the engine's: once the next step's forward pass is
        queued), unless g trains again first: a :meth:`prefetch` or :meth:`wait` of g
        before then keeps it on the device (a random order repeating a group across a
        cycle boundary, or ``hift.steps_per_group``).

        The write-back is put off because a copy engine serves its queue in order: a
        host read of a device value (``.item()``, a mask check in the model's forward, the
        chunked loss's ``nonzero``) issued after a ~2 GiB write-back waits for all of it,
        and the host, blocked, queues no work: on an H200 that idled the GPU for the whole
        write-back every step (``make gpu-check``, 2026-12-04). Issued once the next
        forward pass is queued, it runs beside that step's backward pass instead.
        """
        if not self.enabled:
            return
        # The write-back waits for the update, not for what the compute stream does later.
        self._deferred[g] = self._streams.record(self._streams.compute)

    def flush(self) -> None:
        """Send the released groups' state to the host (see :meth:`release`)."""
        while self._deferred:
            g, updated = self._deferred.popitem()
            self._write_back(g, updated)

    def _write_back(self, g: int, updated) -> None:
        """Group g's state to its host buffers, after the compute stream's event
        ``updated``; its slot is free for the next fill, chunk by chunk."""
        handles = self._handles(g)
        if not self._covers(g, handles):
            self._relayout(g, handles)  # an optimizer whose state was not predicted
        index = self._resident.pop(g, None)
        self._unbound.discard(g)
        host, layout, s = self._host[g], self._layouts[g], self._streams
        slot = self._in_slot.pop(g, None)
        s.wait(s.d2h, updated)  # the update comes first
        flat = slot is not None and all(
            self._get(h).data_ptr() == slot[dtype].data_ptr() + off * dtype.itemsize
            for h, (dtype, off, _) in ((h, layout.entries[h]) for h in handles))
        if flat:  # every tensor is a view of the slot: a copy per dtype and chunk
            for dtype, n in layout.numel.items():
                for lo, hi, chunk in self._chunks(g, dtype, n):
                    self._copy(s.d2h, host[dtype][lo:hi], slot[dtype][lo:hi],
                               f"group {g}'s write-back")
                    if chunk is not None:
                        self._drained[chunk] = s.record(s.d2h)
            self._stats.d2h_bytes += layout.nbytes
            self._writebacks["flat"] += 1
        else:  # the group's first update created its state outside the slot
            for h in handles:
                src = self._get(h)
                self._copy(s.d2h, self._host_view(g, h), src, f"group {g}'s write-back")
                if src.device.type == "cuda":
                    s.keep(src, s.d2h)  # its memory stays until copied
                self._stats.d2h_bytes += src.nbytes
            if slot is not None:  # the masters came from the slot: its chunks drain now
                done = s.record(s.d2h)
                for dtype, n in layout.numel.items():
                    for _, _, chunk in self._chunks(g, dtype, n):
                        if chunk is not None:
                            self._drained[chunk] = done
            self._writebacks["per_tensor"] += 1
        self._landed[g] = s.record(s.d2h)
        self._at.pop(g, None)
        self._bind_away(g)
        if index is not None:
            self._slot_owner[index] = None

    # ------------------------------------------------------------------ bookkeeping
    def synchronize(self) -> None:
        """Send what is put off, then wait for every transfer (before reading host
        copies, e.g. to save them)."""
        self.flush()
        self._streams.synchronize()

    @property
    def pending(self) -> int:
        """Strict mode: copies queued and not yet done."""
        return self._streams.pending

    @contextlib.contextmanager
    def readable(self):
        """Every group's state and masters readable through the optimizer (to save or
        compare them): transfers finished; in strict mode host views bound meanwhile."""
        self.synchronize()
        if not self.strict or self._reading:  # nested: the outer one binds and unbinds
            self._reading += 1
            try:
                yield
            finally:
                self._reading -= 1
            return
        away = [g for g in self._layouts if g not in self._resident or g in self._unbound]
        for g in away:
            self._bind(g, self._host[g])
        self._streams.use(HOST, reads=[b for g in away for b in self._host[g].values()],
                         what="host buffers, read by the host")
        self._reading += 1
        try:
            yield
        finally:
            self._reading -= 1
            for g in away:
                self._bind_away(g)

    def load(self, saved: dict, masters: list[tuple[torch.Tensor, torch.Tensor]] = (),
             resident: set[int] = frozenset()) -> None:
        """A checkpoint's optimizer state dict (on the CPU) and fp32 masters into place:
        offloaded groups' straight into their host buffers (never all on the device at
        once), the rest, and the parameters in ``resident`` (ids: always-active units),
        onto the device. ``masters``: (master parameter, its saved values)."""
        self._reset()
        for m, values in masters:
            self._get((m, None)).copy_(values)  # offloaded: in place, in its host buffer
        load_optimizer_state(self._optimizer, saved, None if self.enabled else self._device,
                             self._device, resident)
        self._restore()

    def _reset(self) -> None:
        """Before loading a checkpoint: every group back to its host buffers, which the
        loader may write (masters in place); state on the device is discarded."""
        if not self.enabled:
            return
        self.synchronize()
        # The compute stream may still be using the slots: the next fill waits for it.
        self._streams.after(self._streams.h2d, self._streams.compute)
        for events in (self._ready, self._drained, self._landed):
            events.clear()  # all done (synchronized)
        self._resident.clear()
        self._unbound.clear()
        self._slot_owner = [None, None]
        self._in_slot.clear()
        self._at.clear()
        for g in self._layouts:
            self._bind(g, self._host[g])

    def _restore(self) -> None:
        """After the loader replaced the optimizer's state (on the CPU): copy every group's
        state into its host buffers, where it waits for its group's turn."""
        if not self.enabled:
            return
        for g in self._layouts:
            handles = self._handles(g)
            if not self._covers(g, handles):
                self._relayout(g, handles)
            for h in handles:
                view, t = self._host_view(g, h), self._get(h)
                if view.data_ptr() != t.data_ptr():
                    view.copy_(t)
            self._streams.use(HOST, writes=self._host[g].values(),
                             what=f"group {g}'s host buffers, restored")
            self._bind_away(g)

    def footprint(self, exact: bool = False) -> Footprint:
        """What the store holds now (``exact``: also what the host buffers should total,
        read off the tensors through :meth:`readable`)."""
        buffers = [b for bufs in self._host.values() for b in bufs.values()]
        arena = {b.untyped_storage()._cdata for b in self._arena.values()}
        device = sum(b.nbytes for b in self._arena.values()) + sum(
            b.nbytes for slot in self._in_slot.values() for b in slot.values()
            if b.untyped_storage()._cdata not in arena)
        exact_bytes = None
        if exact:
            with self.readable():
                exact_bytes = sum(self._get(h).nbytes for g in range(len(self._group_params))
                                  for h in self._handles(g))
        return Footprint(
            device_bytes=device, host_bytes=sum(b.nbytes for b in buffers),
            allocated_host_bytes=self._allocated_host_bytes,
            pinned=bool(buffers) and all(b.is_pinned() for b in buffers),
            writebacks=dict(self._writebacks), exact_host_bytes=exact_bytes)

    def holds(self, tensors) -> list[str | None]:
        """Where the store keeps each tensor's memory: ``"host"`` (a host buffer, or the
        placeholder strict mode binds away groups to), ``"slot"`` (a device slot), or
        None (not the store's: e.g. state created by a group's first update). One pass
        over the store's buffers for all of them."""
        host = {b.untyped_storage()._cdata for bufs in self._host.values() for b in bufs.values()}
        host.add(self._poison.untyped_storage()._cdata)
        slots = {b.untyped_storage()._cdata for b in self._arena.values()} | {
            b.untyped_storage()._cdata for slot in self._in_slot.values() for b in slot.values()}
        where = []
        for t in tensors:
            storage = t.untyped_storage()._cdata
            where.append("host" if storage in host else "slot" if storage in slots else None)
        return where

    def close(self) -> None:
        """Finish transfers and un-register the page-locked buffers."""
        self.synchronize()
        for g in list(self._registered):
            for unregister in self._registered.pop(g):
                unregister()

    def take_stats(self) -> TransferStats:
        """Transfer statistics since the last call (reads finished CUDA timing events)."""
        if self._stall_events:
            torch.cuda.current_stream(self._device).synchronize()
            for arrive, resume in self._stall_events:
                self._stats.stall_seconds += arrive.elapsed_time(resume) / 1000.0
            self._stall_events.clear()
        stats, self._stats = self._stats, TransferStats()
        return stats



def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict,
                         device: torch.device | None, compute_device: torch.device,
                         resident: set[int] = frozenset()) -> None:
    """Like ``Optimizer.load_state_dict``, without moving every group's state to the
    device at once (which offloading exists to avoid): state stays on the CPU for the
    store to take, or goes to ``device`` when nothing is offloaded; the state of the
    parameters in ``resident`` (ids: always-active units) goes to ``compute_device``
    either way. Scalar step counters go where ``load_state_dict`` puts them: with
    ``fused`` or ``capturable`` to the ``compute_device`` as float32, else they stay on
    the CPU. Entries listed in ``saved["sharded"]`` (``[index, key]``) are this rank's
    part of a tensor sharded like its parameter (trainer.shard_weights)."""
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    sharded = {(int(i), k) for i, k in saved.get("sharded", [])}
    optimizer.state.clear()
    for index, entry in saved["state"].items():
        p, group = params[int(index)]
        on_device = bool(group.get("fused") or group.get("capturable"))
        state = {}
        to = compute_device if id(p) in resident else device
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0 and to is not None:
                v = v.to(to)
            elif k == "step" and torch.is_tensor(v) and on_device:
                v = v.to(dtype=torch.float32, device=compute_device)
            state[k] = wrap_like(v, p) if (int(index), k) in sharded else v
        optimizer.state[p] = state
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
