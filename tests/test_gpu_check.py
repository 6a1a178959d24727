"""bench/gpu_check.py and gpu_stages.py: their CPU behaviour, and every stage on the tiny
model from a plain checkout (no ``pip install -e .``), as the lent GPU machine runs it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpu_check  # bench/ is on pytest's path (pyproject.toml)
import gpu_stages

ROOT = Path(__file__).parents[1]

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
    committed = set((copy / "bench" / "results").glob("gpu-*"))  # a GPU's measurements
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FORGET_CHECKOUT.format(repo=str(ROOT.resolve())))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), GPU_CHECK_FAIL_STAGE="resume", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", GPU_CHECK_OOM="overlap/fpft")
    code = BOOTSTRAP.format(repo=str(ROOT.resolve()), copy=str(copy))
    proc = subprocess.run([sys.executable, "-c", code, "--smoke", "--out", str(out)], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("gpu-check: Python ") and " datasets " in \
        proc.stdout.splitlines()[0]
    [path] = out.glob("gpu-*.json")
    results = json.loads(path.read_text())
    assert results["packages"]["torch"] == torch.__version__
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
    for run in (on, off):
        assert run["mean_step_seconds"] > 0 and run["final_loss"] > 0
    # After the last warm-up step's write-back (none with offload off).
    assert on["peaks_reset"] == {"step": on["warm_steps"], "writebacks": on["warm_steps"]}
    assert off["peaks_reset"] == {"step": off["warm_steps"], "writebacks": 0}
    assert on["offload"] and not off["offload"] and on["groups"] == 3
    # GPU_CHECK_OOM: fpft's first step ran out of memory, inside train() (the trainer's
    # stop, without its estimate): a result, and the stage went on.
    assert fpft["oom"] and "mean_step_seconds" not in fpft and fpft["estimated_peak_gib"] > 0
    assert fpft["error"].startswith("out of device memory at step 1")
    assert "estimated peak unknown" in fpft["error"]
    assert stages["overlap"]["step_time_ratio"] > 0
    assert on["init_device"] == "cpu" and "init_fallback" not in on
    assert on["h2d_gib_per_step"] > 0 and off["h2d_gib_per_step"] == 0
    assert on["host_gib"] == on["exact_host_gib"] == on["estimated_state_gib"] > 0
    trace = stages["overlap"]["trace"]
    assert (out / trace["trace_file"]).stat().st_size == trace["trace_bytes"] > 0
    assert trace["h2d"]["copies"] == 0  # no CUDA: no copy events, but the analysis ran

    wide = stages["llama7b_wide"]
    assert wide["runs"]["offload_on"]["groups"] == 4 and wide["step_time_ratio"] > 0
    assert wide["projection"]["groups"] == 6 and wide["projection"]["seconds"] > 0
    assert wide["runs"]["fpft"]["groups"] == 1 and wide["runs"]["fpft"]["estimated_peak_gib"] > 0
    for key in ("trace", "trace_off"):  # offload on and off, each with its file
        assert (out / wide[key]["trace_file"]).stat().st_size == wide[key]["trace_bytes"] > 0
    vocab = stages["llama3_vocab"]["runs"]["offload_on"]
    # 4 embedding and 4 head sub-units (a 2048-token vocabulary) and 4 blocks, m=1.
    assert vocab["groups"] == 12 and vocab["estimated_groups"] == 12 and vocab["final_loss"] > 0
    # Its full depth (in the smoke run the same 4 layers): the plan of llama3_8b_alpaca.
    assert stages["llama3_full"]["runs"]["offload_on"]["groups"] == 12
    full = stages["llama7b_full"]["runs"]
    assert full["offload_on"]["groups"] == 6 and full["fpft"]["groups"] == 1

    report = path.with_suffix(".md").read_text()
    assert "## resume" in report and "FAILED (exit 1)" in report and "| offload_on |" in report
    assert "| fpft | OOM |" in report
    assert set((copy / "bench" / "results").glob("gpu-*")) == committed  # smoke writes elsewhere


def test_a_stopped_training_is_recorded_and_the_stage_goes_on(tmp_path):
    from hift_cli.engine import TrainingStopped

    ctx = gpu_stages.StageContext("overlap", True, tmp_path, time.time() + 60)
    runs = ctx.record.setdefault("runs", {"fpft": {"estimated_peak_gib": 2.0}})
    oom = "out of device memory at step 1 (group 0): estimated peak unknown"
    with ctx.part("fpft", into=runs, oom_ok=True):  # a result
        raise TrainingStopped(oom + "\nsecond line", 1, out_of_memory="device")
    with ctx.part("offload_on", into=runs):
        raise TrainingStopped(oom, 1, out_of_memory="device")
    with ctx.part("offload_off", into=runs):
        raise TrainingStopped("stopping: 3 steps in a row with a non-finite loss", 1)
    with ctx.part("raw", into=runs, oom_ok=True):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    assert runs["fpft"] == {"estimated_peak_gib": 2.0, "oom": True, "error": oom}
    assert runs["offload_on"] == {"oom": True, "error": oom}
    assert runs["offload_off"] == {"error": "stopping: 3 steps in a row with a non-finite loss"}
    assert runs["raw"] == {"oom": True, "error": "CUDA out of memory. Tried to allocate 2 GiB"}
    assert ctx.record["failed_parts"] == ["offload_on", "offload_off"]
    assert json.loads(ctx.path.read_text()) == ctx.record


def test_peaks_are_reset_after_the_last_warm_up_steps_write_back(tmp_path):
    ctx = gpu_stages.StageContext("overlap", True, tmp_path, time.time() + 60)
    cfg = gpu_stages.compose(*gpu_stages.base(ctx), "hift.offload=true")
    with gpu_stages.built(ctx, cfg, "run") as trainer:
        result = gpu_stages.measure(ctx, trainer, (2, 16), 1, 1)
    assert (result["groups"], result["warm_steps"], result["measured_steps"]) == (3, 3, 3)
    # Every warm-up step's write-back, the last one's included, came before the reset.
    assert result["peaks_reset"] == {"step": 3, "writebacks": 3}


def test_a_running_stage_record_is_saved_while_it_runs(tmp_path, monkeypatch):
    """A kill of the whole command keeps what a running stage measured: the fake stage
    writes its record, then waits until the orchestrator's results show it, running."""
    out = tmp_path / "out"
    fake = f"""
import json, os, pathlib, sys, time
work = pathlib.Path.cwd()
(work / "equality.json.tmp").write_text(json.dumps({{"startup_seconds": 1.5, "steps": 6}}))
os.replace(work / "equality.json.tmp", work / "equality.json")
end = time.time() + 30
while time.time() < end:
    for path in pathlib.Path({str(out)!r}).glob("gpu-*.json"):
        stage = json.loads(path.read_text())["stages"].get("equality", {{}})
        if stage.get("running") and stage.get("steps") == 6:
            sys.exit(0)
    time.sleep(0.05)
sys.exit(3)
"""
    monkeypatch.setattr(gpu_check, "stage_command", lambda *a: [sys.executable, "-c", fake])
    monkeypatch.setattr(gpu_check, "POLL_S", 0.05)
    saved = []
    real_save = gpu_check.save
    monkeypatch.setattr(gpu_check, "save", lambda results, stem: (
        saved.append(json.loads(json.dumps(results["stages"]))), real_save(results, stem)))
    started = time.time() - 100  # the command began 100 s ago: 60 s of a 160 s budget left
    assert gpu_check.orchestrate(True, out, 160, ["equality"], started, {"torch": "2"}) == 0
    running = [s["equality"] for s in saved if s.get("equality", {}).get("steps") == 6
               and s["equality"].get("running")]
    assert running and running[0]["startup_seconds"] == 1.5
    [path] = out.glob("gpu-*.json")
    results = json.loads(path.read_text())
    stage = results["stages"]["equality"]
    assert stage["steps"] == 6 and "running" not in stage and "returncode" not in stage
    assert results["packages"] == {"torch": "2"} and results["setup_seconds"] >= 100
    assert results["seconds"] >= 100


def test_an_unmet_requirement_stops_it_in_one_line_before_any_stage(capsys, tmp_path,
                                                                    monkeypatch):
    real = gpu_check.installed
    monkeypatch.setattr(gpu_check, "installed",
                        lambda name: "14.0.2" if name == "pyarrow" else real(name))
    monkeypatch.setattr(gpu_check, "orchestrate", lambda *a, **k: pytest.fail("a stage ran"))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 2
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("gpu-check: Python ") and "pyarrow 14.0.2" in first
    datasets = gpu_check.installed("datasets")
    assert second.startswith(f"gpu-check: datasets {datasets} needs pyarrow>=")
    assert second.endswith(", found 14.0.2")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(gpu_check, "installed",
                        lambda name: None if name == "fsspec" else real(name))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 2
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith(f"gpu-check: datasets {datasets} needs fsspec")
    assert line.endswith(", not installed")


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
    # Against the other direction's copies (on another stream; tid 20's own do not count).
    trace["traceEvents"].append(event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 120, 100,
                                      tid=21))
    assert gpu_stages.copy_overlap(trace, "DtoH", against="HtoD") == {
        "copies": 1, "copy_us": 50.0, "overlapped_us": 30.0, "overlap_fraction": 0.6}
    assert gpu_stages.copy_overlap({"traceEvents": []})["overlap_fraction"] is None


def test_stream_busy_is_the_union_of_each_streams_events_over_the_span():
    def event(cat, ts, dur, tid):
        return {"ph": "X", "cat": cat, "name": "x", "ts": ts, "dur": dur, "pid": 0, "tid": tid}

    trace = {"traceEvents": [
        event("kernel", 0, 40, tid=7), event("kernel", 30, 20, tid=7),  # 0-50: busy 50
        event("gpu_memcpy", 50, 10, tid=7),                             # the item's copy
        event("gpu_memcpy", 60, 140, tid=9),                            # a write-back
        event("kernel", 180, 20, tid=7),                                # idle 60-180
        event("cpu_op", 0, 500, tid=1),                                 # host: not counted
    ]}
    busy = gpu_stages.stream_busy(trace)
    assert busy["span_ms"] == 0.2 and busy["compute_stream"] == "7"
    assert busy["streams"]["7"] == {"events": 4, "busy_ms": 0.08, "kernel_ms": 0.08,
                                    "copy_ms": 0.01}
    assert busy["compute_busy_fraction"] == pytest.approx(0.4)
    assert busy["streams"]["9"]["copy_ms"] == 0.14
    assert gpu_stages.stream_busy({"traceEvents": []}) == {}


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
    # Llama-3-8B at full depth: on llama3_vocab's host buffers, then its own cost.
    vocab = lambda host, pinned=0.001: {"stages": {"llama3_vocab": {"runs": {"offload_on": {
        "host_gib": host, "exact_host_gib": 21.5, "pinned_allocator_gib": pinned}}}}}
    assert gpu_check.gate("llama3_full", vocab(21.5), False, 300) == (None, 110)
    assert "within 5%" in gpu_check.gate("llama3_full", vocab(30.0), False, 300)[0]
    assert "rounding" in gpu_check.gate("llama3_full", vocab(21.5, 20.0), False, 300)[0]
    assert gpu_check.gate("llama3_full", vocab(21.5), False, 100)[0].startswith("estimated 110")


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
