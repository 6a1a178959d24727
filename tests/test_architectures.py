"""Every architecture hift supports trains and gets a memory estimate: tiny random models
built from config (3 blocks, hidden 32) with a 259-token byte-level tokenizer."""

import json
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from helpers import compose_config
from hift_cli import grouping, memory, memprofile
from hift_cli.cli import main
from hift_cli.config import ConfigError

LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128)
MHA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=128)  # configs without key/value head groups
ARCHS = {  # model_type: config arguments (each config class's own names)
    "llama": LM, "mistral": LM, "qwen2": LM, "qwen3": dict(LM, head_dim=8),
    "mixtral": dict(LM, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "gemma": dict(LM, head_dim=8), "gemma2": dict(LM, head_dim=8),
    "gemma3_text": dict(LM, head_dim=8),
    "phi": LM, "phi3": LM, "stablelm": LM, "olmo2": LM,
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128),
    "gpt_neox": MHA,
    "bloom": dict(hidden_size=32, n_layer=3, n_head=4),
    "falcon": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4),
    "gptj": dict(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=128),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=2, n_positions=128),
    # sequence classification
    "bert": MHA, "roberta": MHA, "electra": dict(MHA, embedding_size=32),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=3, n_heads=4,
                       max_position_embeddings=128),
    "deberta-v2": MHA,
}
CLASSIFIERS = {"bert", "roberta", "electra", "distilbert", "deberta-v2"}
# DeBERTa-v2's classification loss calls nonzero(), which meta tensors cannot run.
SAMPLED = {"deberta-v2"}
# The fast tier's share of the per-architecture matrix: a dense decoder, a mixture of
# experts, GPT-2's fused attention and an encoder (make test runs every one).
FAST_ARCHS = ("llama", "qwen2_moe", "gpt2", "bert")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, as a fast tokenizer: with the slow ByT5 one of the tiny LLaMA,
    AutoTokenizer fails for Mistral configs (it then insists on a tokenizer.json)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    vocab.update({c: i + 3 for i, c in enumerate(sorted(byte_level.alphabet()))})
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A folder per architecture (config + tokenizer; hift builds the random model from
    it) and a classification file."""
    root = tmp_path_factory.mktemp("archs")
    tokenizer = byte_tokenizer()
    for name, kwargs in ARCHS.items():
        config = AutoConfig.for_model(name, vocab_size=len(tokenizer), pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None, **kwargs)
        config.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    (root / "reviews.jsonl").write_text("".join(
        json.dumps({"text": f"{words[i % 6]} film", "label": "pos" if i % 6 < 3 else "neg"})
        + "\n" for i in range(48)))
    return root


def overrides(models: Path, name: str) -> list[str]:
    args = ["recipe=tiny", f"model.name_or_path={models / name}", "trainer.device=cpu"]
    if name in CLASSIFIERS:
        args += ["data.format=classification", "model.task=sequence_classification",
                 f"data.path={models / 'reviews.jsonl'}"]
    return args


@pytest.mark.parametrize("name", [n if n in FAST_ARCHS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ARCHS])
def test_memprofile_prints_its_table(models, name, capsys):
    assert main(["memprofile", *overrides(models, name)]) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "peak group" in out
    assert ("scaled from a 2-block CPU sample" if name in SAMPLED
            else "activations: meta forward pass") in out


@pytest.mark.integration
@pytest.mark.parametrize("name", ARCHS)
def test_short_training_writes_the_memory_report(models, name, tmp_path):
    args = ["trainer.max_steps=3", "trainer.batch_size=4", "trainer.eval_before=false",
            "trainer.save_model=false", "data.max_eval_samples=8", "eval.show_samples=1"]
    assert main(["train", *overrides(models, name), *args]) == 0
    (run,) = Path("outputs/train").iterdir()
    # The shown sample generated (prompt + 128 new tokens may pass GPT-2's or OPT's
    # 128 positions: generation must fit them).
    assert len(json.load(open(run / "summary.json"))["samples_after"]) == 1
    report = json.load(open(run / "memory_report.json"))
    # Embeddings, 3 blocks, head; a 99-token vocabulary's embeddings or head larger than a
    # block are cut into sub-units.
    units = [u for g in report["per_group"] for u in g["units"]]
    assert {u.split(".")[0] for u in units} >= {"embeddings", "block"}
    assert report["units"] == len(units) >= 5 and report["unit_split_method"] == "meta"
    assert report["activation_method"] == ("cpu-sample-scaled" if name in SAMPLED else "meta")
    assert 0 < report["hift"]["activations"] < report["fpft"]["activations"]


def force_sampled_activations(monkeypatch):
    def fail(*args):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")
    monkeypatch.setattr(memory.activations, "activation_bytes", fail)


@pytest.mark.parametrize("precision,checkpointing", [("fp32", "false"), ("bf16-mixed", "false"),
                                                     ("bf16-mixed", "true")])
def test_sampled_activations_match_the_meta_pass_and_measurement(
        tiny_cfg, tmp_path, monkeypatch, precision, checkpointing):
    # Batch 5 x 64 tokens: both outside the sample's shapes (batch 2 and 3, lengths 8,
    # 16, 24), so both are extrapolated.
    cfg = tiny_cfg("trainer.device=cpu", f"trainer.precision={precision}",
                   f"model.dtype={'float32' if precision == 'fp32' else 'bfloat16'}",
                   f"model.gradient_checkpointing={checkpointing}", "hift.offload=true",
                   "trainer.batch_size=5", "memprofile.seq_len=64")
    meta = memory.estimate(cfg)
    force_sampled_activations(monkeypatch)
    sampled = memory.estimate(cfg)
    assert (meta["activation_method"], sampled["activation_method"]) == (
        "meta", "cpu-sample-scaled")
    # Exact for the LLaMA blocks: every group, fpft and HiFT.
    assert [g["activations"] for g in sampled["per_group"]] == \
        [g["activations"] for g in meta["per_group"]]
    assert sampled["fpft"]["activations"] == meta["fpft"]["activations"]
    if checkpointing == "false":  # measure() counts saved tensors without recomputation
        measured = memprofile.measure(cfg, tmp_path)
        for column in ("fpft", "hift"):
            assert sampled[column]["activations"] == pytest.approx(
                measured[column]["activations"], rel=0.001)


@pytest.mark.parametrize("name", ["opt", "gpt2", "bloom", "bert"])
def test_unit_split_falls_back_to_the_cpu_sample(models, name, monkeypatch):
    cfg = compose_config(*overrides(models, name)[1:])
    with memory.counting_kernels():
        meta_units = [(u.name, sorted(u.params))
                      for u in grouping.find_units(memory.meta_model(cfg))]
    forward_order = grouping._forward_order

    def fails_on_meta(model, stack):
        if next(model.parameters()).is_meta:
            raise grouping.ForwardPassError("cannot split: a 2-token forward pass failed")
        return forward_order(model, stack)

    monkeypatch.setattr(grouping, "_forward_order", fails_on_meta)
    sample = memory.sample_model(cfg)
    assert len(grouping.block_stack(sample)[1]) == memory.SAMPLE_BLOCKS
    units = grouping.find_units(memory.meta_model(cfg), reference=sample)
    assert [(u.name, sorted(u.params)) for u in units] == meta_units
    report = memory.estimate(cfg)
    assert (report["unit_split_method"], report["activation_method"]) == ("cpu-sample", "meta")


def test_the_sample_cuts_per_layer_lists(models):
    sample = memory.sample_model(compose_config(*overrides(models, "gemma2")[1:]))
    assert sample.config.layer_types == ["sliding_attention", "full_attention"]
    assert len(sample.model.layers) == 2


def test_no_estimate_when_the_sample_fails_too(tiny_cfg, monkeypatch):
    force_sampled_activations(monkeypatch)

    def fail(*args):
        raise RuntimeError("needs CUDA")
    monkeypatch.setattr(memory.sample, "_sample_stats", fail)
    with pytest.raises(ConfigError, match=r"cannot estimate the activations of"
                       r" LlamaForCausalLM: its forward pass fails on meta tensors"
                       r" \(RuntimeError: Tensor.item\(\) .*\) and on a CPU sample"
                       r" \(RuntimeError: needs CUDA\)"):
        memory.estimate(tiny_cfg("trainer.device=cpu"))
