"""Checkpoints: atomic, resumable bit for bit, written on signals; bad numbers skipped."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import build_trainer, metrics, stop_and_resume
from hift_cli import checkpoint as ckpt
from hift_cli.checkpoint import CheckpointError, complete_checkpoints
from hift_cli.engine import TrainingStopped

TINY = ["recipe=tiny", "trainer.num_threads=2", "data.max_eval_samples=4",
        "trainer.eval_before=false", "trainer.log_every=1000"]


def hift(run_dir: Path, *args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "hift_cli.cli", "train", *TINY, f"hydra.run.dir={run_dir}",
           *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=run_dir.parent)
    if wait:
        proc.wait(timeout=300)
    return proc


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines()
                     if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.002)
    raise AssertionError(f"run never reached step {step} (exit {proc.poll()})")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir, "train/loss")}


@pytest.mark.integration
@pytest.mark.parametrize("strategy,seed", [("bottom2up", 1), ("top2down", 2), ("random", 3)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, strategy, seed):
    args = [f"hift.strategy={strategy}", "trainer.max_steps=30", "trainer.save_every=1",
            "hift.k=4"]
    straight = tmp_path / "straight"
    assert hift(straight, *args).returncode == 0

    killed = tmp_path / "killed"
    proc = hift(killed, *args, wait=False)
    kill_at = random.Random(seed).randrange(3, 25)
    wait_for_step(killed, kill_at, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, maybe mid-checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = complete_checkpoints(killed)
    assert done, "nothing checkpointed before the kill"

    resumed = hift(killed, *args, f"resume={killed}")
    assert resumed.returncode == 0, resumed.stderr.read()
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(killed) == losses(straight)  # every step logged once, same values


@pytest.mark.integration
def test_incomplete_checkpoint_is_skipped(tmp_path, caplog):
    run = tmp_path / "run"
    assert hift(run, "trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=5"
                ).returncode == 0
    steps = [p.name for p in complete_checkpoints(run)]
    assert steps == ["step-00000002", "step-00000004", "step-00000006"]
    (run / "checkpoints" / "step-00000006" / ckpt.MARKER).unlink()  # as if killed mid-write
    assert ckpt.find_resume(str(run), tmp_path).name == "step-00000004"
    assert "Skipping incomplete checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        ckpt.find_resume(str(run / "checkpoints" / "step-00000006"), tmp_path)


@pytest.mark.integration
def test_keep_last_rotates(tmp_path):
    run = tmp_path / "run"
    assert hift(run, "trainer.max_steps=8", "trainer.save_every=1", "trainer.keep_last=2"
                ).returncode == 0
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000007", "step-00000008"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.integration
def test_sigint_finishes_the_step_and_writes_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = hift(run, "trainer.max_steps=100000", wait=False)
    wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    (last,) = complete_checkpoints(run)
    step = int(last.name.split("-")[1])
    assert step >= 5 and max(losses(run)) == step
    assert f"interrupted by SIGINT at step {step}; checkpoint saved to" in err
    assert f"resume={run}" in err and "Traceback" not in err


def make_trainer(tmp_path, *overrides):
    """A set-up trainer; the tests below train it with evaluate=False."""
    return build_trainer(tmp_path, "hift.k=3", *overrides)


def poison(trainer, calls: set[int]):
    """Make the model's loss NaN on the given forward calls (0-based)."""
    count = [0]

    def hook(module, args, output):
        if count[0] in calls:
            output.loss = output.loss * float("nan")
        count[0] += 1
        return output

    trainer.model.register_forward_hook(hook)


def test_a_nan_step_is_skipped_and_counted(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.max_steps=6")
    poison(trainer, {2})  # step 3 (group 2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    summary = trainer.train(3, evaluate=False)
    assert [r["train/skipped"] for r in metrics(tmp_path)] == [0, 0, 1]
    assert summary["train/skipped_steps"] == 1
    group2 = set(trainer.groups[2].params)
    for n, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all()
        if n in group2:
            assert torch.equal(p, before[n])  # its update was skipped
    assert not any(trainer.optimizer.state.get(p) for p in trainer.opt_params[2])
    trainer.train(evaluate=False)  # and training goes on, to trainer.max_steps=6
    assert trainer.meter.bad_steps == 0 and trainer.meter.skipped_steps == 1


def test_too_many_bad_steps_stop_with_a_message(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.max_steps=20", "trainer.max_bad_steps=3")
    poison(trainer, set(range(100)))
    with pytest.raises(TrainingStopped) as stop:
        trainer.train(evaluate=False)
    assert stop.value.code == 1
    assert stop.value.message.startswith("stopping: 3 steps in a row with a non-finite loss")


def test_unwritable_output_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "trainer.max_steps=2")
    trainer.train(evaluate=False)
    first = trainer.checkpoint(keep_last=2)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt.torch, "save", read_only)
    trainer.train(1, evaluate=False)
    with pytest.raises(CheckpointError) as err:
        trainer.checkpoint(keep_last=2)
    message = str(err.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path}/checkpoints/step-00000003:"
                              " Read-only file system (it needs ~"), message
    assert message.endswith(f" free); the previous checkpoint {first} is intact"), message
    assert err.value.exit_code == 74  # an I/O error
    assert complete_checkpoints(tmp_path) == [first]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_resume_restores_state_into_a_fresh_trainer(tmp_path):
    """In-process: optimizer state, scheduler, counters and data order come back."""
    a = make_trainer(tmp_path / "a", "trainer.max_steps=5",
                     "trainer.lr_scheduler=linear", "hift.offload=true")
    a.train(evaluate=False)
    path = a.checkpoint(keep_last=1)
    b = make_trainer(tmp_path / "b", "trainer.max_steps=5",
                     "trainer.lr_scheduler=linear", "hift.offload=true")
    b.resume(path)
    assert (b.global_step, b.batches_consumed) == (5, 5)
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    with a.store.readable(), b.store.readable():  # offloaded state, read through the store
        for pa, pb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
            for key in pa:
                assert pa[key].numel() and torch.equal(pa[key], pb[key])
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)
    assert torch.equal(next(a.stream.batches)["input_ids"], next(b.stream.batches)["input_ids"])


def test_a_resume_path_without_checkpoints_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from hift_cli.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipe=tiny", f"resume={tmp_path}"]) == 2
    assert f"resume={tmp_path}: no complete checkpoint there" in capsys.readouterr().err


def test_resume_latest_picks_the_newest_complete_checkpoint(tmp_path):
    older = make_trainer(tmp_path / "runs" / "a", "trainer.max_steps=2")
    older.train(evaluate=False)
    older.checkpoint(keep_last=2)
    newer = make_trainer(tmp_path / "runs" / "b", "trainer.max_steps=3")
    newer.train(evaluate=False)
    newest = newer.checkpoint(keep_last=2)
    (tmp_path / "runs" / "c").mkdir()  # a run that crashed before its first checkpoint
    assert ckpt.find_resume("latest", tmp_path / "runs") == newest
    with pytest.raises(CheckpointError, match="resume=latest: no complete checkpoint under"):
        ckpt.find_resume("latest", tmp_path / "empty")


def test_bf16_mixed_offloaded_resume_is_exact(tmp_path):
    """fp32 masters and offloaded optimizer state survive a checkpoint round trip."""
    opts = ("trainer.precision=bf16-mixed", "model.dtype=bfloat16", "hift.offload=true",
            "trainer.max_steps=8", "hift.strategy=random")
    straight = make_trainer(tmp_path / "straight", *opts)
    straight.train(evaluate=False)
    second, _ = stop_and_resume(lambda name: make_trainer(tmp_path / name, *opts), 4,
                                evaluate=False)
    second.train(evaluate=False)
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    with straight.store.readable(), second.store.readable():
        for ma, mb in zip((m for ps in straight.opt_params for m in ps),
                          (m for ps in second.opt_params for m in ps)):
            assert ma.dtype == torch.float32 and torch.equal(ma, mb)
