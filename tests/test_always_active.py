"""hift.always_active: units trained at every step besides the active group.

Their parameters change at every step and their optimizer state counts every step; the k
groups (made of the other units) keep their own turns. Their state and fp32 masters stay
on the device, out of the offload store, so strict offload mode never poisons them.
"""

import logging

import pytest
import torch

from helpers import assert_resume_is_exact, assert_same, build_trainer, snapshot
from hift_cli.checkpoint import CheckpointError
from hift_cli.cli import main
from hift_cli.offload import load_optimizer_state

COMMON = ("hift.k=3", "data.max_eval_samples=4", "trainer.max_steps=8")
MIXED = ("trainer.precision=bf16-mixed", "hift.offload=true")


def make(tmp_path, *overrides):
    return build_trainer(tmp_path, *COMMON, *overrides)


def step(trainer):
    trainer.train(1, evaluate=False)


def updated(trainer):
    """What the optimizer updates, by model parameter name: the fp32 masters in bf16-mixed
    (bf16 weights may round a small update away), else the weights; read through the store."""
    pieces = [pc for pcs in trainer.update.all_pieces() for pc in pcs]
    with trainer.store.readable():
        return {pc.name: master.detach().clone()
                for pc, master in zip(pieces, trainer.masters.of(pieces))}


def steps_of(trainer, params):
    with trainer.store.readable():
        return {int(trainer.optimizer.state[p]["step"]) if p in trainer.optimizer.state else 0
                for p in params}


@pytest.mark.parametrize("opts", [(), MIXED], ids=["fp32", "bf16-mixed-offload"])
def test_always_active_units_train_at_every_step(tmp_path, opts):
    trainer = make(tmp_path, "hift.always_active=[head]", "hift.strategy=random",
                   *opts)
    head = {n for u in trainer.always for n in u.params}
    assert [u.name for u in trainer.always] == ["head"] and head
    assert not head & {n for g in trainer.groups for n in g.params}  # in no group
    assert sum(len(g.units) for g in trainer.groups) == len(trainer.units) - 1
    assert trainer.store.enabled == bool(opts)
    turns = [0] * len(trainer.groups)
    for n in range(1, 8):
        before = updated(trainer)
        step(trainer)
        after = updated(trainer)
        group = trainer.groups[trainer.schedule.group_at(n - 1)]
        turns[group.index] += 1
        changed = {k for k in after if not torch.equal(before[k], after[k])}
        assert changed == set(group.params) | head, n
        # AdamW's per-parameter step: every step for the head, own turns for the groups.
        assert steps_of(trainer, trainer.always_opt) == {n}
        for g, params in enumerate(trainer.opt_params):
            assert steps_of(trainer, params) == {turns[g]}
    if opts:  # bf16-mixed: fp32 masters; their state stays on the device, never poisoned
        for p in trainer.always_opt:
            assert p.dtype == torch.float32 and p.numel() > 0
            assert trainer.optimizer.state[p]["exp_avg"].shape == p.shape


def test_offload_with_always_active_changes_no_numbers(tmp_path):
    opts = ("hift.always_active=[embeddings,head]", "trainer.precision=bf16-mixed")
    off = make(tmp_path / "off", *opts, "hift.offload=false")
    off.train(evaluate=False)
    on = make(tmp_path / "on", *opts, "hift.offload=true")
    on.train(evaluate=False)
    assert on.store.enabled and on.store.strict
    assert [u.name for u in on.always] == ["embeddings", "head"]
    assert_same(snapshot(off), snapshot(on))


def test_resume_with_always_active_is_exact(tmp_path):
    opts = ("hift.always_active=[head]", "hift.strategy=random", "trainer.lr_scheduler=linear",
            *MIXED)

    def resumed_at_step_5(second):
        assert steps_of(second, second.always_opt) == {5}

    path = assert_resume_is_exact(lambda name: make(tmp_path / name, *opts),
                                  tmp_path, 5, resumed_at_step_5)

    other = make(tmp_path / "other", *MIXED, "hift.strategy=random")
    with pytest.raises(CheckpointError, match=r"saved with hift.always_active=\[head\]: resume"):
        other.resume(path)


def test_restored_always_active_state_goes_to_the_device():
    # Offload on: other state stays on the CPU for the store; always-active state must be
    # where the step runs (the meta device stands in for a GPU here).
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([a, b])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    load_optimizer_state(opt, opt.state_dict(), None, torch.device("meta"), {id(b)})
    assert opt.state[a]["exp_avg"].device.type == "cpu"
    assert opt.state[b]["exp_avg"].device.type == "meta"


def test_data_parallel_syncs_the_always_active_gradients(tmp_path):
    trainer = make(tmp_path, "hift.always_active=[embeddings]", "trainer.max_steps=3")
    attached = []

    class Sync:  # stands in for distributed.GradSync on one process
        def attach(self, params):
            attached.append({id(p) for p in params})

        def arm(self, on):
            pass

        def finish(self):
            return 0

    trainer.grad_sync = Sync()
    trainer.train(evaluate=False)
    embeddings = {id(p) for p in trainer.always_params}
    assert len(attached) == 3  # one per group switch
    for group, ids in zip(trainer.groups, attached):
        assert ids == embeddings | {id(p) for p in group.params.values()}


def test_fpft_ignores_always_active(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hift_cli.build")
    trainer = make(tmp_path, "hift.strategy=fpft", "hift.always_active=[head]",
                   "trainer.max_steps=2")
    trainer.train(evaluate=False)
    assert len(trainer.groups) == 1 and trainer.always == []
    assert "hift.always_active is ignored: fpft" in caplog.text


def test_an_unknown_unit_is_one_line_naming_the_units(tmp_path, capsys):
    code = main(["train", "recipe=tiny", "hift.always_active=[head,block.9]",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert line.endswith("hift.always_active: no unit 'block.9' in this model (units:"
                         " embeddings, block.0, block.1, block.2, block.3, head)")
