"""The hierarchical loop on the tiny LLaMA: what changes, when, and that it learns."""

import pytest
import torch

from helpers import assert_same, build_trainer, losses, metrics, snapshot
from hift_cli.config import ConfigError
from hift_cli.update import StepResult, Update


def make_trainer(tmp_path, *overrides):
    return build_trainer(tmp_path, *overrides)


def run_steps(trainer, n):
    return trainer.train(n)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}



@pytest.mark.parametrize("strategy", ["bottom2up", "top2down", "random"])
def test_one_step_changes_only_the_active_group(tmp_path, strategy):
    trainer = make_trainer(tmp_path, f"hift.strategy={strategy}", "hift.k=3")
    before = weights(trainer.model)
    run_steps(trainer, 1)
    active = trainer.groups[trainer.schedule.group_at(0)]
    assert changed(before, trainer.model) == set(active.params)
    # Frozen groups never got a gradient, nor optimizer state.
    state_params = {id(p) for p in trainer.optimizer.state}
    assert state_params == {id(p) for p in active.params.values()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_one_cycle_changes_every_parameter(tmp_path, optimizer):
    trainer = make_trainer(tmp_path, f"optimizer={optimizer}", "hift.k=4")
    before = weights(trainer.model)
    for step in range(4):
        prev = weights(trainer.model)
        run_steps(trainer, 1)
        assert changed(prev, trainer.model) == set(trainer.groups[step].params)
    assert changed(before, trainer.model) == set(before)


def test_optimizer_state_persists_across_cycles(tmp_path):
    trainer = make_trainer(tmp_path, "hift.k=3")
    run_steps(trainer, 3)
    p = next(iter(trainer.groups[0].params.values()))
    momentum = trainer.optimizer.state[p]["exp_avg"].clone()
    assert float(trainer.optimizer.state[p]["step"]) == 1
    run_steps(trainer, 2)  # group 0 then 1 of cycle 1
    # Momentum continued (bias correction counts this parameter's own updates).
    assert float(trainer.optimizer.state[p]["step"]) == 2
    assert not torch.equal(trainer.optimizer.state[p]["exp_avg"], momentum)


def test_lr_steps_once_per_cycle(tmp_path):
    trainer = make_trainer(tmp_path, "hift.k=3", "trainer.lr_scheduler=linear",
                           "trainer.max_steps=9", "optimizer.lr=0.003")
    trainer.train()
    lrs = [r["lr"] for r in metrics(tmp_path, "lr")]
    # 3 cycles, linear decay sized in cycles: lr_c = lr * (3 - c) / 3, same within a cycle.
    expected = [0.003 * (3 - c) / 3 for c in range(3) for _ in range(3)]
    assert lrs == pytest.approx(expected)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0)  # ends at the end


def test_warmup_is_counted_in_cycles(tmp_path):
    trainer = make_trainer(tmp_path, "hift.k=2", "trainer.lr_scheduler=linear",
                           "trainer.warmup_cycles=2", "trainer.max_steps=8",
                           "optimizer.lr=0.004")
    trainer.train()
    lrs = [r["lr"] for r in metrics(tmp_path, "lr")]
    assert lrs == pytest.approx([0.0, 0.0, 0.002, 0.002, 0.004, 0.004, 0.002, 0.002])


def test_grad_accum_keeps_the_group_for_the_whole_window(tmp_path):
    trainer = make_trainer(tmp_path, "hift.k=3", "trainer.grad_accum=3")
    seen = []

    def record(module, args, kwargs):
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        seen.append(next(g.index for g in trainer.groups
                         if {id(p) for p in g.params.values()} == trainable))

    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    run_steps(trainer, 3)
    assert seen[:9] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_no_graph_below_the_active_group(tmp_path):
    trainer = make_trainer(tmp_path, "hift.k=6")  # one unit per group
    blocks = trainer.model.model.layers
    outputs = {}
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
    trainer.update.activate(trainer.groups[3])  # block.2
    batch = next(trainer.stream.batches)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = trainer.model(**batch).loss
    out = {i: (o[0] if isinstance(o, tuple) else o) for i, o in outputs.items()}
    assert not out[0].requires_grad and not out[1].requires_grad  # no graph below
    assert out[2].requires_grad and out[3].requires_grad
    loss.backward()
    with_grad = {n for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainer.groups[3].params)
    # Top unit active instead: far fewer tensors saved for backward.
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.update.activate(trainer.groups[5])
    saved_top = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_top.append(t) or t,
                                                  lambda t: t):
        trainer.model(**batch).loss.backward()
    assert len(saved_top) < len(saved) / 2


def test_gradient_checkpointing_with_frozen_lower_layers(tmp_path):
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / str(ckpt), "hift.k=6",
                               f"model.gradient_checkpointing={str(ckpt).lower()}")
        trainer.model.eval()  # no dropout differences between the two runs
        trainer.update.activate(trainer.groups[2])  # block.1: frozen embeddings + block.0 below
        below = []
        trainer.model.model.layers[0].register_forward_hook(
            lambda m, a, out: below.append(out[0] if isinstance(out, tuple) else out))
        trainer.model(**next(trainer.stream.batches)).loss.backward()
        assert not below[0].requires_grad  # still no graph below the active group
        grads[ckpt] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                       if p.grad is not None}
    assert set(grads[True]) == set(grads[False]) and grads[True]
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n])


@pytest.mark.parametrize("strategy,k", [("bottom2up", 3), ("top2down", 3), ("random", 3),
                                        ("fpft", 1)])
def test_hift_and_fpft_lower_the_loss(tmp_path, strategy, k):
    trainer = make_trainer(tmp_path, f"hift.strategy={strategy}", f"hift.k={k}",
                           "trainer.eval_before=true", "trainer.max_steps=30")
    metrics = trainer.train()
    # A random-init model starts near uniform over the 384-token vocabulary.
    assert metrics["eval/loss_before"] == pytest.approx(torch.log(torch.tensor(384.0)).item(),
                                                        abs=0.1)
    assert metrics["eval/loss"] < metrics["eval/loss_before"] - 1.0


def test_bf16_autocast_runs_and_learns(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.precision=bf16-autocast",
                           "trainer.eval_before=true", "trainer.max_steps=15")
    metrics = trainer.train()
    assert metrics["eval/loss"] < metrics["eval/loss_before"] - 0.5


def test_pure_bf16_weights(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.precision=bf16", "model.dtype=bfloat16",
                           "trainer.max_steps=3")
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    before = weights(trainer.model)
    trainer.train()
    assert changed(before, trainer.model) == set(before)


def test_grad_accum_is_the_gradient_of_the_whole_window(tmp_path):
    """2 micro-batches of 4 = 1 batch of 8: each micro-batch counts by its label tokens,
    not 1/grad_accum (which would overweight the one with fewer tokens)."""
    from safetensors.torch import load_file

    from hift_cli.cli import main

    common = ["recipe=tiny", "optimizer=sgd", "optimizer.lr=0.5", "trainer.max_steps=4",
              "trainer.eval_before=false", "data.max_eval_samples=4"]
    assert main(["train", *common, "trainer.batch_size=4", "trainer.grad_accum=2",
                 f"hydra.run.dir={tmp_path / 'accum'}"]) == 0
    assert main(["train", *common, "trainer.batch_size=8",
                 f"hydra.run.dir={tmp_path / 'whole'}"]) == 0
    a = load_file(tmp_path / "accum" / "model" / "model.safetensors")
    b = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_train_in_chunks_equals_one_call(tmp_path):
    """train(num_steps) goes on where the last call stopped: the same numbers as one call."""
    opts = ("hift.k=3", "hift.strategy=random", "trainer.max_steps=7",
            "trainer.lr_scheduler=linear", "hift.offload=true")
    whole = make_trainer(tmp_path / "whole", *opts)
    whole.train(evaluate=False)
    chunked = make_trainer(tmp_path / "chunked", *opts)
    for n in (2, 1, 3):
        chunked.train(n, evaluate=False)
    chunked.train(evaluate=False)  # the rest: one step, to trainer.max_steps
    assert chunked.global_step == whole.global_step == 7
    assert_same(snapshot(whole), snapshot(chunked))
    assert losses(tmp_path / "whole") == losses(tmp_path / "chunked")


def test_train_takes_injected_batches_and_can_skip_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, "hift.k=3", "trainer.eval_every=1",
                           "trainer.eval_before=true")
    fixed = {"input_ids": torch.full((2, 5), 7), "attention_mask": torch.ones(2, 5, dtype=int),
             "labels": torch.full((2, 5), 7)}
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    summary = trainer.train(2, evaluate=False, batches=iter([fixed] * 2))
    assert len(seen) == 2 and all(torch.equal(s, fixed["input_ids"]) for s in seen)
    assert all("eval/loss" not in r for r in metrics(tmp_path)) and "eval/loss" not in summary
    summary = trainer.train(1, batches=iter([fixed]))  # evaluations back on: before and after
    evals = metrics(tmp_path, "eval/loss")
    assert [r["step"] for r in evals] == [2, 3] and "eval/loss_before" in summary


class PlainSGD(Update):
    """A rule of one's own: SGD on every parameter, the window's losses weighted."""

    def __init__(self, trainer):
        self.model, self.seen = trainer.model, []
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)

    def step(self, step, stop, window):
        self.seen.append((step, stop, len(window.batches), sum(window.weights), window.tokens))
        for p in self.model.parameters():
            p.requires_grad_(True)
        loss = sum(self.model(**b).loss * w for b, w in zip(window.batches, window.weights))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.item(), 0.05, finite=True, updated=123)

    def summary(self):
        return {"rule": "plain SGD"}


def test_another_update_rule_runs_through_the_same_loop(tmp_path):
    """train(update=rule): the rule gets each step's window (grad_accum micro-batches
    weighted by their share of the loss items); the loop writes the rows, evaluates on
    schedule and sums the summary, as for HiFT's own rule."""
    trainer = build_trainer(tmp_path, "hift.strategy=fpft", "trainer.max_steps=4",
                            "trainer.grad_accum=2", "trainer.eval_every=2")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rule = PlainSGD(trainer)
    summary = trainer.train(update=rule)
    assert [s[:3] for s in rule.seen] == [(i, 4, 2) for i in range(4)]
    assert all(s[3] == pytest.approx(1.0) and s[4] > 0 for s in rule.seen)
    rows = metrics(tmp_path, "train/loss")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["lr"] == 0.05 and "group" not in r for r in rows)
    assert [r["step"] for r in metrics(tmp_path, "eval/loss")] == [2, 4]
    assert summary["rule"] == "plain SGD" and summary["train/params_updated_per_step"] == 123
    assert trainer.global_step == 4 and trainer.batches_consumed == 8
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every parameter moved: the rule's update, not HiFT's
    assert all(p.grad is None for p in trainer.optimizer.param_groups[0]["params"])


def test_another_update_rule_saves_no_checkpoint(tmp_path):
    trainer = build_trainer(tmp_path, "hift.strategy=fpft", "trainer.max_steps=2",
                            "trainer.save_every=1")
    with pytest.raises(ConfigError, match="PlainSGD has no resumable state"):
        trainer.train(update=PlainSGD(trainer))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first step
