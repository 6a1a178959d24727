"""Bad input, as a new user gives it: one line naming what is wrong, a non-zero exit, no
traceback, no run folder left behind; a full disk loses no work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hift_cli import checkpoint
from hift_cli.checkpoint import complete_checkpoints
from hift_cli.cli import main

TINY = ["recipe=tiny", "trainer.max_steps=2", "trainer.eval_before=false"]


def refused(capsys, *args, code=2) -> str:
    """Run ``hift *args``: it must exit ``code`` with one line on stderr and leave no run
    folder; that line."""
    assert main(list(args)) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    left = [p for p in Path("outputs").rglob("*") if p.is_file()] if Path("outputs").exists() \
        else []
    assert not left, left
    return err.strip()


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.integration
def test_bad_input_matrix(capsys, tmp_path):
    # A record whose output is a list: the file, the record, the field, the type.
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"instruction": "2+2", "output": [4]}] * 4)
    assert refused(capsys, "train", *TINY, f"data.path={nested}", "data.eval_fraction=0") == (
        f"hift train: error: data: {nested}: train record 0 field 'output' is a list (nested),"
        " not text")
    # Typed optimizer keys name the key.
    for key, value, kind in (("lr", "abc", "a number"), ("weight_decay", "abc", "a number"),
                             ("eps", "x", "a number"), ("betas", "[0.9]", "a list of 2 numbers")):
        assert refused(capsys, "train", *TINY, f"optimizer.{key}={value}").endswith(
            f"optimizer.{key} must be {kind} (got {'[0.9]' if key == 'betas' else repr(value)})")
    # A folder that cannot be created (a path through a file), for every command.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for command in ("train", "eval", "memprofile"):
        assert refused(capsys, command, "recipe=tiny", f"hydra.run.dir={blocker}/run") == (
            f"hift {command}: error: cannot create the output folder {blocker}/run: Not a"
            " directory (give a folder you can write: hydra.run.dir, or hydra.sweep.dir with -m)")


@pytest.mark.integration
def test_numbers_in_a_text_field_are_read_as_text(capsys, tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl",
                       [{"instruction": f"{i} + {i}", "output": 2 * i} for i in range(8)])
    assert main(["train", *TINY, f"data.path={data}", "data.eval_fraction=0",
                 "trainer.save_model=false"]) == 0
    assert "train field 'output' holds int64 values; read as text" in capsys.readouterr().out


@pytest.mark.integration
def test_a_truncated_weights_file_is_named(capsys, tmp_path):
    assert main(["train", *TINY, "hydra.run.dir=outputs/ok"]) == 0
    capsys.readouterr()
    model = Path("outputs/ok/model")
    weights = model / "model.safetensors"
    assert oct(weights.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not private
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    for args in (["eval", "recipe=tiny", f"checkpoint={model}"],
                 ["train", *TINY, f"model.name_or_path={model}", "model.random_init=false"]):
        assert main([*args, "hydra.run.dir=outputs/bad"]) == 2
        err = capsys.readouterr().err
        assert err.strip().endswith(f"error: {weights} is incomplete or corrupt (Error while"
                                    " deserializing header: incomplete metadata, file not fully"
                                    " covered): download or save it again"), err
        assert "Traceback" not in err and not Path("outputs/bad").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.integration
def test_memprofile_shows_the_smallest_grouping_when_none_fits(capsys):
    code = main(["memprofile", "recipe=tiny", "hift.k=auto", "hift.memory_budget=0.0001",
                 "trainer.device=cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "no grouping fits" in err
    assert "6 contiguous groups" in out and "does NOT fit" in out  # k=6: one unit per group


@pytest.mark.integration
def test_resume_refuses_settings_the_saved_state_depends_on(capsys):
    assert main(["train", *TINY, "trainer.max_steps=3", "trainer.save_every=3", "hift.k=3",
                 "hydra.run.dir=outputs/run"]) == 0
    capsys.readouterr()
    for change, said in (("hift.k=2", "was saved with 3 group(s) (embeddings,block.0;"),
                         ("hift.strategy=random", "hift.strategy=bottom2up, this run has"
                          " hift.strategy=random: resume with the same hift.strategy")):
        assert main(["train", *TINY, "trainer.max_steps=6", change, "resume=outputs/run"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err


@pytest.mark.integration
def test_a_write_error_while_saving_keeps_the_earlier_checkpoints(capsys, monkeypatch):
    real_save, calls = torch.save, []

    def disk_full_at_the_third(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:  # what torch.save raises when the disk fills up
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_the_third)
    args = ["train", "recipe=tiny", "trainer.max_steps=4", "trainer.save_every=1",
            "trainer.keep_last=5", "trainer.eval_before=false"]
    assert main([*args, "hydra.run.dir=outputs/run"]) == 74  # an I/O error, not bad input
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "run/checkpoints/step-00000003: [enforce fail at inline_container.cc:672]" in err
    assert "; the previous checkpoint" in err and "step-00000002 is intact" in err
    run = Path("outputs/run")
    assert [c.name for c in complete_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002"]  # no partial folder
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main([*args, "resume=outputs/run"]) == 0  # space freed: on from step 2
    assert [c.name for c in complete_checkpoints(run)][-1] == "step-00000004"


@pytest.mark.integration
def test_a_run_folder_too_small_for_one_checkpoint_stops_before_training(tmp_path):
    """In a subprocess, on a 2 MiB tmpfs (as root), else a monkeypatched free space."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
        capture_output=True).returncode == 0
    code = "import sys; from hift_cli.cli import main; sys.exit(main(sys.argv[1:]))"
    if not mounted:
        code = ("import shutil, sys; from collections import namedtuple as n;"
                " shutil.disk_usage = lambda p: n('u', 'total used free')(2**21, 0, 2**21);"
                + code)
    try:
        out = subprocess.run([sys.executable, "-c", code, "train", *TINY,
                              f"hydra.run.dir={small}/run"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300).stdout
        assert out.rstrip().splitlines()[-1].startswith(
            f"hift train: error: a checkpoint of this run needs ~2.3 MiB and {small}/run has"), out
        assert "Traceback" not in out and "Step 1" not in out and not (small / "run").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(small)])


@pytest.mark.integration
def test_without_the_final_state_only_the_model_is_kept(capsys):
    assert main(["train", *TINY, "trainer.save_every=1", "trainer.save_final_state=false",
                 "hydra.run.dir=outputs/run"]) == 0
    run = Path("outputs/run")
    assert not (run / "checkpoints").exists() and not list(run.glob(".tmp-*"))
    assert sorted(p.name for p in (run / "model").iterdir()) == [
        "added_tokens.json", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer_config.json"]
    assert "trainer.save_final_state=false: kept" in (run / "train.log").read_text()


@pytest.mark.integration
def test_eval_of_a_run_takes_the_runs_own_settings(capsys, tmp_path):
    data = write_jsonl(tmp_path / "own.jsonl",
                       [{"instruction": f"say {w}", "output": w} for w in "abcdefghij"])
    assert main(["train", *TINY, f"data.path={data}", "data.eval_fraction=0.3",
                 "hydra.run.dir=outputs/run"]) == 0
    # No recipe= (the default is the demo's): the run's model and data, this line on top.
    assert main(["eval", "checkpoint=outputs/run", "data.max_eval_samples=2",
                 "hydra.run.dir=outputs/eval"]) == 0
    result = json.loads(Path("outputs/eval/eval.json").read_text())
    assert result["data"] == data and result["samples"] == 2
    assert result["model"].endswith("outputs/run/model")
    assert "Loading " + result["model"] in capsys.readouterr().out
