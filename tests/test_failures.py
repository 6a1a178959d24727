"""Runs that hit a wall: out of memory mid-run, a report that fails after training."""

from pathlib import Path

import pytest
import torch

from hift_cli import run as task
from hift_cli.batches import BatchStream
from hift_cli.checkpoint import complete_checkpoints
from hift_cli.cli import main
from helpers import build_trainer, metrics


@pytest.mark.integration
@pytest.mark.parametrize("error,kind", [(torch.OutOfMemoryError, "device"),
                                        (MemoryError, "host")])
def test_out_of_memory_is_one_line_and_keeps_the_last_checkpoint(capsys, monkeypatch,
                                                                 error, kind):
    real_next = BatchStream.next
    calls = [0]

    def next_batch(self):
        calls[0] += 1
        if calls[0] == 5:  # step 5's batch (grad_accum 1): a step that runs out of memory
            raise error("simulated: tried to allocate 20.00 GiB")
        return real_next(self)

    monkeypatch.setattr(BatchStream, "next", next_batch)
    code = main(["train", "recipe=tiny", "trainer.max_steps=9", "trainer.save_every=2",
                 "trainer.eval_before=false"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    # step 5 is the 2nd step of cycle 1: group 1 (block.1..block.2) of tiny's 3 groups.
    assert err.startswith(f"hift train: out of {kind} memory at step 5 (group block.1..block.2):"
                          " estimated peak "), err
    assert "GiB for this configuration" in err and "model.gradient_checkpointing=true" in err
    (run,) = Path("outputs/train").iterdir()
    assert [c.name for c in complete_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # The step-4 checkpoint is whole: resuming from it gives the uninterrupted run's losses.
    monkeypatch.setattr(BatchStream, "next", real_next)
    args = ["train", "recipe=tiny", "trainer.max_steps=9", "trainer.save_every=2"]
    assert main([*args, f"resume={run}"]) == 0
    assert main([*args, "hydra.run.dir=outputs/straight"]) == 0
    resumed, straight = (losses(d) for d in (run, Path("outputs/straight")))
    assert list(resumed) == list(range(1, 10)) and resumed == straight


def test_a_library_caller_catches_an_out_of_memory_stop_as_an_exception(tmp_path, monkeypatch):
    # A notebook: build a trainer, train, catch the stop; no SystemExit below the CLI.
    from hift_cli.errors import HiftError, TrainingStopped

    trainer = build_trainer(tmp_path, "trainer.max_steps=4")
    real_next = BatchStream.next
    calls = [0]

    def next_batch(self):
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("simulated: tried to allocate 20.00 GiB")
        return real_next(self)

    monkeypatch.setattr(BatchStream, "next", next_batch)
    try:
        trainer.train(evaluate=False)
    except Exception as e:  # noqa: BLE001 (what a notebook writes)
        stop = e
    assert isinstance(stop, TrainingStopped) and isinstance(stop, HiftError)
    assert not isinstance(stop, SystemExit) and stop.out_of_memory == "device"
    assert stop.exit_code == 1 and str(stop).startswith("out of device memory at step 3")
    assert trainer.global_step == 2  # the two steps before it stand


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir, "train/loss")}


@pytest.mark.integration
def test_a_failing_report_after_training_is_a_warning(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(task, "write_memory_report", broken)
    assert main(["train", "recipe=tiny", "trainer.max_steps=3"]) == 0
    (run,) = Path("outputs/train").iterdir()
    assert (run / "summary.json").exists() and (run / "model" / "config.json").exists()
    assert (run / "loss.png").exists() and not (run / "memory_report.json").exists()
    out = capsys.readouterr().out
    assert ("warning: memory_report.json not written (RuntimeError: Tensor.item() cannot be"
            " called on meta tensors)\n") in out
