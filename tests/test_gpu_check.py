"""bench/gpu_check.py and gpu_stages.py: their CPU behaviour, and every stage on the tiny
model from a plain checkout (no ``pip install -e .``), as the lent GPU machine runs it."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
gpu_stages = sys.modules["gpu_stages"]  # imported by gpu_check from beside it

# Forget this checkout: setuptools' editable-install finders and path entries into it
# (the venv inside it excepted). As sitecustomize it also runs in the stage processes.
FORGET_CHECKOUT = """
import sys
from pathlib import Path

def _into_checkout(entry, repo=Path({repo!r}), venv=Path(sys.prefix).resolve()):
    try:
        path = Path(entry or ".").resolve()
    except OSError:
        return False
    return path.is_relative_to(repo) and not path.is_relative_to(venv)

def _editable(obj):
    return str(getattr(obj, "__module__", "")).startswith("__editable__")

sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__") and not _into_checkout(p)]
sys.path_importer_cache.clear()
"""
BOOTSTRAP = FORGET_CHECKOUT + """
import runpy
sys.path.insert(0, {copy!r})
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


def plain_checkout(dest: Path) -> Path:
    """What a fresh clone would hold: tracked and untracked-not-ignored files, as they
    are in the working tree now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():  # deleted in the working tree: not in the copy either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_says_so_and_measures_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    assert gpu_check.main([]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_plain_checkout_smoke_run_keeps_every_stage_but_the_failed_one(tmp_path):
    copy = plain_checkout(tmp_path / "checkout")
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FORGET_CHECKOUT.format(repo=str(ROOT.resolve())))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), GPU_CHECK_FAIL_STAGE="resume", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    code = BOOTSTRAP.format(repo=str(ROOT.resolve()), copy=str(copy))
    proc = subprocess.run([sys.executable, "-c", code, "--smoke", "--out", str(out)], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [path] = out.glob("gpu-*.json")
    results = json.loads(path.read_text())
    stages = results["stages"]
    assert list(stages) == list(gpu_check.STAGES)

    failed = stages["resume"]
    assert failed["returncode"] == 1 and "GPU_CHECK_FAIL_STAGE=resume" in failed["error"]
    for name, stage in stages.items():  # in priority order: the first failure is shown
        if name == "resume":
            continue
        assert not {"returncode", "failed_parts", "skipped"} & set(stage), (
            name, stage.get("error") or stage.get("skipped") or stage.get("failed_parts"))
    # hift_cli and its recipes came from the copy, in the orchestrator and every stage.
    assert results["hift_cli"].startswith(str(copy))
    for name, stage in stages.items():
        assert stage["hift_cli"].startswith(str(copy)), name
        assert stage["recipes"] == str(copy / "recipes"), name
    assert stages["equality"]["control"]["equal"] and stages["equality"]["all_equal"]
    assert stages["races"]["all_equal"] and len(stages["races"]["runs"]) == 2

    on, off, fpft = (stages["overlap"]["runs"][k] for k in ("offload_on", "offload_off", "fpft"))
    for run in (on, off, fpft):
        assert run["mean_step_seconds"] > 0 and run["final_loss"] > 0 and run["peaks_reset"]
    assert on["offload"] and not off["offload"] and (on["groups"], fpft["groups"]) == (3, 1)
    assert on["init_device"] == "cpu" and "init_fallback" not in on
    assert on["h2d_gib_per_step"] > 0 and off["h2d_gib_per_step"] == 0
    assert on["host_gib"] == on["exact_host_gib"] == on["estimated_state_gib"] > 0
    trace = stages["overlap"]["trace"]
    assert (out / trace["trace_file"]).stat().st_size == trace["trace_bytes"] > 0
    assert trace["h2d"]["copies"] == 0  # no CUDA: no copy events, but the analysis ran

    wide = stages["llama7b_wide"]
    assert wide["runs"]["offload_on"]["groups"] == 4 and wide["step_time_ratio"] > 0
    assert wide["projection"]["groups"] == 6 and wide["projection"]["seconds"] > 0
    vocab = stages["llama3_vocab"]["runs"]["offload_on"]
    # 4 embedding and 4 head sub-units (a 2048-token vocabulary) and 4 blocks, m=1.
    assert vocab["groups"] == 12 and vocab["estimated_groups"] == 12 and vocab["final_loss"] > 0
    full = stages["llama7b_full"]["runs"]
    assert full["offload_on"]["groups"] == 6 and full["fpft"]["groups"] == 1

    report = path.with_suffix(".md").read_text()
    assert "## resume" in report and "FAILED (exit 1)" in report and "| offload_on |" in report
    assert not list((copy / "bench" / "results").glob("gpu-*"))  # smoke never writes there


def test_copy_overlap_counts_kernel_time_on_other_streams_once():
    def event(cat, name, ts, dur, tid, pid=0):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid,
                "tid": tid}

    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 0},
        event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 100, tid=20),
        event("kernel", "gemm", 50, 100, tid=7),         # 50 of its 100 us
        event("kernel", "same_stream", 0, 100, tid=20),  # the copy's own stream: not overlap
        event("kernel", "other_gpu", 0, 100, tid=7, pid=1),
        event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 200, 60, tid=20),
        event("kernel", "a", 210, 10, tid=7),            # 210-220 and 215-240: union 30 us
        event("kernel", "b", 215, 25, tid=8),
        event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 100, 50, tid=20),
    ]}
    h2d = gpu_stages.copy_overlap(trace, "HtoD")
    assert h2d == {"copies": 2, "copy_us": 160.0, "overlapped_us": 80.0,
                   "overlap_fraction": 0.5}
    assert gpu_stages.copy_overlap(trace, "DtoH")["overlapped_us"] == 50.0
    assert gpu_stages.copy_overlap({"traceEvents": []})["overlap_fraction"] is None


def test_compare_finds_a_one_ulp_change_in_weights_masters_or_state(tmp_path):
    ctx = gpu_stages.StageContext("equality", True, tmp_path, time.time() + 60)
    cfg = gpu_stages.compose(*gpu_stages.base(ctx), "trainer.max_steps=3", "hift.offload=true",
                            "trainer.precision=bf16-mixed", "model.dtype=bfloat16")
    with gpu_stages.built(ctx, cfg, "run") as trainer:
        trainer.train(evaluate=False)
        before = gpu_stages.snapshot(trainer)
        assert gpu_stages.compare(before, gpu_stages.snapshot(trainer))["equal"]
        master = trainer.opt_params[0][0]
        for kind in ("weight", "master", "state"):
            # Offloaded (strict mode): masters and state are readable inside readable() only.
            with trainer.store.readable():
                t = {"weight": next(trainer.model.parameters()), "master": master,
                     "state": trainer.optimizer.state[master]["exp_avg"]}[kind].data.view(-1)
                old = t[0].clone()
                t[0] = torch.nextafter(old, old + 1)
            result = gpu_stages.compare(before, gpu_stages.snapshot(trainer))
            with trainer.store.readable():
                t[0] = old
            assert not result["equal"] and result["kinds"][kind]["different"] == 1, kind
            assert sum(k["different"] for k in result["kinds"].values()) == 1, kind
        assert gpu_stages.compare(before, gpu_stages.snapshot(trainer))["equal"]
    assert not gpu_stages.compare(before, {**before, "state/extra": 1})["equal"]


def test_last_stage_runs_only_on_exact_host_bytes_and_a_projection_that_fits():
    def results(host, exact, seconds, pinned_allocator=0.001):
        on = {"host_gib": host, "exact_host_gib": exact, "pinned_allocator_gib": pinned_allocator}
        return {"stages": {"llama7b_wide": {"runs": {"offload_on": on},
                                            "projection": {"seconds": seconds}}}}

    assert gpu_check.gate("llama7b_full", results(75.3, 75.3, 200), False, 300) == (None, 200)
    reason, _ = gpu_check.gate("llama7b_full", results(139.0, 75.3, 200), False, 300)
    assert "not within 5%" in reason
    reason, _ = gpu_check.gate("llama7b_full", results(21.0, 21.0, 200, 30.0), False, 300)
    assert "pinned caching allocator" in reason
    reason, _ = gpu_check.gate("llama7b_full", results(75.3, 75.3, 400), False, 300)
    assert reason == "estimated 400 s, 300 s of the budget left"
    reason, _ = gpu_check.gate("llama7b_full", {"stages": {}}, False, 300)
    assert "no host bytes" in reason
    assert gpu_check.gate("overlap", {"stages": {}}, False, 10)[0].startswith("estimated 50 s")


def test_a_stage_that_outruns_its_timeout_is_killed_and_recorded(tmp_path):
    entry = gpu_check.launch("equality", True, tmp_path, time.time() + 60, 0.5,
                             tmp_path / "log")
    assert entry["returncode"] is None and entry["error"] == "timed out after 0 s"
    assert "===== equality: exit None" in (tmp_path / "log").read_text()


def test_report_shows_skipped_running_and_half_finished_stages(tmp_path):
    results = {"date": "2026-12-01", "smoke": False, "device": "NVIDIA H200", "torch": "2.11",
               "cuda": "13.0", "machine": gpu_check.machine(), "budget_seconds": 540,
               "seconds": 530, "stages": {
                   "equality": {"running": True},
                   "overlap": {"returncode": None, "error": "timed out after 150 s",
                               "runs": {"offload_on": {"estimated_peak_gib": 1.5,
                                                       "setup_seconds": 2.0}}},
                   "llama7b_full": {"skipped": "estimated 300 s, 10 s of the budget left"}}}
    gpu_check.save(results, tmp_path / "gpu-2026-12-01")
    report = (tmp_path / "gpu-2026-12-01.md").read_text()
    assert "running (or killed while running)" in report
    assert "FAILED (exit None): timed out after 150 s" in report
    assert "| offload_on | unfinished |" in report  # estimated, then killed while training
    assert "skipped (estimated 300 s, 10 s of the budget left)" in report
    assert json.loads((tmp_path / "gpu-2026-12-01.json").read_text()) == results
