"""bench/compare.py: its arithmetic, and its whole code path on the tiny model."""

import json

import compare  # bench/ is on pytest's path (pyproject.toml)
from collect import collect
import pytest


def test_interpolate_between_points_and_none_outside():
    points = [(0.0, 2.0), (10.0, 1.0), (20.0, 0.5)]
    assert compare.interpolate(points, 5.0) == pytest.approx(1.5)
    assert compare.interpolate(points, 20.0) == pytest.approx(0.5)
    assert compare.interpolate(points, 0.0) == pytest.approx(2.0)
    assert compare.interpolate(points, 25.0) is None


def _run(seconds, loss_curve, tokens_per_step=100.0, rss=2.0):
    steps = len(loss_curve) - 1
    curve = [{"step": i, "seconds": i * seconds, "tokens": i * tokens_per_step,
              "eval_loss": loss} for i, loss in enumerate(loss_curve)]
    return {"steps": steps, "mean_step_seconds": seconds, "train_seconds": steps * seconds,
            "tokens": steps * tokens_per_step, "tokens_per_second": tokens_per_step / seconds,
            "peak_rss_gib": rss, "eval_loss": loss_curve[-1], "eval_curve": curve}


def test_compare_takes_ratios_to_fpft_at_equal_tokens_and_wallclock():
    runs = {"fpft": _run(2.0, [3.0, 2.0, 1.0], rss=4.0),
            "bottom2up-k4": _run(1.0, [3.0, 2.5, 2.0], rss=3.0),
            "top2down-k4": _run(1.0, [3.0, 2.6, 2.2], rss=3.0),
            "bottom2up-k4-seed2": _run(1.0, [3.0, 2.4, 1.9], rss=3.0),
            "bottom2up-k4-2x": _run(1.0, [3.0, 2.5, 2.0, 1.2, 0.9], rss=3.0)}
    c = compare.compare(runs)
    hift = runs["bottom2up-k4"]
    assert hift["ratio_to_fpft"]["mean_step_seconds"] == pytest.approx(0.5)
    assert hift["ratio_to_fpft"]["tokens_per_second"] == pytest.approx(2.0)
    assert hift["ratio_to_fpft"]["peak_rss_gib"] == pytest.approx(0.75)
    assert hift["ratio_to_fpft"]["eval_loss"] == pytest.approx(2.0)
    # The fastest run trained 2 s: fpft had done one step (loss 2.0) by then.
    assert c["equal_wallclock_seconds"] == pytest.approx(2.0)
    assert runs["fpft"]["eval_loss_equal_wallclock"] == pytest.approx(2.0)
    assert hift["ratio_to_fpft"]["eval_loss_equal_wallclock"] == pytest.approx(1.0)
    # A longer run is compared at fpft's step count, and left out of the strategy spread.
    assert runs["bottom2up-k4-2x"]["eval_loss_equal_steps"] == pytest.approx(2.0)
    assert runs["bottom2up-k4-2x"]["ratio_to_fpft"]["eval_loss"] == pytest.approx(0.9)
    assert c["seed_noise_eval_loss"] == pytest.approx(0.1)
    assert c["strategy_spread_eval_loss"] == {"k4": pytest.approx(0.2)}
    assert c["strategies_within_noise"] == {"k4": False}


def test_later_overrides_replace_earlier_ones():
    assert compare.merge(["a=1", "b=2"], ["b=3", "c=4"]) == ["a=1", "b=3", "c=4"]


@pytest.mark.integration
def test_quick_bench_runs_each_config_in_its_own_process(tmp_path):
    assert compare.main(["--quick", "--out", str(tmp_path), "--name", "t", "--no-docs"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    runs = result["suites"]["tiny"]["runs"]
    assert set(runs) == {"fpft", "bottom2up-k3", "top2down-k3", "bottom2up-k3-seed2"}
    for name, r in runs.items():
        assert r["steps"] == 6 and r["mean_step_seconds"] > 0 and r["peak_rss_gib"] > 0
        assert [p["step"] for p in r["eval_curve"]] == [0, 3, 6]
        assert r["ratio_to_fpft"]["eval_loss"] == pytest.approx(
            r["eval_loss"] / runs["fpft"]["eval_loss"])
    assert runs["fpft"]["groups"] == 1 and runs["bottom2up-k3"]["groups"] == 3
    # Same weights, data and order at step 0: every run starts from the same eval loss.
    assert len({r["eval_curve"][0]["eval_loss"] for name, r in runs.items()
                if "seed2" not in name}) == 1
    assert (tmp_path / "t-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "t.md").read_text()
    assert "| bottom2up-k3 | 3 |" in md and "t-tiny.png" in md
    # Re-rendering the stored runs gives the same tables without training.
    (tmp_path / "t.md").unlink()
    assert compare.main(["--out", str(tmp_path), "--render", "t", "--no-docs"]) == 0
    assert (tmp_path / "t.md").read_text() == md


def test_docs_block_is_replaced_between_markers(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"intro\n{compare.BEGIN}\nold\n{compare.END}\noutro\n")
    compare.write_docs("new table", docs)
    assert docs.read_text() == f"intro\n{compare.BEGIN}\nnew table\n{compare.END}\noutro\n"


def test_quality_collect_takes_the_best_epoch_and_the_time_to_it(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.1},
            *({"step": s, "step_seconds": 2.0, "tokens_per_second": 50.0, "train/loss": 1.0}
              for s in range(1, 7)),
            {"step": 2, "epoch": 1.0, "eval/accuracy": 0.5},
            {"step": 4, "epoch": 2.0, "eval/accuracy": 0.7},
            {"step": 6, "epoch": 3.0, "eval/accuracy": 0.6}]
    rows.sort(key=lambda r: (r["step"], "eval/accuracy" in r))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps(
        {"groups": 3, "data/train_samples": 8, "train/params_updated_per_step": 5}))
    (tmp_path / "config.yaml").write_text("trainer: {batch_size: 2, grad_accum: 2}\n")
    r = compare.quality.seed_record(collect(tmp_path, "eval/accuracy", higher_is_better=True))
    assert (r["best"]["value"], r["best"]["epoch"], r["best"]["seconds"]) == (0.7, 2.0, 8.0)
    assert r["final"]["value"] == 0.6 and r["before"] == 0.1 and r["train_seconds"] == 12.0
    assert (r["steps"], r["cycles"], r["updates_per_group"]) == (6, 1, 2.0)
    worst = collect(tmp_path, "eval/accuracy", higher_is_better=False)
    assert worst["best"]["epoch"] == 1.0 and worst["epochs_trained"] == 3.0


def test_quality_config_names_become_overrides():
    spec = {"lr": 1e-4, "epochs": 3}
    o = compare.quality.overrides
    assert o("fpft", spec, None) == ["hift.strategy=fpft"]
    assert o("k4+head-lr2x-K16", spec, None) == [
        "hift.strategy=bottom2up", "hift.k=4", "hift.always_active=[head]", "optimizer.lr=0.0002",
        "hift.steps_per_group=16"]
    assert o("auto-x4", spec, 2.5) == ["hift.strategy=bottom2up", "hift.k=auto",
                                       "hift.memory_budget=2.5", "trainer.epochs=12"]
    assert o("m1", spec, None)[1] == "hift.m=1"
    with pytest.raises(ValueError, match="unknown"):
        o("k4-bogus", spec, None)


def _seed_run(values, seconds, before=0.2):
    epochs = [{"step": i + 1, "epoch": i + 1.0, "value": v, "seconds": t}
              for i, (v, t) in enumerate(zip(values, seconds))]
    return {"groups": 4, "steps": len(values), "cycles": 1, "updates_per_group": 1,
            "train_seconds": seconds[-1], "epochs": epochs, "before": before,
            "best": max(epochs, key=lambda e: e["value"]), "final": epochs[-1]}


def test_quality_aggregates_seeds_and_calls_a_difference_real_only_beyond_the_spread():
    q = compare.quality
    fpft = {1: _seed_run([0.5, 0.8], [10, 20]), 2: _seed_run([0.6, 0.9], [10, 20])}
    # Faster than fpft: within fpft's 20 s it reached both of its epochs.
    close = {1: _seed_run([0.5, 0.84], [5, 10]), 2: _seed_run([0.6, 0.83], [5, 10])}
    # Slower: only its first epoch came within fpft's time (seed 2: none, so "before").
    worse = {1: _seed_run([0.3, 0.4], [15, 30]), 2: _seed_run([0.3, 0.41], [25, 50])}
    runs = {"fpft": q.aggregate(fpft, fpft, True), "close": q.aggregate(close, fpft, True),
            "worse": q.aggregate(worse, fpft, True)}
    q.compare(runs, higher_is_better=True)
    assert runs["fpft"]["best"]["mean"] == pytest.approx(0.85)
    assert runs["fpft"]["best"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert runs["close"]["verdict_vs_fpft"]["best"] == "≈"  # 0.835 vs 0.85, spread 0.08
    assert runs["worse"]["verdict_vs_fpft"]["best"] == "−"
    assert runs["worse"]["at_fpft_time"]["values"] == [0.3, 0.2]
    assert runs["close"]["ratio_to_fpft"]["train_seconds"] == 0.5
    assert [p["mean"] for p in runs["close"]["curve"]] == pytest.approx([0.55, 0.835])
    assert q.verdict({"mean": 1.0, "std": 0.1}, {"mean": 1.5, "std": 0.1}, False) == "+"


@pytest.mark.integration
def test_quick_quality_suite_trains_every_config_on_every_seed(tmp_path):
    assert compare.main(["--quick", "--suite", "quality-tiny", "--out", str(tmp_path),
                         "--name", "q", "--no-docs"]) == 0
    s = json.loads((tmp_path / "q.json").read_text())["suites"]["quality-tiny"]
    runs = s["runs"]
    assert list(runs) == ["fpft", "auto", "k4+head", "k4-lr2x", "k4-K2"]
    assert all(r["seeds"] == [7, 42] for r in runs.values())
    assert runs["fpft"]["groups"] == 1 and runs["k4+head"]["groups"] == 4
    # fpft's peak does not fit the budget, so k=auto needs more than one group.
    assert runs["auto"]["groups"] > 1
    # Two seeds differ (data order, init), the same seed twice would not.
    assert len(set(runs["k4-lr2x"]["final"]["values"])) == 2
    # K=2: cycles of 4 x 2 steps; 2 epochs of 6 batches round up to 16 steps = 2 cycles.
    assert (runs["k4-K2"]["steps"], runs["k4-K2"]["cycles"]) == (16, 2)
    assert runs["k4+head"]["cycles"] == 3
    assert runs["fpft"]["ratio_to_fpft"]["best"] == 1.0
    md = (tmp_path / "q.md").read_text()
    assert "| k4-K2 | 4 | 16 | 2 |" in md and (tmp_path / "q-quality-tiny.png").exists()
    # The second metric (a loss) beside the first, with its own spread and verdicts.
    auto = s["runs"]["auto"]
    assert auto["also_best"]["mean"] <= auto["also_final"]["mean"] + 1e-12
    assert auto["verdict_vs_fpft"]["also_best"] in "≈+−"
    assert "| config | best perplexity | ×fpft | vs | final perplexity |" in md


def test_a_suite_per_seed_joins_its_family(tmp_path):
    """Each seed's suite runs alone; the results join under the family's name, aggregated
    over every seed as one suite with all the seeds would be."""
    q = compare.quality
    assert list(q.SUITES)[:3] == [f"quality-smollm2-seed{s}" for s in q.SEEDS]
    for seed in (42, 7):
        assert compare.main(["--quick", "--suite", f"quality-tiny-seeds-seed{seed}", "--out",
                             str(tmp_path), "--name", "q", "--no-docs"]) == 0
    suites = json.loads((tmp_path / "q.json").read_text())["suites"]
    assert list(suites) == ["quality-tiny-seeds"]
    s = suites["quality-tiny-seeds"]
    assert s["seeds"] == [7, 42] and set(s["minutes_by_seed"]) == {"42", "7"}
    k4 = s["runs"]["k4"]
    assert k4["seeds"] == [7, 42] and len(k4["best"]["values"]) == 2
    best = [k4["by_seed"][str(seed)]["best"]["value"] for seed in (42, 7)]
    assert k4["best"]["mean"] == pytest.approx(sum(best) / 2)
    assert "at_fpft_time" in k4 and k4["ratio_to_fpft"]["best"] > 0
    md = (tmp_path / "q.md").read_text()
    assert "a suite per seed (`--suite quality-tiny-seeds-seed<n>`)" in md
    # --only: a configuration again (or a new one) beside the others; its minutes add.
    assert compare.main(["--quick", "--suite", "quality-tiny-seeds-seed42", "--only", "k4",
                         "--out", str(tmp_path), "--name", "q", "--no-docs"]) == 0
    again = json.loads((tmp_path / "q.json").read_text())["suites"]["quality-tiny-seeds"]
    assert again["runs"]["k4"]["best"]["values"] == k4["best"]["values"]  # deterministic
    assert again["added"] == {"k4": again["date"]} and again["minutes"] > s["minutes"]
    assert again["minutes_by_seed"]["42"] > s["minutes_by_seed"]["42"]
    assert "Added by later invocations of the suite" in (tmp_path / "q.md").read_text()
