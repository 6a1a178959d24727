"""Units are found structurally for many architectures; groups and orders are exact."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)

from hift_cli.config import ConfigError
from hift_cli.grouping import GroupSchedule, find_units, make_groups

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
             intermediate_size=64)

# (name, config, task class, expected non-block parameter names of embeddings and head)
ARCHS = [
    ("llama", LlamaConfig(**SMALL, num_key_value_heads=2), AutoModelForCausalLM,
     {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    ("llama-tied", LlamaConfig(**SMALL, tie_word_embeddings=True), AutoModelForCausalLM,
     {"model.embed_tokens.weight"}, {"model.norm.weight"}),
    ("mistral", MistralConfig(**SMALL, num_key_value_heads=2), AutoModelForCausalLM,
     {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    ("qwen2", Qwen2Config(**SMALL, num_key_value_heads=2), AutoModelForCausalLM,
     {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
    ("gemma", GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=8), AutoModelForCausalLM,
     {"model.embed_tokens.weight"}, {"model.norm.weight"}),
    ("phi", PhiConfig(**SMALL), AutoModelForCausalLM,
     {"model.embed_tokens.weight"},
     {"model.final_layernorm.weight", "model.final_layernorm.bias", "lm_head.weight",
      "lm_head.bias"}),
    ("gpt2", GPT2Config(vocab_size=99, n_embd=32, n_layer=3, n_head=4), AutoModelForCausalLM,
     {"transformer.wte.weight", "transformer.wpe.weight"},
     {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    # OPT registers final_layer_norm before its layers; the forward order puts it on top.
    ("opt", OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      ffn_dim=64, word_embed_proj_dim=16), AutoModelForCausalLM,
     {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
      "model.decoder.project_in.weight"},
     {"model.decoder.project_out.weight", "model.decoder.final_layer_norm.weight",
      "model.decoder.final_layer_norm.bias"}),
    ("gpt-neox", GPTNeoXConfig(**SMALL), AutoModelForCausalLM,
     {"gpt_neox.embed_in.weight"},
     {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "lm_head.weight"}),
    ("bert-cls", BertConfig(**SMALL), AutoModelForSequenceClassification,
     {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
      "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
      "bert.embeddings.LayerNorm.bias"},
     {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
      "classifier.bias"}),
    ("roberta-cls", RobertaConfig(**SMALL, pad_token_id=1), AutoModelForSequenceClassification,
     {"roberta.embeddings.word_embeddings.weight", "roberta.embeddings.position_embeddings.weight",
      "roberta.embeddings.token_type_embeddings.weight", "roberta.embeddings.LayerNorm.weight",
      "roberta.embeddings.LayerNorm.bias"},
     {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
      "classifier.out_proj.bias"}),
]


@pytest.mark.parametrize("name,config,cls,emb,head", ARCHS, ids=[a[0] for a in ARCHS])
def test_units_cover_every_parameter_once(name, config, cls, emb, head):
    model = cls.from_config(config)
    units = find_units(model)
    assert [u.name for u in units] == ["embeddings", "block.0", "block.1", "block.2", "head"]
    assert set(units[0].params) == emb
    assert set(units[-1].params) == head
    seen = [id(p) for u in units for p in u.params.values()]
    assert len(seen) == len(set(seen)), "a parameter is in two units"
    assert set(seen) == {id(p) for p in model.parameters()}, "a parameter is in no unit"
    for i, unit in enumerate(units[1:-1]):
        assert all(f".{i}." in n for n in unit.params), unit.params.keys()


def test_units_on_meta_device_match_cpu():
    config = LlamaConfig(**SMALL)
    cpu = find_units(AutoModelForCausalLM.from_config(config))
    with torch.device("meta"):
        meta = find_units(AutoModelForCausalLM.from_config(config))
    assert [(u.name, list(u.params)) for u in cpu] == [(u.name, list(u.params)) for u in meta]


def test_encoder_decoder_is_refused_with_a_clear_error():
    model = AutoModelForSequenceClassification.from_config(
        T5Config(vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8))
    with pytest.raises(ConfigError, match="two block stacks"):
        find_units(model)


def test_module_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="no stack of transformer blocks"):
        find_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _units(n):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, "num_hidden_layers": n - 2}))
    return find_units(model)


@pytest.mark.parametrize("k,sizes", [(1, [7]), (2, [4, 3]), (3, [3, 2, 2]), (7, [1] * 7)])
def test_k_groups_are_contiguous_and_balanced(k, sizes):
    units = _units(7)
    groups = make_groups(units, "bottom2up", k, None)
    assert [len(g.units) for g in groups] == sizes
    assert [u for g in groups for u in g.units] == units


@pytest.mark.parametrize("m,sizes", [(1, [1] * 7), (2, [2, 2, 2, 1]), (3, [3, 3, 1]), (7, [7])])
def test_m_units_per_group(m, sizes):
    groups = make_groups(_units(7), "top2down", None, m)
    assert [len(g.units) for g in groups] == sizes


def test_fpft_is_one_group_of_everything():
    units = _units(5)
    (group,) = make_groups(units, "fpft", 3, None)
    assert group.units == units


def test_too_many_groups_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"hift.k=9 but there are only 5 units to group"):
        make_groups(_units(5), "bottom2up", 9, None)
    with pytest.raises(ConfigError, match=r"hift.m=6 but there are only 5 units to group"):
        make_groups(_units(5), "bottom2up", None, 6)


def test_strategy_orders():
    assert [GroupSchedule("bottom2up", 4, 0).group_at(t) for t in range(8)] == [0, 1, 2, 3] * 2
    assert [GroupSchedule("top2down", 4, 0).group_at(t) for t in range(8)] == [3, 2, 1, 0] * 2
    assert [GroupSchedule("fpft", 1, 0).group_at(t) for t in range(3)] == [0, 0, 0]


def test_random_reshuffles_every_cycle_and_is_reproducible():
    schedule = GroupSchedule("random", 6, seed=7)
    orders = [schedule.order(c) for c in range(10)]
    assert all(sorted(o) == list(range(6)) for o in orders)  # each cycle visits every group
    assert len({tuple(o) for o in orders}) > 5  # fresh shuffles, not one order repeated
    assert orders == [GroupSchedule("random", 6, seed=7).order(c) for c in range(10)]
    assert orders != [GroupSchedule("random", 6, seed=8).order(c) for c in range(10)]
    assert [schedule.group_at(t) for t in range(12)] == orders[0] + orders[1]


def test_cycle_bookkeeping():
    schedule = GroupSchedule("bottom2up", 3, 0)
    assert [schedule.ends_cycle(t) for t in range(6)] == [False, False, True] * 2
    assert schedule.num_cycles(7) == 3
