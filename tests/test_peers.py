"""bench/peers.py: the peers suite's arithmetic, its LLaMA-7B memory models, and every
installed peer trained for 2 steps on the tiny model."""

import importlib.util
import json
from pathlib import Path

import compare  # bench/ is on pytest's path (pyproject.toml)
from collect import collect
import peers
import pytest
import torch


def _write_run(path: Path, step_seconds: float, evals: list[tuple], updated: float) -> Path:
    """metrics.jsonl + summary.json as hift and the peers write them; evals: (step, epoch,
    value), step 0 being the eval before training."""
    path.mkdir()
    last = max(s for s, _, _ in evals)
    rows = [{"step": s, "step_seconds": step_seconds, "tokens_per_second": 100 / step_seconds,
             "train/loss": 1.0} for s in range(1, last + 1)]
    rows += [{"step": s, "epoch": e, "eval/loss": v} for s, e, v in evals]
    rows.sort(key=lambda r: (r["step"], "eval/loss" in r))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"train/params_updated_per_step": updated,
                                                   "data/train_samples": 8}))
    (path / "config.yaml").write_text("trainer: {batch_size: 4, grad_accum: 1}\n")
    return path


def test_collect_and_compare_give_ratios_epochs_and_equal_wallclock(tmp_path):
    fpft = _write_run(tmp_path / "fpft", 2.0, [(0, 0.0, 1.0), (2, 1.0, 0.8), (4, 2.0, 0.6)],
                      1000)
    # Rounded up past 2 epochs (a HiFT run finishing its last cycle): 5 steps, 2.5 epochs.
    fast = _write_run(tmp_path / "fast", 1.0,
                      [(0, 0.0, 1.0), (2, 1.0, 0.9), (4, 2.0, 0.7), (5, 2.5, 0.65)], 250)
    runs = {"fpft": peers.method_record(collect(fpft, peak_rss=2 * 2**30), 2),
            "fast": peers.method_record(collect(fast, peak_rss=2**30), 2),
            "gpu-only": {"what": "a peer", "not_run": "needs CUDA"}}
    f = runs["fast"]
    assert (f["steps"], f["train_seconds"], f["mean_step_seconds"]) == (5, 5.0, 1.0)
    assert f["tokens_per_second"] == pytest.approx(100.0) and f["peak_rss_gib"] == 1.0
    assert (f["epoch1"]["value"], f["epochs"]["value"], f["final"]["value"]) == (0.9, 0.7, 0.65)
    assert f["best"]["value"] == 0.65 and f["before"] == 1.0
    c = peers.compare(runs, higher_is_better=False)
    # The shortest training (5 s); fpft's curve there: between 4 s (0.8) and 8 s (0.6).
    assert c["equal_wallclock_seconds"] == 5.0
    assert runs["fpft"]["equal_wallclock"] == pytest.approx(0.75)
    assert f["equal_wallclock"] == pytest.approx(0.65)
    q = f["ratio_to_fpft"]
    assert q["mean_step_seconds"] == pytest.approx(0.5)
    assert q["tokens_per_second"] == pytest.approx(2.0)
    assert q["peak_rss_gib"] == pytest.approx(0.5)
    assert q["params_updated_per_step"] == pytest.approx(0.25)
    assert q["epoch1"] == pytest.approx(0.9 / 0.8) and q["epochs"] == pytest.approx(0.7 / 0.6)
    assert q["best"] == pytest.approx(0.65 / 0.6)
    assert q["equal_wallclock"] == pytest.approx(0.65 / 0.75)
    # Within fpft's 8 s of training the fast run finished (best 0.65); fpft's own is its best.
    assert (f["at_fpft_time"], runs["fpft"]["at_fpft_time"]) == (0.65, 0.6)
    assert q["at_fpft_time"] == pytest.approx(0.65 / 0.6)
    assert "ratio_to_fpft" not in runs["gpu-only"]
    runs["fpft"]["what"] = runs["fast"]["what"] = "a method"
    s = {"title": "t", "base": ["recipe=tiny"], "metric": "eval/loss", "higher_is_better": False,
         "epochs": 2, "runs": runs, "comparison": c, "date": "d", "minutes": 1.0}
    md = "\n".join(peers.markdown("peers-x", s))
    assert "| gpu-only | not run here: needs CUDA |" in md
    assert "| fast | 0.00M | 0.250 | 1.000 | 0.50 |" in md
    assert "| 0.6500 (2.5) |" in md  # the final column says where the run stopped


def test_llama7b_memory_models_follow_their_formulas():
    """Synthetic memprofile reports and shapes: each row is its documented formula, and a
    HiFT row is its peak group's own breakdown."""
    def group(name, **kw):
        base = {"weights": 200, "gradients": 0, "optimizer_states": 0, "fp32_masters": 0,
                "activations": 0, "other": 0}
        return {"group": name, **base, **kw, "total": sum({**base, **kw}.values())}

    fpft = {"weights": 200, "gradients": 200, "optimizer_states": 400, "fp32_masters": 0,
            "activations": 50, "other": 0, "total": 850}
    auto = {"fpft": fpft, "groups": 2, "hift_peak_group": "g1",
            "hift": {"activations": 45, "gradients": 90},  # column maxima: not used
            "per_group": [group("g0", gradients=90, activations=20),
                          group("g1", gradients=60, optimizer_states=120, activations=45,
                                other=10)]}
    m1 = {"fpft": fpft, "groups": 3, "hift_peak_group": "block.0",
          "per_group": [group("block.0", gradients=30, activations=40)]}
    shapes = {"block_linears": [(4, 8), (8, 4)], "params": [(10, 8), (4, 8), (8, 4), (8,)],
              "block_numel": 72}
    m = peers.peer_memory(auto, m1, m1, shapes, lora_ranks=(8,), galore_rank=2)
    rows = m["rows"]
    assert m["params"] == 80 + 32 + 32 + 8
    for r in rows.values():
        assert r["total"] == sum(r[k] for k in ("weights", "gradients", "optimizer_states",
                                                "activations", "other"))
    assert rows["fpft"]["total"] == 850
    hift = rows["hift (k=auto, 24 GiB)"]
    assert (hift["gradients"], hift["optimizer_states"], hift["activations"], hift["other"]) \
        == (60, 120, 45, 10)
    adapters = 8 * (12 + 12)
    assert rows["lora-r8"]["weights"] == 200 + 4 * adapters
    assert (rows["lora-r8"]["gradients"], rows["lora-r8"]["optimizer_states"]) == (
        4 * adapters, 8 * adapters)
    assert rows["badam"]["gradients"] == 6 * 72 and rows["badam"]["activations"] == 40
    assert rows["lomo"]["gradients"] == 4 * 80 and rows["lomo"]["optimizer_states"] == 0
    # GaLore rank 2: states 2 x r x max(m, n) per block matrix, full AdamW on the rest.
    assert rows["galore (r=2)"]["optimizer_states"] == 2 * (2 * 2 * 8 * 2 + 2 * (152 - 64))
    assert rows["galore (r=2)"]["gradients"] == 2 * 152
    md = "\n".join(peers.memory_markdown(m))
    assert "| lomo |" in md and "fits 24 GiB" in md


@pytest.mark.slow
def test_every_installed_peer_trains_two_steps_on_the_tiny_model(tmp_path):
    assert compare.main(["--quick", "--suite", "peers-tiny", "--out", str(tmp_path),
                         "--name", "p", "--no-docs"]) == 0
    s = json.loads((tmp_path / "p.json").read_text())["suites"]["peers-tiny"]
    runs = s["runs"]
    assert set(runs) == set(peers.QUICK["peers-tiny"]["only"])
    fpft = runs["fpft"]
    for name, r in runs.items():
        method = peers.methods(peers.QUICK["peers-tiny"])[name]
        if method["kind"] == "peer" and importlib.util.find_spec(
                peers.PACKAGES[method["peer"]][1]) is None:
            assert "not installed" in r["not_run"]
            continue
        if name == "adalomo" and not torch.cuda.is_available():
            assert "needs CUDA" in r["not_run"]
            continue
        times = method.get("epochs_times", 1)  # hift-auto-x3: 3 epochs, whole cycles
        assert r["steps"] == 2 if times == 1 else r["steps"] >= 2 * times, name
        assert 0 < r["params_updated_per_step"] <= fpft["params_updated_per_step"], name
        # The same weights before training, and it trained: the eval loss moved.
        assert r["before"] == pytest.approx(fpft["before"], rel=1e-6), name
        assert r["final"]["value"] != pytest.approx(r["before"], rel=1e-7), name
        q = r["ratio_to_fpft"]
        assert q["mean_step_seconds"] == pytest.approx(
            r["mean_step_seconds"] / fpft["mean_step_seconds"])
        assert q["final"] == pytest.approx(r["final"]["value"] / fpft["final"]["value"])
    assert runs["lora-r8"]["params_updated_per_step"] < 0.25 * fpft["params_updated_per_step"]
    assert runs["badam"]["settings"]["switch_block_every"] == 1  # 16 / (8 x 4 blocks) -> 1
    assert (tmp_path / "p-peers-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "p.md").read_text()
    assert "## HiFT against the alternatives" in md and "| lomo |" in md
    # --only reruns one method beside the kept ones, as one table, and says so.
    assert compare.main(["--quick", "--suite", "peers-tiny", "--only", "badam", "--out",
                         str(tmp_path), "--name", "p", "--no-docs"]) == 0
    again = json.loads((tmp_path / "p.json").read_text())["suites"]["peers-tiny"]
    assert list(again["runs"]) == list(runs) and again["later"] == {"badam": again["date"]}
    assert again["runs"]["lomo"]["curve"] == runs["lomo"]["curve"]
    assert "Run in a later invocation" in (tmp_path / "p.md").read_text()


def test_per_seed_suites_combine_into_means_spreads_and_verdicts():
    def run(best, at_7, at_time, step):
        return {"best": {"value": best}, "epochs": {"value": at_7}, "at_fpft_time": at_time,
                "mean_step_seconds": step}

    suites = [{"seed": seed, "higher_is_better": True, "epochs": 7, "metric": "eval/accuracy",
               "runs": {"fpft": run(0.9 + d, 0.9 + d, 0.9 + d, 0.2),
                        "peer": run(0.5 + d, 0.4 + d, 0.5 + d, 0.1),
                        "close": run(0.91 - d, 0.91 - d, 0.91 - d, 0.1),
                        "gpu": {"not_run": "needs CUDA"}}}
              for seed, d in ((42, 0.0), (1, 0.02), (2, 0.04))]
    agg = peers.over_seeds(suites)
    m = agg["methods"]
    assert set(m) == {"fpft", "peer", "close"} and m["peer"]["seeds"] == [1, 2, 42]
    assert m["fpft"]["best"]["mean"] == pytest.approx(0.92)
    assert m["fpft"]["best"]["std"] == pytest.approx(0.02)
    assert m["peer"]["vs"] == {"best": "−", "epochs": "−", "at_fpft_time": "−"}
    assert m["close"]["vs"]["best"] == "≈"  # 0.89 vs 0.92: 0.03 within 0.02 + 0.02
    assert m["peer"]["ratio"]["step_seconds"] == pytest.approx(0.5)
    md = "\n".join(peers.over_seeds_markdown("peers-x", agg, ["fpft", "peer", "gpu"]))
    assert "| peer | 1, 2, 42 | 0.520 ± 0.020 | 0.565 | − |" in md and "| gpu |" not in md
    # The per-seed suites: one per seed, the seed in each one's overrides.
    names = [n for n, sp in peers.SUITES.items() if sp["family"] == "peers-minilm"]
    assert names == ["peers-minilm", "peers-minilm-seed1", "peers-minilm-seed2"]
    assert "trainer.seed=1" in peers.SUITES["peers-minilm-seed1"]["base"]
