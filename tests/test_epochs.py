"""trainer.epochs instead of trainer.max_steps; eval_every / save_every = epoch.

An epoch is the batches one pass over the training data gives (the last incomplete batch
dropped); a step takes grad_accum of them. ``epochs`` runs ceil(epochs x batches /
grad_accum) steps, rounded up to whole cycles; ``epoch`` intervals fall on the step that
consumes an epoch's last batch.
"""

import json
import math
import shutil

import pytest
from omegaconf import OmegaConf

from helpers import assert_same, build_trainer, losses, metrics, snapshot, stop_and_resume
from hift_cli.checkpoint import complete_checkpoints
from hift_cli.cli import main
from hift_cli.config import ConfigError, command_line_wins
from hift_cli.data import batches_per_epoch, train_batches
from hift_cli.runplan import RunPlan

COMMON = ("trainer.eval_before=false", "trainer.save_model=false", "data.max_samples=50",
          "data.max_eval_samples=4", "trainer.batch_size=8", "trainer.max_steps=null")


def make(tmp_path, *overrides):
    return build_trainer(tmp_path, *COMMON[2:], *overrides)



def test_batches_per_epoch_is_what_train_batches_gives():
    for n, batch, world in [(50, 8, 1), (48, 8, 1), (7, 8, 1), (50, 4, 2), (51, 4, 2), (9, 8, 3)]:
        size = min(batch * world, n - n % world)
        assert batches_per_epoch(n, batch, world) == n // size
        # Epoch 0 is a permutation of the samples: its batches hold distinct samples.
        ds = _rows(n)
        seen = []
        stream = train_batches(ds, batch, 0, seed=3, rank=0, world=world)
        for _ in range(batches_per_epoch(n, batch, world)):
            seen += next(stream)["input_ids"][:, 0].tolist()
        assert len(seen) == len(set(seen))


def _rows(n):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [[i + 1] for i in range(n)],
                              "attention_mask": [[1]] * n, "labels": [[i + 1] for i in range(n)]})


@pytest.mark.parametrize("k,grad_accum", [(5, 1), (3, 2)])
def test_epochs_run_whole_cycles_covering_the_epochs(tmp_path, k, grad_accum):
    trainer = make(tmp_path, "trainer.epochs=2", f"hift.k={k}",
                   f"trainer.grad_accum={grad_accum}")
    n = len(trainer.train_set)
    assert n == 50
    per_epoch = n // 8  # batches of 8, the last incomplete one dropped: 6
    steps = math.ceil(2 * per_epoch / grad_accum)
    expected = math.ceil(steps / k) * k
    assert trainer.plan.max_steps == expected
    assert trainer.plan.num_cycles == expected // k
    assert (trainer.cfg.trainer.epochs, trainer.cfg.trainer.max_steps) == (2, None)  # given
    trainer.train()
    train_rows = metrics(tmp_path, "train/loss")
    assert [r["step"] for r in train_rows] == list(range(1, expected + 1))
    assert trainer.batches_consumed == expected * grad_accum
    assert train_rows[-1]["epoch"] == round(expected * grad_accum / per_epoch, 4)


def test_the_resolution_is_logged(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="hift_cli.build")
    make(tmp_path, "trainer.epochs=2", "hift.k=5")
    assert ("trainer.epochs=2: 2 x 6 batches = 12 steps, rounded up to 15 (3 cycles of 5"
            " groups)") in caplog.text


@pytest.mark.parametrize("batch,grad_accum", [(8, 2), (7, 2)])
def test_eval_and_save_every_epoch(tmp_path, batch, grad_accum):
    trainer = make(tmp_path, "trainer.epochs=3", "hift.k=3",
                   f"trainer.batch_size={batch}", f"trainer.grad_accum={grad_accum}",
                   "trainer.eval_every=epoch",
                   "trainer.save_every=epoch", "trainer.keep_last=10")
    per_epoch = 50 // batch  # 6 (3 steps an epoch) or 7 (epoch ends inside step 4's window)
    trainer.train()
    last = trainer.plan.max_steps
    ends = [math.ceil(e * per_epoch / grad_accum) for e in (1, 2, 3)]
    evals = metrics(tmp_path, "eval/loss")
    # Each epoch end before the last step, then the evaluation after training.
    assert [r["step"] for r in evals] == [s for s in ends if s < last] + [last]
    assert [r["epoch"] for r in evals] == [round(s * grad_accum / per_epoch, 4)
                                           for s in [s for s in ends if s < last] + [last]]
    assert [int(p.name.split("-")[1]) for p in complete_checkpoints(tmp_path)] == [
        s for s in ends if s < last]
    if per_epoch == 6:
        assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0]


def test_the_run_plan_is_the_settings_arithmetic_without_a_model(tiny_cfg):
    tcfg = tiny_cfg("trainer.epochs=3", "trainer.batch_size=8", "trainer.grad_accum=2",
                    "trainer.warmup_ratio=0.25").trainer
    # 50 samples, batches of 8: 6 an epoch; 3 epochs / grad_accum 2 = 9 steps -> 12 (k=4).
    plan = RunPlan.of(tcfg, 50, 1, cycle_steps=4)
    assert (plan.steps_from_epochs, plan.max_steps, plan.num_cycles) == (9, 12, 3)
    assert (plan.epoch_batches, plan.warmup_cycles, plan.epoch_end(2)) == (6, 1, 6)
    ends = [s for s in range(1, 13) if plan.due("epoch", s, 2 * s)]
    assert ends == [3, 6, 9, 12]  # the steps that consume an epoch's last batch
    assert [s for s in range(1, 13) if plan.due(5, s, 2 * s)] == [5, 10]
    assert plan.epoch(9) == 1.5
    # Two processes: each gets half of every global batch.
    assert RunPlan.of(tcfg, 50, 2, cycle_steps=4).epoch_batches == 3
    with pytest.raises(ConfigError, match="3 training samples cannot be shared by 4"):
        RunPlan.of(tcfg, 3, 4, cycle_steps=4)
    steps = tiny_cfg("trainer.max_steps=7").trainer  # given in steps: not rounded
    assert (RunPlan.of(steps, 50, 1, 4).max_steps, RunPlan.of(steps, 50, 1, 4).num_cycles) \
        == (7, 2)


def test_command_line_wins_between_epochs_and_max_steps(tiny_cfg):
    cfg = tiny_cfg("trainer.epochs=2")  # the tiny recipe sets max_steps: cleared
    assert (cfg.trainer.epochs, cfg.trainer.max_steps) == (2, None)
    cfg = tiny_cfg("trainer.max_steps=7")
    assert (cfg.trainer.epochs, cfg.trainer.max_steps) == (None, 7)
    recipe = OmegaConf.create({"trainer": {"epochs": 3, "max_steps": None}})
    command_line_wins(recipe, ["trainer.max_steps=5"])  # a recipe of one's own with epochs
    assert (recipe.trainer.epochs, recipe.trainer.max_steps) == (None, None)
    recipe = OmegaConf.create({"trainer": {"epochs": 3, "max_steps": None}})
    command_line_wins(recipe, ["trainer.max_steps=null", "trainer.epochs=4"])
    assert (recipe.trainer.epochs, recipe.trainer.max_steps) == (3, None)  # both: untouched


def test_both_or_neither_are_refused(tiny_cfg, tmp_path, capsys):
    with pytest.raises(ConfigError, match="set exactly one of trainer.max_steps and"
                       r" trainer.epochs \(got max_steps=5, epochs=2\)"):
        tiny_cfg("trainer.epochs=2", "trainer.max_steps=5")
    with pytest.raises(ConfigError, match="set exactly one of trainer.max_steps"):
        tiny_cfg("trainer.max_steps=null")
    with pytest.raises(ConfigError, match="trainer.eval_every must be a number of steps or"
                       " epoch \\(got 'often'\\)"):
        tiny_cfg("trainer.eval_every=often")
    with pytest.raises(ConfigError, match="trainer.epochs must be > 0"):
        tiny_cfg("trainer.epochs=0")
    assert tiny_cfg("trainer.save_every=4").trainer.save_every == 4
    code = main(["train", "recipe=tiny", "trainer.epochs=2", "trainer.max_steps=5",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "set exactly one of trainer.max_steps and trainer.epochs" in err
    assert "Traceback" not in err


def test_resume_mid_epoch_is_exact(tmp_path):
    # 6 batches an epoch, k=3: 2 epochs = 12 steps; stop at step 8, in the second epoch.
    opts = ("trainer.epochs=2", "hift.k=3", "hift.strategy=random", "hift.offload=true",
            "trainer.lr_scheduler=linear", "trainer.eval_every=epoch")
    straight = make(tmp_path / "straight", *opts)
    straight.train()
    assert straight.plan.max_steps == 12
    # As if stopped after step 8.
    second, _ = stop_and_resume(lambda name: make(tmp_path / name, *opts), 8)
    assert second.epoch == round(8 / 6, 4)
    second.train()
    assert_same(snapshot(straight), snapshot(second))

    assert losses(tmp_path / "straight") == (losses(tmp_path / "first")
                                             + losses(tmp_path / "second"))


@pytest.mark.integration
def test_resume_through_the_command_line_re_resolves_epochs(tmp_path):
    # save_every=5 with 6-batch epochs: checkpoints at 5 and 10 (mid-epoch), final at 12.
    args = ["train", "recipe=tiny", *COMMON[2:], "trainer.epochs=2", "hift.k=3",
            "trainer.save_every=5", "trainer.keep_last=5", "trainer.log_every=1000",
            "trainer.eval_before=false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*args, f"hydra.run.dir={straight}"]) == 0
    assert main([*args, f"hydra.run.dir={killed}"]) == 0
    for name in ("step-00000010", "step-00000012"):  # as if killed after step 5's save
        shutil.rmtree(killed / "checkpoints" / name)
    shutil.rmtree(killed / "model")
    assert main([*args, f"hydra.run.dir={tmp_path / 'new'}", f"resume={killed}"]) == 0

    def train_rows(d):
        return [(r["step"], r["epoch"], r["train/loss"]) for r in metrics(d, "train/loss")]

    assert train_rows(killed) == train_rows(straight)
    assert len(train_rows(straight)) == 12
    a = json.loads((straight / "summary.json").read_text())
    assert a["data/train_samples"] == 50
