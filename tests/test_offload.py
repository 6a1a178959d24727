"""The per-group state store: moving state off the device changes no numbers.

The tests run the store in strict mode (tests/conftest.py sets HIFT_STRICT_OFFLOAD=1):
copies land only when something waits for them, and a group's state is unusable while it
is away from the device, so an ordering mistake that a GPU would turn into a crash or a
race fails here too.
"""

import dataclasses
import importlib.util

import pytest
import torch

from helpers import (assert_same, build_trainer, metrics, snapshot, stop_and_resume,
                     store_by_hand)
from hift_cli import offload
from hift_cli.config import ConfigError
from hift_cli.grouping import GroupSchedule
from hift_cli.memory import estimate
from hift_cli.offload import load_optimizer_state, offload_enabled

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "bf16-mixed": "bfloat16"}
# A seed whose random order repeats a group across the first cycle boundary (k=3).
REPEAT_SEED = next(s for s in range(100) if GroupSchedule("random", 3, s).order(0)[-1]
                   == GroupSchedule("random", 3, s).order(1)[0])
STRATEGIES = {"bottom2up": ("hift.strategy=bottom2up",),
              "random-repeat": ("hift.strategy=random", f"trainer.seed={REPEAT_SEED}")}


def aligned_bytes(store, masters_only=False) -> int:
    """The bytes of every group's masters and state, each started at a 256-byte boundary."""
    with store.readable():
        return sum(-(-store._get(h).nbytes // 256) * 256 for g in store._layouts
                   for h in store._handles(g) if not masters_only or h[1] is None)


def make(tmp_path, *overrides, steps=8):
    return build_trainer(tmp_path, "hift.k=3", f"trainer.max_steps={steps}",
                         "data.max_eval_samples=4", *overrides)


def train(tmp_path, *overrides, steps=8):
    trainer = make(tmp_path, *overrides, steps=steps)
    trainer.summary = trainer.train()
    return trainer


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("optimizer", ["adamw", *(pytest.param(o, marks=pytest.mark.slow)
                                                 for o in ("sgd", "adafactor"))])
def test_offload_gives_the_same_weights_masters_and_state(tmp_path, optimizer,
                                                          precision, strategy):
    common = (f"optimizer={optimizer}", f"trainer.precision={precision}",
              f"model.dtype={PRECISIONS[precision]}", *STRATEGIES[strategy])
    off = train(tmp_path / "off", *common, "hift.offload=false")
    on = train(tmp_path / "on", *common, "hift.offload=true")
    assert on.store.enabled and on.store.strict and not off.store.enabled
    assert_same(snapshot(off), snapshot(on))
    rows = metrics(tmp_path / "on", "group")  # training steps, not evaluations
    repeats = {i for i in range(len(rows) - 1) if rows[i]["group"] == rows[i + 1]["group"]}
    assert (len(repeats) > 0) == (strategy == "random-repeat")
    for i, r in enumerate(rows):  # every update goes back out during the next step,
        assert (r["offload/d2h_bytes"] > 0) == (i > 0 and i - 1 not in repeats)  # unless kept
    assert sum(r["offload/h2d_bytes"] for r in rows) > 0
    # The last step's write-back went out at the end of train(): in the totals, no row.
    assert on.summary["offload/d2h_bytes"] > sum(r["offload/d2h_bytes"] for r in rows)


def test_strict_mode_poisons_state_until_it_is_waited_for(tmp_path):
    trainer = train(tmp_path, "hift.offload=true", "trainer.precision=bf16-mixed",
                    "model.dtype=bfloat16", steps=3)
    store, params = trainer.store, trainer.opt_params[0]
    master, state = params[0], trainer.optimizer.state[params[0]]
    assert master.numel() == 0 and state["exp_avg"].numel() == 0  # away: poisoned
    shape = store._layouts[0].entries[(master, None)][2]
    with pytest.raises(RuntimeError):  # what step 0 did before its group was fetched
        master.grad = torch.zeros(shape)
    store.prefetch(0)
    assert store.pending and master.numel() == 0  # on its way, not usable yet
    store.wait(0)
    assert not store.pending and master.dtype == torch.float32 and master.numel() > 0
    assert state is trainer.optimizer.state[params[0]]
    assert trainer.optimizer.state[params[0]]["exp_avg"].shape == master.shape
    store.release(0)  # put off: on the device until the next flush
    assert not store.pending and master.numel() > 0
    store.flush()
    assert store.pending == 1 and master.numel() == 0
    with store.readable():  # checkpoints read through this
        assert not store.pending and master.numel() > 0
        # nested: the outer block stays readable
        assert store.footprint(exact=True).exact_host_bytes > 0
        assert master.numel() > 0
    assert master.numel() == 0


def test_a_write_back_goes_out_once_the_next_forward_pass_is_queued(tmp_path, monkeypatch):
    # A copy engine serves its queue in order: a host read in the forward pass (a mask
    # check, the loss's nonzero, .item()) issued behind a write-back waits for all of it,
    # and the GPU idles meanwhile (measured on an H200). So a group's write-back goes out
    # during the next step, after that step's forward pass; the last one at the end.
    trainer = make(tmp_path, "hift.offload=true", steps=6)
    events = []
    trainer.model.register_forward_hook(lambda *_: events.append("forward"))
    trainer.after_update.append(lambda *_: events.append("update"))
    write_back = trainer.store._write_back
    monkeypatch.setattr(trainer.store, "_write_back",
                        lambda g, updated: events.append("write-back") or write_back(g, updated))
    trainer.train(evaluate=False)
    assert events == ["forward", "update"] + ["forward", "write-back", "update"] * 5 + [
        "write-back"]


def test_train_returns_with_every_write_back_done(tmp_path):
    trainer = train(tmp_path, "hift.offload=true", steps=4)
    assert trainer.store.pending == 0


def test_slots_are_reused_and_away_state_lives_in_host_buffers(tmp_path,
                                                               monkeypatch):
    # The plain (non-strict) path users get with hift.offload=true on a CPU: away state is
    # bound to views of the host buffers. The slots' buffer is allocated once, at the first
    # fetch, for the largest pair of groups that follow each other.
    monkeypatch.setenv("HIFT_STRICT_OFFLOAD", "0")
    trainer = train(tmp_path, "hift.offload=true", steps=6)
    store = trainer.store
    assert not store.strict and store._arena
    slot_ptrs = {dt: b.data_ptr() for dt, b in store._arena.items()}
    trainer.train(6)  # on to step 12
    assert {dt: b.data_ptr() for dt, b in store._arena.items()} == slot_ptrs
    for g, params in enumerate(trainer.opt_params):
        for p in params:
            for v in trainer.optimizer.state[p].values():
                if v.dim() > 0:
                    assert any(b.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                               for b in store._host[g].values())
        assert g not in store._resident  # after the last step every group is back on the host


def test_resident_groups_are_written_back_with_one_copy_per_dtype(tmp_path):
    trainer = train(tmp_path, "hift.offload=true", "trainer.precision=bf16-mixed",
                    "model.dtype=bfloat16", steps=9)
    # Cycle 0 creates each group's state outside the slots; from then on every tensor of
    # a resident group is a view of its slot.
    assert trainer.store.footprint().writebacks == {"per_tensor": 3, "flat": 6}


@pytest.mark.parametrize("optimizer,precision", [
    ("adamw", "bf16-mixed"), ("adamw", "fp32"),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in (("adafactor", "bf16-mixed"),
                                                         ("sgd", "fp32")))])
def test_host_memory_is_allocated_once_at_its_exact_size(tmp_path, optimizer,
                                                         precision):
    common = ("hift.offload=true", f"optimizer={optimizer}", f"trainer.precision={precision}",
              f"model.dtype={PRECISIONS[precision]}", "hift.strategy=random", "trainer.seed=3")
    trainer = train(tmp_path / "a", *common, steps=6)
    store = trainer.store
    # Exact: the bytes of every group's masters and non-scalar optimizer state, read off
    # the tensors; allocated: every host buffer the store ever asked for.
    exact = store.footprint(exact=True).exact_host_bytes
    with store.readable():
        masters = sum(p.numel() * 4 for ps in trainer.opt_params for p in ps) \
            if precision == "bf16-mixed" else 0
    assert exact > masters > 0 or (exact > 0 and precision == "fp32")
    # Each tensor starts 256-byte aligned: exact plus under 256 bytes per tensor.
    held = store.footprint()
    assert held.allocated_host_bytes == held.host_bytes == aligned_bytes(store) >= exact
    for layout in store._layouts.values():
        assert all(off * dtype.itemsize % 256 == 0 for dtype, off, _ in layout.entries.values())
    path = trainer.checkpoint(keep_last=1)
    resumed = make(tmp_path / "b", *common, steps=9)
    resumed.resume(path)
    resumed.train()
    assert resumed.store.footprint(exact=True).exact_host_bytes == exact
    assert resumed.store.footprint().allocated_host_bytes == aligned_bytes(resumed.store) == \
        store.footprint().host_bytes


def test_a_layout_that_was_not_predicted_is_learnt_at_the_first_update(tmp_path,
                                                                       monkeypatch):
    common = ("trainer.precision=bf16-mixed", "model.dtype=bfloat16", "hift.strategy=random")
    off = train(tmp_path / "off", *common, "hift.offload=false")

    def cannot_step(*args, **kwargs):  # an optimizer that steps nowhere but in training
        raise RuntimeError("no")

    monkeypatch.setattr(offload, "state_shapes", cannot_step)
    on = train(tmp_path / "on", *common, "hift.offload=true")
    assert_same(snapshot(off), snapshot(on))
    # Masters-only buffers first, then each group's whole layout once.
    assert on.store.footprint().allocated_host_bytes == (
        aligned_bytes(on.store, masters_only=True) + aligned_bytes(on.store))


def test_k_of_two_or_less_turns_offload_off(tiny_cfg, tmp_path):
    assert offload_enabled(tiny_cfg("hift.offload=true"), "cuda", 2) == (
        False, "2 group(s): the two device slots would hold every group's state anyway")
    assert offload_enabled(tiny_cfg(), "cuda", 3) == (True, "on")
    assert offload_enabled(tiny_cfg(), "cpu", 3)[0] is False
    paged = dataclasses.replace(tiny_cfg("hift.offload=true"),  # unvalidated: no CUDA here
                                optimizer={"_target_": "bitsandbytes.optim.PagedAdamW8bit"})
    assert offload_enabled(paged, "cuda", 8)[0] is False
    trainer = make(tmp_path, "hift.offload=true", "hift.k=2")
    assert not trainer.store.enabled
    assert estimate(tiny_cfg("hift.offload=true", "hift.k=2"))["offload"] is False
    assert estimate(tiny_cfg("hift.offload=true", "hift.k=3"))["offload"] is True
    assert estimate(tiny_cfg("hift.strategy=fpft", "hift.k=3"))["offload"] is False


def test_inputs_are_fetched_before_the_next_groups_state(tmp_path):
    trainer = make(tmp_path, "hift.offload=true", "trainer.grad_accum=2", steps=5)
    events = []
    next_batch, prefetch = trainer.stream.next, trainer.store.prefetch
    trainer.stream.next = lambda: events.append("batch") or next_batch()
    trainer.store.prefetch = lambda g: events.append(f"prefetch {g}") or prefetch(g)
    trainer.train()
    # Per step: both micro-batches, then this group's state (a no-op once it was fetched
    # by the step before), then the next group's.
    steps = [events[i: i + 4] for i in range(0, len(events), 4)]
    assert steps[0] == ["batch", "batch", "prefetch 0", "prefetch 1"]
    assert steps[1] == ["batch", "batch", "prefetch 1", "prefetch 2"]
    assert steps[-1] == ["batch", "batch", "prefetch 1"]  # the last step prefetches nothing


def test_bf16_mixed_trains_fp32_masters(tmp_path):
    trainer = train(tmp_path, "trainer.precision=bf16-mixed", "model.dtype=bfloat16",
                    "hift.offload=true", steps=6)
    with trainer.store.readable():
        for g, params in zip(trainer.groups, trainer.opt_params):
            for p, master in zip(g.params.values(), params):
                assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
                assert torch.equal(p.detach(), master.detach().to(torch.bfloat16))
        # The optimizer's state belongs to the masters, in fp32.
        state = next(iter(trainer.optimizer.state.values()))
        assert state["exp_avg"].dtype == torch.float32


def test_fpft_never_offloads(tmp_path):
    trainer = train(tmp_path, "hift.strategy=fpft", "hift.offload=true", steps=2)
    assert not trainer.store.enabled


@pytest.mark.parametrize("flag", ["fused", None])
def test_restored_step_counters_go_where_load_state_dict_puts_them(flag):
    # meta stands in for the CUDA device, where fused (and capturable, which needs CUDA to
    # step) AdamW keep `step`.
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = torch.optim.AdamW([p], **({flag: True} if flag else {}))
    p.grad = torch.ones(4, 4)
    opt.step()
    saved = {k: v for k, v in opt.state_dict().items()}
    saved["state"] = {i: {k: v.cpu() for k, v in s.items()} for i, s in saved["state"].items()}
    load_optimizer_state(opt, saved, None, torch.device("meta"))
    step = opt.state[p]["step"]
    assert step.device.type == ("meta" if flag else "cpu") and step.dtype == torch.float32
    assert opt.state[p]["exp_avg"].device.type == "cpu"  # the store takes it from there


def test_fused_adamw_with_offload_resumes_exactly(tmp_path):
    common = ("hift.offload=true", "+optimizer.fused=true", "trainer.precision=bf16-mixed",
              "model.dtype=bfloat16", "hift.strategy=random")
    straight = train(tmp_path / "straight", *common, steps=8)
    second, _ = stop_and_resume(lambda name: make(tmp_path / name, *common, steps=8),
                                4)
    second.train()
    assert_same(snapshot(straight), snapshot(second))


class InitializedAdamW(torch.optim.AdamW):
    """Behaves like bitsandbytes' 8-bit optimizers: the first step() of an instance that
    is not ``initialized`` moves every parameter's state to the parameter's device."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initialized = False
        self.moved_everything = False

    def step(self, closure=None):
        if not self.initialized:
            self.moved_everything = bool(self.state)
            self.initialized = True
        return super().step(closure)


def test_resume_marks_a_bitsandbytes_style_optimizer_initialized(tmp_path):
    target = f"optimizer._target_={__name__}.InitializedAdamW"
    first = train(tmp_path / "a", "hift.offload=true", target, steps=3)
    assert not first.optimizer.moved_everything  # a fresh run has no state at step 1
    path = first.checkpoint(keep_last=1)
    second = make(tmp_path / "b", "hift.offload=true", target, steps=6)
    second.resume(path)
    second.train()
    assert second.optimizer.initialized and not second.optimizer.moved_everything


def test_8bit_optimizer_without_bitsandbytes_is_one_clear_error(tiny_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'hift-cli\[8bit\]'"):
        tiny_cfg("optimizer=adamw8bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_8bit_optimizer_without_cuda_is_one_clear_error(tiny_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        tiny_cfg("optimizer=paged_adamw8bit")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_cuda_offload_matches_and_reuses_buffers(tmp_path, precision):
    dtype = "float32" if precision == "fp32" else "bfloat16"
    common = ("trainer.device=cuda", f"trainer.precision={precision}", f"model.dtype={dtype}",
              "hift.strategy=random", f"trainer.seed={REPEAT_SEED}")
    off = train(tmp_path / "off", *common, "hift.offload=false", steps=18)
    on = train(tmp_path / "on", *common, "hift.offload=true", steps=9)
    slots = {dt: b.data_ptr() for dt, b in on.store._arena.items()}
    on.train(9)  # on to step 18
    assert {dt: b.data_ptr() for dt, b in on.store._arena.items()} == slots
    assert_same(snapshot(off), snapshot(on))
    assert all(b.is_pinned() for bufs in on.store._host.values() for b in bufs.values())
    assert on.store.footprint().allocated_host_bytes == aligned_bytes(on.store)


@pytest.mark.parametrize("strategy,elements", [("bottom2up", 704), ("random", 1280)])
@pytest.mark.parametrize("strict", [False, True])
def test_the_slots_hold_the_largest_pair_of_groups_that_follow_each_other(strategy, elements,
                                                                          strict):
    # Groups of 64, 640, 64 and 640 elements: in bottom2up order a large group always
    # follows a small one (two slots of the largest group would be 1280 elements); in a
    # random order any two can follow each other.
    store, groups, twins, opt, reference = store_by_hand([64, 640, 64, 640], strategy, 1, 12,
                                                         strict=strict)
    assert {dt: b.numel() for dt, b in store._arena.items()} == {torch.float32: elements}
    assert store.footprint().device_bytes == 4 * elements
    with store.readable():
        for ps, ts in zip(groups, twins):
            for p, t in zip(ps, ts):
                assert torch.equal(p, t)
                assert torch.equal(opt.state[p]["momentum_buffer"],
                                   reference.state[t]["momentum_buffer"])
