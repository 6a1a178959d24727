"""trainer.shard_weights: FSDP2 under torchrun, 2 CPU processes (gloo), against one process.

Two ranks with batch 4 each see the samples one process sees with batch 8; with SGD (a
wrong gradient scale would move the weights by a different amount) the final weights
must agree to fp32 round-off, for HiFT and for fpft. Each rank must hold about half of
every weight, a sharded checkpoint must resume exactly, and the gathered model must be a
plain Hugging Face folder.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hift_cli.checkpoint import CheckpointError, load_checkpoint
from hift_cli.cli import main
from helpers import losses, metrics
from test_distributed import (COMMON, SHAPES, assert_resume_from_step_3_is_exact, paired_runs,
                              torchrun)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDED = ["trainer.shard_weights=true", "eval.show_samples=2"]
# bf16-mixed (hift's fp32 masters, sharded), gradient checkpointing, two micro-batches
# and the offload store in strict mode (sharded state and masters in host buffers).
MIXED = ["recipe=tiny", "optimizer=adamw", "optimizer.lr=1e-3", "trainer.max_steps=8",
         "trainer.lr_scheduler=constant", "data.max_eval_samples=16", "hift.strategy=random",
         "hift.k=4", "hift.offload=true", "trainer.precision=bf16-mixed",
         "model.gradient_checkpointing=true", "trainer.grad_accum=2", "eval.show_samples=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per shape: a sharded 2-rank run (batch 4 each) and a 1-process run (batch 8)."""
    return paired_runs(tmp_path_factory.mktemp("sharded"), *SHARDED)



def _assert_weights_close(a: Path, b: Path, **tol) -> None:
    a, b = (load_file(run / "model" / "model.safetensors") for run in (a, b))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_sharded_ranks_match_one_process_with_the_same_global_batch(runs, shape):
    run, single, done = runs[shape]
    assert "Sharded weights (FSDP2)" in done.stdout + done.stderr
    _assert_weights_close(run, single, rtol=1e-5, atol=1e-6)
    got = losses(run)
    assert got == pytest.approx(losses(single),
                                   rel=1e-5)
    evals = [r["eval/loss"] for r in metrics(run, "eval/loss")]
    assert evals == pytest.approx([r["eval/loss"] for r in metrics(single, "eval/loss")],
                                  rel=1e-5)
    # FSDP reduce-scatters the gradients; hift's own all-reduce is not used on top.
    rows = metrics(run, "train/loss")
    assert all(r["dist/reduce_scatter_bytes"] > 0 and "dist/allreduce_bytes" not in r
               for r in rows)
    # The run's memory report is the per-GPU estimate for its 2 processes.
    assert json.loads((run / "memory_report.json").read_text())["world_size"] == 2


def test_each_rank_holds_about_half_of_every_weight(runs):
    run, _, _ = runs["hift"]
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    full = load_file(checkpoint / "model.safetensors")
    parts = [torch.load(f, weights_only=True)["model"]
             for f in sorted((checkpoint / "shards").iterdir())]
    assert len(parts) == 2
    total = sum(t.numel() for t in full.values())
    for part in parts:
        assert 0.45 < sum(t.numel() for t in part.values()) / total < 0.55
    # Each weight is cut on dim 0, and the two parts are the whole of it.
    for name, t in full.items():
        assert torch.equal(torch.cat([part[name] for part in parts]), t), name


def test_sharded_checkpoint_resumes_exactly_and_its_model_loads(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run, _, _ = runs["hift"]
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    saved = load_file(run / "model" / "model.safetensors")
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name

    assert_resume_from_step_3_is_exact(run, tmp_path, *SHARDED)


def test_sharded_checkpoint_refuses_another_process_count(runs, capsys):
    run, _, _ = runs["hift"]
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    with pytest.raises(CheckpointError, match="saved by 2 processes sharding the weights"):
        load_checkpoint(checkpoint, torch.device("cpu"), 0, 1)
    # Through the CLI, in one process: one line, no traceback.
    assert main(["train", *COMMON, *SHAPES["hift"], f"resume={run}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume it with 2 processes" in err[0], err


def test_sharded_bf16_mixed_with_checkpointing_and_offload_follows_one_process(tmp_path,
                                                                               monkeypatch):
    """bf16 compute: the two runs round differently, so agreement is to bf16 precision."""
    monkeypatch.setenv("HIFT_STRICT_OFFLOAD", "1")  # the torchrun children inherit it
    done = torchrun(tmp_path, *MIXED, "trainer.shard_weights=true", "trainer.batch_size=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "offload: on (fp32 masters too)" in done.stdout + done.stderr
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    single = tmp_path / "single"
    assert main(["train", *MIXED, "trainer.batch_size=4", f"hydra.run.dir={single}"]) == 0
    got = losses(run)
    assert got == pytest.approx(losses(single),
                                   abs=2e-3)
    _assert_weights_close(run, single, rtol=0, atol=2e-2)


def test_real_weights_read_by_rank_0_shard_like_data_parallel(tmp_path):
    """MiniLM from its saved weights (rank 0 reads them, rank 1 builds an empty model and
    receives its shards), BERT embeddings with their LayerNorm in the root unit, and a
    classifier head initialised at load. Dropout differs from one process, so the
    reference is plain data parallelism with the same per-rank seeds."""
    common = ["recipe=minilm_family", "trainer.max_steps=4", "optimizer=sgd",
              "optimizer.lr=0.5", "trainer.lr_scheduler=constant", "data.max_samples=64",
              "data.max_eval_samples=16", "trainer.eval_every=null", "trainer.batch_size=4",
              "eval.show_samples=0",
              # Sharded weights cut no unit into sub-units: the same units for both.
              "hift.max_unit_params=null"]
    runs = []
    for name, extra in (("sharded", ["trainer.shard_weights=true"]), ("dp", [])):
        (tmp_path / name).mkdir()
        done = torchrun(tmp_path / name, *common, *extra)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (run,) = (tmp_path / name / "outputs" / "train").iterdir()
        runs.append(run)
    _assert_weights_close(*runs, rtol=1e-5, atol=1e-6)
    sharded, dp = (losses(run) for run in runs)
    assert sharded == pytest.approx(dp, rel=1e-5)
