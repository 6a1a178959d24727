"""The store's copies on CUDA streams, checked on the CPU by the stream model (strict mode).

Every fix that keeps the copies ordered is taken out in turn: the model must then find the
race it was there to prevent. The copies run on one stream per direction, and a group's
write-back and the next fill of the same slot run side by side, one chunk apart.
"""

import pytest
import torch

from helpers import build_trainer, store_by_hand
from hift_cli import offload
from hift_cli.update import HiftUpdate
from hift_cli.offload import GroupStateStore
from hift_cli.streams import COMPUTE, D2H, StreamModel, StreamRace


def tiny(tmp_path, *overrides, steps=6, delays=None):
    return build_trainer(tmp_path, "hift.k=3", "hift.offload=true", f"trainer.max_steps={steps}",
                         "data.max_eval_samples=2", "trainer.eval_every=null", *overrides,
                         store_delays=delays)


# --------------------------------------------------------------------- the model itself
def test_the_model_runs_copies_late_and_after_what_they_wait_for():
    model = StreamModel()
    device, host, staged = torch.zeros(4), torch.arange(4.0), torch.zeros(4)
    model.run(model.d2h, lambda: staged.copy_(device), reads=[device], writes=[staged], what="a")
    done = model.record(model.d2h)
    model.wait(model.h2d, done)
    model.run(model.h2d, lambda: device.copy_(host), reads=[host], writes=[device], what="b")
    assert model.pending == 2 and device.sum() == 0  # nothing ran yet
    model.wait(model.compute, model.record(model.h2d))  # the compute stream needs "b"
    assert model.pending == 0 and torch.equal(device, host) and staged.sum() == 0  # "a" first


def test_the_model_finds_an_unordered_write_after_a_read_and_a_read_after_a_write():
    model = StreamModel()
    slot, host = torch.zeros(8), torch.zeros(8)
    model.allocated([slot])
    with pytest.raises(StreamRace, match="h2d's write of fill is not ordered after compute's"):
        model.run(model.h2d, lambda: None, writes=[slot], what="fill")
    model.after(model.h2d, model.compute)
    model.after(model.d2h, model.compute)
    model.run(model.h2d, lambda: None, writes=[slot[:4]], what="fill")
    with pytest.raises(StreamRace, match="d2h's read of write-back .* h2d's write of fill"):
        model.run(model.d2h, lambda: None, reads=[slot[2:6]], writes=[host], what="write-back")
    model.run(model.d2h, lambda: None, reads=[slot[4:]], writes=[host], what="write-back")
    model.wait(model.d2h, model.record(model.h2d))
    model.run(model.d2h, lambda: None, reads=[slot[2:6]], writes=[host], what="write-back")


# --------------------------------------------------------------------- each fix, removed
def _fill_without_waiting(self, buffers):  # item 1: new memory filled before compute's work
    self._streams.allocated(buffers.values())


def _ignore(stream):
    """StreamModel.wait/after that drop what ``stream`` should wait for."""
    wait, after = StreamModel.wait, StreamModel.after

    def wait_unless(self, s, event):
        if s != stream:
            wait(self, s, event)

    def after_unless(self, s, other):
        if s != stream:
            after(self, s, other)
    return wait_unless, after_unless


def _forget(events):
    """GroupStateStore._write_back that loses the events it records in ``events``."""
    original = GroupStateStore._write_back

    def write_back_and_forget(self, g, updated):
        original(self, g, updated)
        getattr(self, events).clear()
    return write_back_and_forget


@pytest.mark.parametrize("broken,overrides,race", [
    # A fresh slot filled before the compute stream's earlier work (deterministic fill).
    ("fill_after_compute", ("trainer.precision=bf16-mixed", "model.dtype=bfloat16"),
     "h2d's write of group 0's fill of slot 0 is not ordered after compute's write of newly"),
    # The compute stream updates a group without waiting for its fill.
    ("compute_waits_for_fill", ("trainer.precision=bf16-mixed", "model.dtype=bfloat16"),
     "compute's write of group 0's update is not ordered after h2d's write"),
    # A write-back copies the state before the update that the compute stream queued.
    ("writeback_after_update", ("trainer.precision=bf16-mixed", "model.dtype=bfloat16"),
     "d2h's read of group 0's write-back is not ordered after compute's write"),
    # A slot refilled before its previous contents were written back.
    ("fill_after_drain", ("trainer.precision=bf16-mixed", "model.dtype=bfloat16"),
     "h2d's write of group 2's fill of slot 0 is not ordered after"),
    # A host buffer read (fp32: state created outside the slots at the first update)
    # before its write-back landed.
    ("read_after_landing", (), "h2d's read of group 0's fill of slot 0 is not ordered after"
     " d2h's write of group 0's write-back"),
])
def test_without_each_ordering_fix_the_model_finds_the_race(tmp_path, monkeypatch, broken,
                                                            overrides, race):
    patches = {
        "fill_after_compute": (GroupStateStore, "_fill_after_compute", _fill_without_waiting),
        "compute_waits_for_fill": (StreamModel, "wait", _ignore(COMPUTE)[0]),
        "writeback_after_update": (StreamModel, "wait", _ignore(D2H)[0]),
        "fill_after_drain": (GroupStateStore, "_write_back", _forget("_drained")),
        "read_after_landing": (GroupStateStore, "_write_back", _forget("_landed")),
    }
    # With every fix, every strict-mode test trains through the model without a race.
    monkeypatch.setattr(*patches[broken])
    trainer = tiny(tmp_path, *overrides)
    assert isinstance(trainer.store._streams, StreamModel)
    with pytest.raises(StreamRace, match=race):
        trainer.train(evaluate=False)


# --------------------------------------------------------------------- item 3: the delay
def test_the_compute_delay_runs_after_the_finite_check_right_before_the_update(tmp_path,
                                                                               monkeypatch):
    events = []
    finite = HiftUpdate._finite
    monkeypatch.setattr(HiftUpdate, "_finite",
                        staticmethod(lambda *a: events.append("sync") or finite(*a)))
    delays = offload.Delays(update=lambda: events.append("delay"))
    trainer = tiny(tmp_path, steps=4, delays=delays)
    trainer.after_update.append(lambda *_: events.append("step"))  # right after the step
    trainer.train(evaluate=False)
    # The host sync of the finite check comes first: a delay before it would be waited
    # out on the host before the update is even queued, hiding a write-back that does not
    # wait for the update.
    assert events == ["sync", "delay", "step"] * 4


# --------------------------------------------------------------------- item 5: two streams
def test_each_direction_has_its_stream_and_a_refill_follows_the_write_back_chunk_by_chunk():
    # fp32 momentum of 640 elements: 2560 bytes a group, 10 chunks of 256 bytes
    store, groups, twins, opt, reference = store_by_hand([640, 640, 640], "bottom2up", 0, 9,
                                                         strict=True, chunk_bytes=256)
    model = store._streams
    with store.readable():  # the data came through every late copy intact
        for ps, ts in zip(groups, twins):
            assert torch.equal(opt.state[ps[0]]["momentum_buffer"],
                               reference.state[ts[0]]["momentum_buffer"])
    # Fills only on h2d, write-backs only on d2h.
    assert {(s, "fill" in w) for s, _, w in model.log} == {("h2d", True), ("d2h", False)}
    # Step 7 (group 1 trains) fills the slot group 0 left at the end of step 6 with group
    # 2: the fill's first chunk waits for the write-back's first chunk only, not its last.
    backs = [i for i, (_, _, w) in enumerate(model.log) if w == "group 0's write-back"][-10:]
    fills = [i for i, (_, _, w) in enumerate(model.log)
             if w.startswith("group 2's fill") and i > backs[-1]]
    first_fill = sum(1 for _, _, w in model.log[:fills[0]] if "fill" in w)
    first_back = sum(1 for _, _, w in model.log[:backs[0]] if "write-back" in w)
    assert len(fills) == 10 and backs == list(range(backs[0], backs[0] + 10))
    assert model.ordered(("d2h", first_back), ("h2d", first_fill))
    assert not model.ordered(("d2h", first_back + 9), ("h2d", first_fill))
    assert model.ordered(("d2h", first_back + 9), ("h2d", first_fill + 9))


# --------------------------------------------------------------------- item 4
class FakeCudart:
    def __init__(self, rc):
        self.rc, self.calls = rc, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(size)
        return self.rc


@pytest.mark.parametrize("cleared", [True, False])
def test_a_refused_page_lock_resets_the_cuda_error_or_stops(monkeypatch, cleared):
    cudart, resets = FakeCudart(rc=2), []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(offload, "clear_cuda_error", lambda: resets.append(1) or cleared)
    t = torch.empty(1000)
    if cleared:
        assert offload.page_lock(t) is False
    else:
        with pytest.raises(RuntimeError, match="could not be reset.*hift.offload=false"):
            offload.page_lock(t)
    assert cudart.calls == [4000] and resets == [1]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(rc=0))
    assert offload.page_lock(t) is True and len(resets) == 1  # success: nothing to reset
