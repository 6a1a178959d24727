"""How the offload store's copies are ordered: CUDA streams, a model of them, or none.

The state store (:mod:`hift_cli.offload`) issues every copy, every wait and every use of
the memory it owns through one of these, with the same calls, so the ordering logic the
CPU tests check is the one a GPU runs:

* :class:`CudaStreams`: the compute stream (the current one), one copy stream per
  direction (host-to-device and device-to-host: the link copies both ways at once), CUDA
  events.
* :class:`StreamModel` (strict mode, on the CPU): a model of those streams that checks
  the ordering. Copies are queued per stream and run only when something waits for them
  (late, as on a GPU; the compute stream and the host run at once). Every access to
  memory the store owns is recorded with its stream and a vector clock (what that stream
  is ordered after: its own earlier work, the events it waited for, and everything the
  host did or synchronised with before issuing it); an access that is not ordered after
  the last write of the same bytes, or a write not ordered after their last reads, raises
  :class:`StreamRace` naming both.
* :class:`NoStreams` (a CPU without strict mode): every copy runs at once.

A stream is named by an attribute (``compute``, ``h2d``, ``d2h``); an event is what
:meth:`record` returns.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

HOST, COMPUTE, H2D, D2H = range(4)
NAMES = ("host", "compute", "h2d", "d2h")


class StreamRace(RuntimeError):
    """Two accesses to the same memory that no stream order, event or sync orders."""


class NoStreams:
    """Everything at once, in program order (a CPU: copies are synchronous)."""

    eager = True
    pending = 0
    compute, h2d, d2h = COMPUTE, H2D, D2H

    def __init__(self):
        self.delay: Callable[[], None] | None = None

    def run(self, stream, fn: Callable[[], None], reads: Iterable = (), writes: Iterable = (),
            what: str = "") -> None:
        fn()

    def use(self, stream, reads: Iterable = (), writes: Iterable = (), what: str = "") -> None:
        """Memory used by work the caller did itself on ``stream`` (compute, host)."""

    def record(self, stream):
        return None

    def wait(self, stream, event) -> None:
        """``stream``'s later work waits for ``event``."""

    def after(self, stream, other) -> None:
        """``stream``'s later work waits for everything issued on ``other`` so far."""

    def allocated(self, tensors: Iterable[torch.Tensor]) -> None:
        """New device memory from the compute stream's allocator."""

    def keep(self, tensor: torch.Tensor, stream) -> None:
        """``tensor``'s memory is not reused before ``stream``'s work issued so far."""

    def synchronize(self) -> None:
        """The host waits for every copy."""

    def forget(self, tensors: Iterable[torch.Tensor]) -> None:
        """This memory is being freed: what was done with it no longer matters."""


class CudaStreams(NoStreams):
    """The compute stream and a copy stream per direction, on one CUDA device."""

    eager = False

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)

    @property
    def compute(self):
        return torch.cuda.current_stream(self.device)

    def run(self, stream, fn, reads=(), writes=(), what="") -> None:
        with torch.cuda.stream(stream):
            if self.delay is not None:  # the GPU check's race amplifier
                self.delay()
            fn()

    def record(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def after(self, stream, other) -> None:
        stream.wait_stream(other)

    def keep(self, tensor, stream) -> None:
        tensor.record_stream(stream)

    def synchronize(self) -> None:
        self.h2d.synchronize()
        self.d2h.synchronize()


@dataclass(frozen=True)
class Event:
    clock: tuple[int, ...]


@dataclass
class _Access:
    lo: int
    hi: int
    stream: int
    tick: int
    write: bool
    what: str
    tensor: torch.Tensor  # held: its memory cannot be reused while it is tracked

    def describe(self) -> str:
        return f"{NAMES[self.stream]}'s {'write' if self.write else 'read'} of {self.what}"


def _merge(into: list[int], clock: Iterable[int]) -> None:
    for i, c in enumerate(clock):
        if c > into[i]:
            into[i] = c


class StreamModel(NoStreams):
    """The CUDA streams' ordering, simulated and checked on the CPU (see the module
    docstring). ``copies`` counts the copies issued per stream name."""

    eager = False

    def __init__(self):
        super().__init__()
        self.clocks = [[0] * len(NAMES) for _ in NAMES]
        self.queues = {H2D: collections.deque(), D2H: collections.deque()}
        self.history: list[_Access] = []
        self.copies: collections.Counter = collections.Counter()
        self.log: list[tuple[str, tuple[int, ...], str]] = []  # (stream, clock, what) of copies

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    # --------------------------------------------------------------- issuing work
    def _issue(self, stream: int) -> tuple[int, ...]:
        """A new operation on ``stream``: after the stream's earlier work, and after
        everything the host has done or synchronised with (it issues in program order)."""
        clock = self.clocks[stream]
        if stream != HOST:
            _merge(clock, self.clocks[HOST])
        clock[stream] += 1
        return tuple(clock)

    def run(self, stream, fn, reads=(), writes=(), what="") -> None:
        clock = self._issue(stream)
        self._check(stream, clock, reads, writes, what)
        self.copies[NAMES[stream]] += 1
        self.log.append((NAMES[stream], clock, what))
        if stream in self.queues:
            self.queues[stream].append((clock[stream], clock, fn))
        else:
            fn()

    def use(self, stream, reads=(), writes=(), what="") -> None:
        self._check(stream, self._issue(stream), reads, writes, what)

    def allocated(self, tensors) -> None:
        # Deterministic mode fills new memory on the compute stream; without it the
        # allocator may hand out a block the compute stream's queued work still uses.
        self.use(COMPUTE, writes=list(tensors), what="newly allocated device memory")

    def record(self, stream) -> Event:
        return Event(tuple(self.clocks[stream]))

    def wait(self, stream, event: Event) -> None:
        _merge(self.clocks[stream], event.clock)
        if stream == COMPUTE:  # it runs at once: what it waits for must have happened
            self._drain(event.clock)

    def after(self, stream, other) -> None:
        self.wait(stream, self.record(other))

    def synchronize(self) -> None:
        for s in self.queues:
            self._drain(self.clocks[s])
            _merge(self.clocks[HOST], self.clocks[s])

    def forget(self, tensors) -> None:
        spans = [_span(t) for t in tensors if t.numel()]
        self.history = [a for a in self.history
                        if not any(a.lo < hi and lo < a.hi for lo, hi in spans)]

    # --------------------------------------------------------------- running and checking
    def _drain(self, clock: tuple[int, ...] | list[int]) -> None:
        """Run queued copies up to ``clock``, each after what it was ordered after."""
        for s, queue in self.queues.items():
            while queue and queue[0][0] <= clock[s]:
                _, needs, fn = queue.popleft()
                self._drain(needs)
                if self.delay is not None:
                    self.delay()
                fn()

    def _check(self, stream: int, clock: tuple[int, ...], reads, writes, what: str) -> None:
        new = []
        for tensors, write in ((reads, False), (writes, True)):
            for t in tensors:
                if t.numel() == 0:
                    continue
                lo, hi = _span(t)
                for a in self.history:
                    if a.lo < hi and lo < a.hi and (write or a.write) \
                            and clock[a.stream] < a.tick:
                        raise StreamRace(
                            f"{NAMES[stream]}'s {'write' if write else 'read'} of {what} is not"
                            f" ordered after {a.describe()}: no stream order, event or sync"
                            " between them")
                new.append(_Access(lo, hi, stream, clock[stream], write, what, t))
        for access in new:
            if access.write:  # what it covers is ordered before it: only it matters now
                self.history = [a for a in self.history
                                if not (access.lo <= a.lo and a.hi <= access.hi)]
            self.history.append(access)

    def ordered(self, first: tuple[str, int], then: tuple[str, int]) -> bool:
        """Whether copy ``first`` (stream name, index among that stream's copies) is
        ordered before copy ``then``: a test's view of what may run concurrently."""
        def clock(name: str, i: int) -> tuple[int, ...]:
            return [c for s, c, _ in self.log if s == name][i]

        a, b = clock(*first), clock(*then)
        s = NAMES.index(first[0])
        return b[s] >= a[s]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes a contiguous tensor covers."""
    lo = t.data_ptr()
    return lo, lo + t.numel() * t.element_size()
