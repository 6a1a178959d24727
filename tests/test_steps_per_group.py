"""hift.steps_per_group (K): a group stays active for K steps; a cycle is k x K steps; the
LR steps once per cycle; state moves only at switches; resume mid-group is exact."""

import math
import random

import pytest

from helpers import assert_resume_is_exact, build_trainer, compose_config, metrics
from hift_cli.config import ConfigError
from hift_cli.memory import estimate


def expected_groups(strategy: str, k: int, K: int, seed: int, steps: int) -> list[int]:
    """Written from the definition, not from GroupSchedule: cycle c's order (bottom2up:
    0..k-1; top2down reversed; random: the seeded shuffle of cycle c), each entry K times."""
    out = []
    for c in range(math.ceil(steps / (k * K))):
        order = list(range(k))
        if strategy == "top2down":
            order.reverse()
        elif strategy == "random":
            random.Random(seed * 1_000_003 + c).shuffle(order)
        out += [g for g in order for _ in range(K)]
    return out[:steps]


def expected_lr(base: float, step: int, k: int, K: int, max_steps: int, warmup: int) -> float:
    """Linear schedule with warmup, counted in cycles of k x K steps."""
    c, n = step // (k * K), math.ceil(max_steps / (k * K))
    if c < warmup:
        return base * c / warmup
    return base * max(0.0, (n - c) / max(1, n - warmup))


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("strategy", ["bottom2up", "top2down", "random"])
def test_group_sequence_and_lr_follow_k_times_K_cycles(tmp_path, strategy, K):
    k, steps, warmup = 3, 2 * 3 * 3 + 4, 1  # K=3: two cycles of 9 steps and part of one
    t = build_trainer(tmp_path, f"hift.strategy={strategy}", f"hift.k={k}",
                      f"hift.steps_per_group={K}", f"trainer.max_steps={steps}",
                      "trainer.lr_scheduler=linear", f"trainer.warmup_cycles={warmup}",
                      "trainer.seed=5", "optimizer.lr=1e-3")
    t.train(evaluate=False)
    rows = metrics(tmp_path, "group")
    assert [r["group"] for r in rows] == expected_groups(strategy, k, K, 5, len(rows))
    assert [r["cycle"] for r in rows] == [i // (k * K) for i in range(len(rows))]
    assert len(rows) == steps  # trainer.max_steps as given (epochs round up: below)
    for i, r in enumerate(rows):
        assert r["lr"] == pytest.approx(expected_lr(1e-3, i, k, K, len(rows), warmup)), i


def test_state_moves_only_at_switches_with_offload(tmp_path):
    t = build_trainer(tmp_path, "hift.k=3", "hift.steps_per_group=4", "hift.offload=true",
                      "trainer.max_steps=24")
    t.train(evaluate=False)
    rows = metrics(tmp_path, "group")
    # From the 2nd cycle on (every group's state exists): the last step of a group's K
    # fetches the next group, its first step writes the previous one back (once the
    # forward pass is queued), the steps between copy nothing; the last step of the run
    # fetches nothing and its group goes back at the end of train().
    for before, r, after in zip(rows[11:], rows[12:], rows[13:]):
        if before["group"] == r["group"] == after["group"]:
            assert r["offload/d2h_bytes"] == 0 and r["offload/h2d_bytes"] == 0, r["step"]
    assert [r["step"] for r in rows[12:] if r["offload/d2h_bytes"] > 0] == [13, 17, 21]
    assert [r["step"] for r in rows[12:] if r["offload/h2d_bytes"] > 0] == [16, 20]


def test_resume_in_the_middle_of_a_groups_steps_is_exact_with_offload(tmp_path):
    # k=3, K=3: step 13 is the 2nd of group 1's three steps in cycle 1 (strict offload).
    make = lambda name: build_trainer(tmp_path / name, "hift.k=3", "hift.steps_per_group=3",
                                      "hift.strategy=random", "hift.offload=true",
                                      "trainer.max_steps=27", "trainer.warmup_cycles=1")
    assert_resume_is_exact(make, tmp_path, steps=13)


def test_resume_refuses_other_steps_per_group(tmp_path):
    from hift_cli.checkpoint import CheckpointError

    first = build_trainer(tmp_path / "a", "hift.k=2", "hift.steps_per_group=2",
                          "trainer.max_steps=8")
    first.train(3, evaluate=False)
    path = first.checkpoint(keep_last=1)
    second = build_trainer(tmp_path / "b", "hift.k=2", "trainer.max_steps=8")
    with pytest.raises(CheckpointError, match="hift.steps_per_group=2"):
        second.resume(path)


def test_epochs_round_up_to_cycles_of_k_times_K(tmp_path):
    t = build_trainer(tmp_path, "hift.k=2", "hift.steps_per_group=5", "trainer.max_steps=null",
                      "trainer.epochs=1", "data.max_samples=24", "trainer.batch_size=4")
    assert t.plan.max_steps == 10  # 6 batches -> one cycle of 2 x 5


def test_warmup_ratio_is_a_share_of_the_cycles(tmp_path):
    t = build_trainer(tmp_path, "hift.k=2", "hift.steps_per_group=2", "trainer.max_steps=40",
                      "trainer.warmup_ratio=0.2", "trainer.lr_scheduler=linear")
    assert t.scheduler.lr_lambdas[0](1) == pytest.approx(1 / 2)  # 2 of 10 cycles


def test_warmup_cycles_on_the_command_line_replace_a_recipes_ratio():
    assert compose_config("trainer.warmup_cycles=3", recipe="minilm_family").trainer \
        .warmup_ratio is None
    assert compose_config(recipe="minilm_family").trainer.warmup_ratio == 0.1


@pytest.mark.parametrize("bad", ["hift.steps_per_group=0", "trainer.warmup_ratio=1.5"])
def test_bad_values_are_one_line(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        compose_config(bad)


def test_estimate_counts_transfers_per_step_with_K():
    one = estimate(compose_config("hift.k=4", "hift.offload=true", "trainer.device=cpu"))
    four = estimate(compose_config("hift.k=4", "hift.offload=true", "hift.steps_per_group=4",
                                   "trainer.device=cpu"))
    assert four["steps_per_group"] == 4
    assert one["transfer"]["bytes_per_cycle"] == four["transfer"]["bytes_per_cycle"] > 0
    assert four["transfer"]["bytes_per_step"] == one["transfer"]["bytes_per_step"] / 4
