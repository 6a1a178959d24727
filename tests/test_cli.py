"""The ``hift`` command end to end, in-process, on the tiny recipe."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from helpers import compose_config, metrics
from hift_cli.cli import main

RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "recipes" / "recipe").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run_dirs(kind="outputs", command="train"):
    return sorted(Path(kind, command).glob("*/"))


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "hift train" in out
    # Every shipped recipe, from the packaged recipes (cannot go stale).
    listed = next(line for line in out.splitlines() if line.startswith("recipes:"))
    assert all(name in listed for name in RECIPES), listed
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hift 0.")


def test_train_help_lists_config_groups(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert ("recipe: demo, llama3_8b_alpaca, llama7b_alpaca, minilm_cls, minilm_family,"
            " roberta_large_sst2, smollm2_gsm, tiny") in out


def test_cfg_job_prints_the_composed_config(capsys):
    assert main(["train", "recipe=tiny", "hift.k=2", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "strategy: bottom2up" in out and "k: 2" in out
    assert not Path("outputs").exists()  # printing the config runs nothing


# Recipes that run on the user's own file say so with a mandatory data.path.
NEEDS_DATA = {"minilm_cls"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n')
    extra = [f"data.path={path}"] if recipe in NEEDS_DATA else []
    cfg = compose_config(*extra, recipe=recipe)
    assert cfg.trainer.max_steps > 0 and cfg.optimizer["_target_"]


def test_a_recipe_missing_its_data_path_says_so(capsys):
    assert main(["train", "recipe=minilm_cls"]) == 2
    assert capsys.readouterr().err == ("hift train: error: data.path is required: add"
                                       " data.path=... to the command line\n")


@pytest.mark.integration
def test_train_writes_config_metrics_and_a_loadable_model(capsys):
    code = main(["train", "recipe=tiny", "hift.strategy=top2down", "hift.k=3",
                 "trainer.max_steps=12"])
    assert code == 0
    (run,) = run_dirs()
    rows = metrics(run)
    steps = [r for r in rows if "train/loss" in r]
    assert [r["group"] for r in steps] == [2, 1, 0] * 4
    assert [r["cycle"] for r in steps] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert set(steps[0]) >= {"step", "cycle", "group", "train/loss", "lr", "tokens_per_second"}
    assert "eval/loss" in rows[0] and "eval/loss" in rows[-1]
    assert "strategy: top2down" in (run / "config.yaml").read_text()
    plan = OmegaConf.load(run / "plan.yaml")  # what the settings came to
    assert (plan.max_steps, plan.cycle_steps, plan.num_cycles) == (12, 3, 4)
    memory = json.load(open(run / "memory_report.json"))
    assert memory["groups"] == 3 and memory["measured"]["peak_rss"] > 0
    assert memory["hift"]["total"] < memory["fpft"]["total"]
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.num_hidden_layers == 4
    assert (run / "model" / "model.safetensors").exists()

    # hift eval on that checkpoint reproduces the final eval loss of the run.
    assert main(["eval", "recipe=tiny", f"checkpoint={run}"]) == 0
    (eval_run,) = run_dirs(command="eval")
    result = json.load(open(eval_run / "eval.json"))
    assert result["eval/loss"] == pytest.approx(rows[-1]["eval/loss"], rel=1e-5)


@pytest.mark.integration
def test_multirun_gives_one_dir_per_job():
    assert main(["train", "-m", "recipe=tiny", "hift.k=2,4", "trainer.max_steps=4"]) == 0
    (sweep,) = run_dirs("multirun")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_hift.k=2,recipe=tiny,trainer.max_steps=4",
                    "1_hift.k=4,recipe=tiny,trainer.max_steps=4"]
    groups = [{r["group"] for r in metrics(sweep / j, "group")} for j in jobs]
    assert groups == [{0, 1}, {0, 1, 2, 3}]
    # The sweep summary: one row per job with its overrides and final metrics.
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == jobs
    assert rows[1]["overrides"] == "recipe=tiny hift.k=4 trainer.max_steps=4"
    for r, j in zip(rows, jobs):
        summary = json.load(open(sweep / j / "summary.json"))
        assert float(r["eval/loss"]) == pytest.approx(summary["eval/loss"])
        assert float(r["train/loss"]) == pytest.approx(summary["train/loss"])


@pytest.mark.integration
def test_m_on_the_command_line_wins_over_the_recipes_k():
    # recipe=tiny sets hift.k=3; the user's hift.m=2 alone replaces it.
    assert main(["train", "recipe=tiny", "hift.m=2", "trainer.max_steps=3"]) == 0
    (run,) = run_dirs()
    summary = json.load(open(run / "summary.json"))
    assert summary["groups"] == 3
    assert "m: 2" in (run / "config.yaml").read_text()
    cfg = compose_config("hift.m=2")
    assert (cfg.hift.k, cfg.hift.m) == (None, 2)
    cfg = compose_config("hift.m=1", recipe="llama7b_alpaca")  # which sets k=auto
    assert (cfg.hift.k, cfg.hift.m) == (None, 1)


@pytest.mark.integration
def test_a_sweep_over_m_on_a_recipe_with_k():
    assert main(["train", "-m", "recipe=tiny", "hift.m=2,3", "trainer.max_steps=2",
                 "trainer.eval_before=false"]) == 0
    (sweep,) = run_dirs("multirun")
    groups = [json.load(open(j / "summary.json"))["groups"]
              for j in sorted(p for p in sweep.iterdir() if p.is_dir())]
    assert groups == [3, 2]


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("bf16-mixed", "bfloat16")])
def test_the_precision_alone_decides_the_weights_dtype(precision, dtype):
    for recipe in ("tiny", "llama7b_alpaca"):
        cfg = compose_config(f"trainer.precision={precision}", recipe=recipe)
        assert cfg.weights_dtype() == dtype
        assert cfg.model.dtype is None  # derived, never written into the config


@pytest.mark.slow
def test_memprofile_of_the_7b_recipe_in_fp32(capsys):
    # One unit per group: fp32 weights alone are over the recipe's 24 GiB budget.
    assert main(["memprofile", "recipe=llama7b_alpaca", "trainer.precision=fp32",
                 "hift.m=1"]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "llama-7b" in out
    # fp32 weights: 6.74e9 x 4 bytes = 25.1 GiB.
    weights = next(line for line in out.splitlines() if "weights" in line)
    assert "25.103" in weights


@pytest.mark.integration
def test_a_setup_error_is_the_last_line_on_the_screen(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n' * 3 + '{"text": 1}\n')
    out = subprocess.run(
        [sys.executable, "-m", "hift_cli", "train", "recipe=tiny", f"data.path={bad}",
         "data.eval_fraction=0"], capture_output=False, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=tmp_path).stdout
    lines = out.strip().splitlines()
    assert lines[-1].startswith("hift train: error: "), out
    assert "strategy: bottom2up" not in out  # the config is not dumped on the screen


@pytest.mark.integration
def test_every_run_plots_its_loss(capsys):
    assert main(["train", "recipe=tiny", "trainer.max_steps=6"]) == 0
    (run,) = run_dirs()
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_module

    with initialize_config_module("hift_cli.recipes", version_base="1.3"):
        cfg = compose("config", overrides=["recipe=tiny", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.nodes) == (1, 1)


def test_hydra_command_line_misuse_is_one_line(capsys):
    assert main(["train", "-m", "recipe=tiny", "--cfg", "job"]) == 2
    err = capsys.readouterr().err
    assert err == ("hift train: error: Only one of --run, --multirun, --cfg, --info and"
                   " --shell_completion can be specified\n")


@pytest.mark.parametrize("args,message", [
    (["hift.k=0"], "hift train: error: hift.k must be >= 1 (got 0)"),
    (["recipe=nope"], "hift train: error: In 'config': Could not find 'recipe/nope'"
                      " (available: demo, llama3_8b_alpaca, llama7b_alpaca, minilm_cls,"
                      " minilm_family, roberta_large_sst2, smollm2_gsm, tiny)"),
    (["hift.strategy=sideways"], "hift train: error: hift.strategy must be one of bottom2up,"
                                 " top2down, random, fpft (got 'sideways')"),
    (["hift.kk=3"], "hift train: error: Could not override 'hift.kk'."
                    " Key 'kk' not in 'HiftConfig'"),
    (["data.path=/no/such.jsonl"], "hift train: error: data.path: no such file: /no/such.jsonl"),
    (["hift.k=7"], "hift train: error: hift.k=7 but there are only 6 units to group"
                   " (embeddings, 4 blocks, head); use hift.k <= 6"),
    (["hift.k=2", "hift.m=2"], "hift train: error: set exactly one of hift.k"),
    (["trainer.precision=bf16", "model.dtype=float32"],
     "hift train: error: trainer.precision=bf16 needs model.dtype=bfloat16 (got float32)"),
    (["model.name_or_path=nobody/nothing"], "hift train: error: model.name_or_path: cannot load"
                                            " 'nobody/nothing'"),
    (["trainer.device=tpu9"], "hift train: error: trainer.device: unknown device 'tpu9'"),
    (["optimizer._target_=torch.optim.Nope"], "hift train: error: optimizer._target_: cannot"
                                              " import 'torch.optim.Nope'"),
])
def test_bad_input_is_one_clear_line(capsys, args, message):
    code = main(["train", "recipe=tiny", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(Path("outputs").glob("train/*"))  # no empty run folder left behind


def test_unknown_command(capsys):
    assert main(["frob"]) == 2
    assert "unknown command 'frob'" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint(capsys):
    assert main(["eval", "recipe=tiny", "checkpoint=/no/such/run"]) == 2
    assert "checkpoint: no saved model (config.json) in /no/such/run" in capsys.readouterr().err
