"""Data parallel under torchrun: 2 CPU processes (gloo) against one process.

Two ranks with batch 4 each see exactly the samples one process sees with batch 8, so
the final weights must agree to fp32 round-off; only the active group's gradients may
cross the wire, and only rank 0 may write.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hift_cli.cli import main
from hift_cli.engine import HiftTrainer
from helpers import compose_config, losses, metrics

# Every test here but the last two shares the torchrun runs of the `runs` fixture.
pytestmark = pytest.mark.integration

STEPS = 6
# SGD, not Adam: Adam's update barely changes if every gradient is scaled, so it would
# hide a wrong average; SGD moves the weights in proportion to the gradient itself.
COMMON = ["recipe=tiny", "optimizer=sgd", "optimizer.lr=0.5", f"trainer.max_steps={STEPS}",
          "trainer.lr_scheduler=constant",
          "trainer.eval_every=3", "data.max_eval_samples=16", "trainer.log_every=1"]
SHAPES = {"hift": ["hift.strategy=random", "hift.k=3"], "fpft": ["hift.strategy=fpft"]}


def torchrun(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hift_cli", "train", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def paired_runs(root: Path, *extra: str) -> dict:
    """Per shape: a 2-rank run (batch 4 each, ``extra`` overrides) and a 1-process run
    (batch 8): ``{shape: (2-rank run dir, 1-process run dir, torchrun's result)}``."""
    out = {}
    for shape, overrides in SHAPES.items():
        cwd = root / shape
        cwd.mkdir()
        done = torchrun(cwd, *COMMON, *overrides, *extra, "trainer.batch_size=4",
                        "trainer.save_every=3", "trainer.keep_last=2")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (dp_dir,) = (cwd / "outputs" / "train").iterdir()  # one dir for the whole job
        single = root / f"{shape}-single"
        assert main(["train", *COMMON, *overrides, "trainer.batch_size=8",
                     f"hydra.run.dir={single}"]) == 0
        out[shape] = dp_dir, single, done
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return paired_runs(tmp_path_factory.mktemp("dp"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")



@pytest.mark.parametrize("shape", SHAPES)
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, shape):
    dp, single, _ = runs[shape]
    a, b = _weights(dp), _weights(single)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    dp_losses = losses(dp)
    single_losses = losses(single)
    assert dp_losses == pytest.approx(single_losses, rel=1e-5)
    assert len(dp_losses) == STEPS  # one writer: no row twice


@pytest.mark.parametrize("shape", SHAPES)
def test_only_the_active_groups_gradients_are_all_reduced(runs, shape, tmp_path):
    dp, _, _ = runs[shape]
    trainer = HiftTrainer(compose_config(*COMMON[1:], *SHAPES[shape]), tmp_path)
    trainer.setup()
    group_bytes = [sum(p.numel() * p.element_size()
                       for p in {id(p): p for p in g.params.values()}.values())
                   for g in trainer.groups]
    rows = metrics(dp, "train/loss")
    assert [r["dist/allreduce_bytes"] for r in rows] == [group_bytes[r["group"]] for r in rows]
    if shape == "hift":
        total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        assert max(r["dist/allreduce_bytes"] for r in rows) < total


@pytest.mark.parametrize("shape", SHAPES)
def test_only_rank_0_writes(runs, shape):
    dp, _, done = runs[shape]
    assert (dp / ".hydra" / "config.yaml").exists()
    log = (dp / "train.log").read_text()
    assert log.count("Config:") == 1 and log.count("Data (") == 1
    summary = json.loads((dp / "summary.json").read_text())
    assert summary["dist/world_size"] == 2
    # Console: rank 0 alone reports the run's outcome.
    assert done.stdout.count("Output: ") == 1


def assert_resume_from_step_3_is_exact(run: Path, tmp_path: Path, *extra: str) -> None:
    """A torchrun resume of a copy of ``run`` cut back to its step-3 checkpoint ends with
    the same weights and metrics rows as ``run`` itself."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model")
    checkpoints = sorted((copy / "checkpoints").iterdir())
    for later in checkpoints[1:]:  # keep step 3 only
        shutil.rmtree(later)
    assert checkpoints[0].name == "step-00000003"
    done = torchrun(tmp_path, *COMMON, *SHAPES["hift"], *extra, "trainer.batch_size=4",
                    f"resume={copy}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = _weights(copy), _weights(run)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    untimed = [[{k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k}
                for r in metrics(d)] for d in (copy, run)]
    assert untimed[0] == untimed[1]


def test_resume_under_torchrun_continues_exactly(runs, tmp_path):
    assert_resume_from_step_3_is_exact(runs["hift"][0], tmp_path)


def test_sweeps_and_other_commands_refuse_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "-m", "recipe=tiny", "hift.k=2,3"]) == 2
    assert main(["eval", "recipe=tiny"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("start it without torchrun" in line for line in err)


def test_buckets_go_on_the_wire_during_backward(tmp_path):
    """One gloo rank: every bucket is launched by the hooks before backward returns."""
    import torch.distributed as dist

    from hift_cli.distributed import GradSync

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
        params = list(model.parameters())
        sync = GradSync(bucket_bytes=2 * 16 * 16 * 4)  # two weights per bucket
        sync.attach(params[4:])  # the top two layers are the active group
        for p in params[:4]:
            p.requires_grad_(False)
        sync.arm(True)
        model(torch.randn(8, 16)).sum().backward()
        assert len(sync.inflight) == len(sync.buckets) == 2  # launched by the hooks
        grads = [p.grad.clone() for p in params[4:]]
        moved = sync.finish()
        assert moved == sum(p.numel() * 4 for p in params[4:])
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, params[4:]))  # sum of one
        assert all(p.grad is None for p in params[:4])
        # Not armed (an earlier micro-batch of a window): nothing moves during backward.
        model(torch.randn(8, 16)).sum().backward()
        assert sync.inflight == []
        sync.close()
    finally:
        dist.destroy_process_group()
