"""What tests share besides fixtures (tests/conftest.py): composing configs, set-up
trainers, reading a run's metrics, snapshots of the trained state, resume checks, a state
store driven by hand. Imported as ``from helpers import ...`` (pytest puts tests/ on the
path)."""

import functools
import json
from pathlib import Path

import torch
from hift_cli.config import Config, compose
from hift_cli.engine import HiftTrainer


def metrics(run_dir, having: str | None = None) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``, in order; ``having``: only rows with that key
    (``"train/loss"``: the training steps, ``"eval/loss"``: the evaluations)."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows if having is None else [r for r in rows if having in r]


def losses(run_dir) -> list[float]:
    """The training loss of every step of a run, in order."""
    return [r["train/loss"] for r in metrics(run_dir, "train/loss")]


def compose_config(*overrides: str, recipe: str = "tiny") -> Config:
    """Compose ``recipes/`` the way ``hift train`` does, and validate it."""
    return compose([f"recipe={recipe}", *overrides])


def build_trainer(output_dir, *overrides: str, recipe: str = "tiny",
                  store_delays=None) -> HiftTrainer:
    """A set-up trainer (the tiny LLaMA by default) that does not evaluate before training
    and saves no model at its end (``store_delays``: the state store's offload.Delays)."""
    trainer = HiftTrainer(compose_config("trainer.eval_before=false", "trainer.save_model=false",
                                         *overrides, recipe=recipe), output_dir)
    trainer.store_delays = store_delays
    trainer.setup()
    return trainer


def stop_and_resume(make, steps: int, **train_kwargs):
    """``make(name)`` -> a set-up trainer in its own run dir. Trains ``first`` for
    ``steps`` steps and checkpoints it; returns a fresh ``second`` resumed from that
    checkpoint (not trained yet) and the checkpoint's path."""
    first = make("first")
    first.train(steps, **train_kwargs)
    path = first.checkpoint(keep_last=1)
    second = make("second")
    second.resume(path)
    return second, path


def assert_resume_is_exact(make, root, steps: int, before_rest=None):
    """A straight run (``make("straight")``, a set-up trainer in ``root / name``) against
    one stopped after ``steps`` steps and resumed in a fresh trainer: the same weights,
    masters and optimizer state, and the same losses. ``before_rest(second)`` runs on the
    resumed trainer before it trains on. Returns the checkpoint's path."""
    straight = make("straight")
    straight.train(evaluate=False)
    second, path = stop_and_resume(make, steps, evaluate=False)
    if before_rest is not None:
        before_rest(second)
    second.train(evaluate=False)
    assert_same(snapshot(straight), snapshot(second))
    straight_losses, first, rest = (losses(root / name) for name in ("straight", "first", "second"))
    assert straight_losses == first + rest
    return path


def snapshot(trainer):
    """Weights, masters and optimizer state (tensors only), read through the store: the
    groups' and the always-active units'."""
    with trainer.store.readable():
        out = {f"w/{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
        for g, params in enumerate([*trainer.opt_params, trainer.always_opt]):
            for i, p in enumerate(params):
                if trainer.masters:
                    out[f"m/{g}/{i}"] = p.detach().clone()
                for key, v in trainer.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        out[f"s/{g}/{i}/{key}"] = v.detach().clone()
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def store_by_hand(sizes, strategy: str, seed: int, steps: int, **store_kwargs):
    """A GroupStateStore over one SGD-with-momentum parameter per group (``sizes``
    elements), trained ``steps`` steps by hand in ``strategy``'s order beside an identical
    optimizer that keeps everything in place. Returns ``(store, groups, twins, opt,
    reference)``: the store's parameters and the reference's twins, and both optimizers."""
    from hift_cli.grouping import GroupSchedule
    from hift_cli.offload import GroupStateStore

    torch.manual_seed(0)
    groups = [[torch.nn.Parameter(torch.randn(n))] for n in sizes]
    twins = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in groups]
    factory = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    opt, reference = (factory([p for ps in gs for p in ps]) for gs in (groups, twins))
    schedule = GroupSchedule(strategy, len(sizes), seed=seed)
    store = GroupStateStore(opt, groups, torch.device("cpu"), True, factory=factory,
                            pairs=schedule.pairs(), **store_kwargs)
    for step in range(steps):
        g, nxt = schedule.group_at(step), schedule.group_at(step + 1)
        store.prefetch(g)
        for p, twin in zip(groups[g], twins[g]):
            p.grad, twin.grad = torch.full_like(p, step + 1.0), torch.full_like(p, step + 1.0)
        store.flush()  # as the engine: once the step's forward pass is queued
        store.prefetch(nxt)
        store.wait(g)
        with store.updating(g):
            opt.step()
        reference.step()
        opt.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        store.release(g)
    return store, groups, twins, opt, reference
