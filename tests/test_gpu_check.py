"""bench/gpu_check.py: its CPU behaviour, and its whole code path on the tiny model."""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "gpu_check", Path(__file__).parents[1] / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_says_so_and_measures_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    assert gpu_check.main([]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_smoke_run_measures_every_configuration(tmp_path, monkeypatch):
    results = gpu_check.run_checks(smoke=True)
    runs = [results["smollm2_shape"][k] for k in ("offload_on", "offload_off", "fpft")]
    runs += [results["llama7b_shape"][k] for k in ("hift_m1", "fpft")]
    for run in runs:
        assert run["mean_step_seconds"] > 0 and run["final_loss"] > 0, run
    assert runs[0]["offload"] and not runs[1]["offload"]
    assert runs[0]["h2d_gib_per_step"] > 0 and runs[1]["h2d_gib_per_step"] == 0
    assert runs[3]["groups"] == 6 and runs[4]["groups"] == 1
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    stem = gpu_check.write(results)
    assert "| offload_on |" in stem.with_suffix(".md").read_text()
