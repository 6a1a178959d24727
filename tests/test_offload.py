"""The per-group state store: moving state off the device changes no numbers."""

import importlib.util
import json

import pytest
import torch

from hift_cli.config import ConfigError
from hift_cli.engine import HiftTrainer
from hift_cli.grouping import GroupSchedule

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "bf16-mixed": "bfloat16"}


def train(tiny_cfg, tmp_path, *overrides, steps=8):
    cfg = tiny_cfg("trainer.eval_before=false", "trainer.save_model=false", "hift.k=3",
                   f"trainer.max_steps={steps}", "data.max_eval_samples=4", *overrides)
    trainer = HiftTrainer(cfg, tmp_path)
    trainer.setup()
    trainer.train()
    return trainer


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_offload_gives_the_same_weights(tiny_cfg, tmp_path, optimizer, precision):
    common = (f"optimizer={optimizer}", f"trainer.precision={precision}",
              f"model.dtype={PRECISIONS[precision]}", "hift.strategy=random")
    off = train(tiny_cfg, tmp_path / "off", *common, "hift.offload=false")
    on = train(tiny_cfg, tmp_path / "on", *common, "hift.offload=true")
    assert on.store.enabled and not off.store.enabled
    a, b = weights(off), weights(on)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    moved = [r for r in rows if "offload/d2h_bytes" in r]
    assert all(r["offload/d2h_bytes"] > 0 for r in moved)  # every update went back out
    assert sum(r["offload/h2d_bytes"] for r in moved) > 0


def _storage_in(t, buffers):
    return any(b.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
               for b in buffers.values())


def test_inactive_state_lives_in_host_buffers_and_slots_are_reused(tiny_cfg, tmp_path):
    # State appears in cycle 0; slots fill and grow while each meets every group (two
    # slots, three groups: a 6-step rotation), and are only reused after that.
    trainer = train(tiny_cfg, tmp_path, "hift.offload=true", steps=9)
    store = trainer.store
    slot_ptrs = [{dt: b.data_ptr() for dt, b in slot.items()} for slot in store.slots]
    trainer.cfg.trainer.max_steps = 18
    trainer.train()
    assert [{dt: b.data_ptr() for dt, b in slot.items()} for slot in store.slots] == slot_ptrs
    for g, params in enumerate(trainer.opt_params):
        in_host = all(_storage_in(v, store.host[g]) for p in params
                      for v in trainer.optimizer.state[p].values() if v.dim() > 0)
        # After the last step every group has gone back to host memory.
        assert in_host and g not in store.resident


def test_bf16_mixed_trains_fp32_masters(tiny_cfg, tmp_path):
    trainer = train(tiny_cfg, tmp_path, "trainer.precision=bf16-mixed", "model.dtype=bfloat16",
                    "hift.offload=true", steps=6)
    for g, params in zip(trainer.groups, trainer.opt_params):
        for p, master in zip(g.params.values(), params):
            assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
            assert torch.equal(p.detach(), master.detach().to(torch.bfloat16))
    # The optimizer's state belongs to the masters, in fp32.
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32


def test_a_group_repeated_across_cycles_stays_on_the_device(tiny_cfg, tmp_path):
    seed = next(s for s in range(100)
                if GroupSchedule("random", 3, s).order(0)[-1]
                == GroupSchedule("random", 3, s).order(1)[0])
    common = ("hift.strategy=random", f"trainer.seed={seed}")
    off = train(tiny_cfg, tmp_path / "off", *common, "hift.offload=false", steps=6)
    on = train(tiny_cfg, tmp_path / "on", *common, "hift.offload=true", steps=6)
    rows = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    assert rows[2]["group"] == rows[3]["group"] and rows[2]["offload/d2h_bytes"] == 0
    a, b = weights(off), weights(on)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_fpft_never_offloads(tiny_cfg, tmp_path):
    trainer = train(tiny_cfg, tmp_path, "hift.strategy=fpft", "hift.offload=true", steps=2)
    assert not trainer.store.enabled


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
def test_cuda_offload_matches_and_reuses_buffers(tiny_cfg, tmp_path, precision):
    dtype = "float32" if precision == "fp32" else "bfloat16"
    common = ("trainer.device=cuda", f"trainer.precision={precision}", f"model.dtype={dtype}")
    off = train(tiny_cfg, tmp_path / "off", *common, "hift.offload=false", steps=18)
    on = train(tiny_cfg, tmp_path / "on", *common, "hift.offload=true", steps=9)
    slots = [{dt: b.data_ptr() for dt, b in s.items()} for s in on.store.slots]
    on.cfg.trainer.max_steps = 18
    on.train()
    assert [{dt: b.data_ptr() for dt, b in s.items()} for s in on.store.slots] == slots
    a, b = weights(off), weights(on)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    host = next(iter(on.store.host[0].values()))
    assert host.is_pinned()
