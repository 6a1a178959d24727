"""hift.k=auto under hift.memory_budget, balanced grouping, and the always-active units in
the estimate: each checked against the estimator run with explicit settings."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM,
                          AutoModelForSequenceClassification)

from helpers import compose_config
from hift_cli.cli import main
from hift_cli.grouping import find_units, make_groups
from hift_cli.memory import Estimator, estimate
from test_architectures import ARCHS as MODEL_ARCHS
from test_architectures import CLASSIFIERS
from test_grouping import ARCHS as GROUPING_ARCHS

GIB = 2**30
CPU = "trainer.device=cpu"


def peak(*overrides: str) -> int:
    return estimate(compose_config(*overrides))["hift"]["total"]


def expected_k(budget_bytes: float, *overrides: str) -> int | None:
    """The fewest balanced groups whose estimated peak fits, scanning k = 1, 2, ..."""
    for k in range(1, 7):  # recipe=tiny: 6 units
        if peak(*overrides, f"hift.k={k}", "hift.grouping=balanced") <= budget_bytes:
            return k
    return None


@pytest.mark.slow
@pytest.mark.parametrize("device", [CPU, "trainer.device=auto"])  # auto: the CUDA rule
def test_auto_picks_the_fewest_groups_that_fit(device):
    peaks = sorted({peak(device, f"hift.k={k}", "hift.grouping=balanced")
                    for k in range(1, 7)})
    assert len(peaks) >= 3  # the budgets below pick different k
    # Each distinct peak exactly, and halfway between neighbours.
    budgets = peaks + [(a + b) / 2 for a, b in zip(peaks, peaks[1:])]
    chosen = set()
    for budget in budgets:
        gib = budget / GIB * (1 + 1e-12)
        want = expected_k(gib * GIB, device)
        # No reserve: the tiny model's budgets are a few MiB (the reserve has its own test).
        report = estimate(compose_config(device, "hift.k=auto", f"hift.memory_budget={gib!r}",
                                         "hift.memory_reserve=0"))
        assert report["groups"] == want, (gib, report["per_group"])
        assert report["grouping"] == "balanced"
        assert report["budget"]["chosen"] and report["budget"]["fits"]
        assert report["hift"]["total"] <= gib * GIB
        chosen.add(want)
    assert len(chosen) >= 3


def test_a_budget_below_the_smallest_grouping_refuses_in_one_line(capsys):
    smallest = peak(CPU, "hift.m=1")
    budget = smallest / GIB * 0.98
    assert main(["memprofile", "recipe=tiny", CPU, "hift.k=auto",
                 f"hift.memory_budget={budget!r}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "no grouping fits in its" in err[0] and "after the 0 GiB reserve" in err[0]
    assert "the smallest peak, one unit per group (k=6), is" in err[0]
    assert f"{smallest / GIB:.3g} GiB" in err[0]
    assert "model.gradient_checkpointing=true" in err[0] and "trainer.batch_size" in err[0]


def test_a_budget_at_full_fine_tunings_peak_gives_one_group(caplog):
    fpft = estimate(compose_config(CPU))["fpft"]["total"]
    caplog.set_level("INFO")
    report = estimate(compose_config(CPU, "hift.k=auto",
                                     f"hift.memory_budget={fpft / GIB * (1 + 1e-12)!r}"))
    assert report["groups"] == 1 and report["budget"]["k"] == 1
    assert report["hift"]["total"] == fpft
    assert "full fine-tuning" in caplog.text


def test_auto_without_a_budget_and_bad_k_values_refuse(capsys):
    for args, message in (
            (["hift.k=auto"], "hift.k=auto needs hift.memory_budget"),
            (["hift.k=three"], "hift.k must be a number of groups or auto (got 'three')"),
            (["hift.grouping=balanced", "hift.m=2", "hift.k=null"],
             "hift.grouping=balanced cuts k groups by size"),
            (["hift.grouping=even"], "hift.grouping must be one of balanced, contiguous")):
        assert main(["train", "recipe=tiny", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)


def largest_groups(units, k) -> tuple[int, int]:
    return tuple(max(g.numel for g in make_groups(units, "bottom2up", k, None, grouping))
                 for grouping in ("balanced", "contiguous"))


def tiny_models():
    for name, config, cls, _, _ in GROUPING_ARCHS:
        yield f"grouping-{name}", lambda config=config, cls=cls: cls.from_config(config)
    for name, kwargs in MODEL_ARCHS.items():
        cls = (AutoModelForSequenceClassification if name in CLASSIFIERS
               else AutoModelForCausalLM)

        def build(name=name, kwargs=kwargs, cls=cls):
            return cls.from_config(AutoConfig.for_model(
                name, vocab_size=259, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                **kwargs))
        yield f"archs-{name}", build


@pytest.mark.parametrize("name,build", list(tiny_models()), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_balanced_groups_are_never_larger_than_contiguous(name, build):
    torch.manual_seed(0)
    units = find_units(build())
    n = len(units)
    pairs = {k: largest_groups(units, k) for k in range(1, n + 1)}
    assert all(b <= c for b, c in pairs.values()), pairs
    if len({u.numel for u in units}) > 1:
        assert any(b < c for b, c in pairs.values()), pairs
    for k in range(1, n + 1):  # still k contiguous groups covering every unit once
        groups = make_groups(units, "bottom2up", k, None, "balanced")
        assert len(groups) == k and [u for g in groups for u in g.units] == units


def test_llama7b_balanced_groups_beat_contiguous():
    est = Estimator(compose_config("hift.m=1", recipe="llama7b_alpaca"))
    block = 202_383_360
    for k, (balanced, contiguous) in {k: largest_groups(est.units, k)
                                      for k in (8, 17, 20, 32)}.items():
        assert balanced <= contiguous
    assert largest_groups(est.units, 32) == (131_076_096 + block, 2 * block)


def run_dirs() -> list[Path]:
    return sorted(p for p in Path("outputs/train").iterdir() if p.is_dir())


@pytest.mark.integration
@pytest.mark.parametrize("device,steps", [(CPU, ["trainer.max_steps=4"]),
                                          ("trainer.device=auto", ["trainer.max_steps=4"]),
                                          ("trainer.device=auto", ["trainer.max_steps=null",
                                                                   "trainer.epochs=1"])])
def test_train_uses_the_chosen_k(capsys, device, steps):
    """Also with trainer.device=auto on a CPU, and with trainer.epochs: the memory report's
    estimate keeps no CUDA reserve either and takes the run's config as resolved (each once
    failed, and the report was not written)."""
    if device != CPU and torch.cuda.is_available():
        pytest.skip("trainer.device=auto resolves to CUDA here")
    peaks = {k: peak(CPU, f"hift.k={k}", "hift.grouping=balanced") for k in (1, 2)}
    assert peaks[2] < peaks[1]
    budget = (peaks[1] + peaks[2]) / 2 / GIB
    want = expected_k(budget * GIB, CPU)
    assert want == 2
    assert main(["train", "recipe=tiny", device, "hift.k=auto", f"hift.memory_budget={budget!r}",
                 *steps, "trainer.eval_before=false",
                 "trainer.save_model=false", "eval.show_samples=0"]) == 0
    (run,) = run_dirs()
    assert json.load(open(run / "summary.json"))["groups"] == want
    report = json.load(open(run / "memory_report.json"))
    assert report["groups"] == want and report["budget"]["fits"]


def test_memprofile_with_a_budget_says_whether_it_fits(capsys):
    budget = peak(CPU, "hift.k=3", "hift.grouping=balanced") / GIB * 1.05
    assert main(["memprofile", "recipe=tiny", CPU, "hift.k=auto",
                 f"hift.memory_budget={budget!r}"]) == 0
    out = capsys.readouterr().out
    k = expected_k(budget * GIB, CPU)
    assert f"hift.k=auto chose k={k} (balanced)" in out and "fits, headroom" in out
    assert f"{k} balanced groups" in out  # the per-group table's title
    batch = int(re.search(r"largest trainer.batch_size that fits at this grouping: (\d+)",
                          out).group(1))
    # Real estimates at that batch and one above: it fits, one more does not.
    fixed = [CPU, f"hift.k={k}", "hift.grouping=balanced"]
    assert batch >= 8 and peak(*fixed, f"trainer.batch_size={batch}") <= budget * GIB
    assert peak(*fixed, f"trainer.batch_size={batch + 1}") > budget * GIB


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_always_active_units_count_in_every_group(precision):
    # m=1 puts the other units one per group either way: rows line up.
    common = [f"trainer.precision={precision}", "hift.m=1", "hift.offload=true"]
    without = estimate(compose_config(*common))
    report = estimate(compose_config(*common, "hift.always_active=[head]"))
    assert report["always_active"] == ["head"]
    est = Estimator(compose_config(*common))
    head = est.units[-1]
    head_states = sum(est.states[id(p)] for p in head.params.values())
    grad_bytes = 4  # fp32, and bf16-mixed's fp32 grads on the masters
    master_bytes = 4 if precision == "bf16-mixed" else 0
    rows, base = report["per_group"], without["per_group"][:-1]
    assert [r["group"] for r in rows] == [r["group"] for r in base]
    for row, ref in zip(rows, base):
        assert row["gradients"] - ref["gradients"] == head.numel * grad_bytes
        assert row["optimizer_states"] - ref["optimizer_states"] == head_states
        assert row["fp32_masters"] - ref["fp32_masters"] == head.numel * master_bytes
        assert row["activations"] >= ref["activations"]
    # Embeddings always active: the graph spans every block, whichever group trains.
    spanning = estimate(compose_config(*common, "hift.always_active=[embeddings]"))
    top = {r["group"]: r["activations"] for r in without["per_group"]}
    assert spanning["per_group"][-1]["group"] == "head"
    assert spanning["per_group"][-1]["activations"] > top["head"]
    assert spanning["per_group"][-2]["activations"] > top["block.3"]


@pytest.mark.parametrize("overrides,reserve", [
    (["hift.memory_budget=24"], 2.0),  # a 24 GB card: at least 2 GiB
    (["hift.memory_budget=80"], 3.2),  # 4% of an 80 GB card
    (["hift.memory_budget=24", "trainer.device=cpu"], 0.0),  # no CUDA context on a CPU
    (["hift.memory_budget=24", "hift.memory_reserve=2.5"], 2.5),
])
def test_the_budget_keeps_a_reserve(overrides, reserve):
    cfg = compose_config("hift.k=auto", *overrides)
    assert cfg.memory_reserve_gib() == pytest.approx(reserve)
    assert cfg.usable_bytes() == pytest.approx((cfg.hift.memory_budget - reserve) * GIB)


def test_a_reserve_that_leaves_nothing_is_refused(capsys):
    assert main(["memprofile", "recipe=tiny", "hift.k=auto", "hift.memory_budget=0.5"]) == 2
    assert capsys.readouterr().err.strip() == ("hift memprofile: error: hift.memory_reserve=2"
                                               " GiB leaves nothing of hift.memory_budget=0.5 GiB")
