"""Instruction data: which tokens carry loss, truncation, batching."""

import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from hift_cli.config import ASSETS_DIR, ConfigError, DataConfig
from hift_cli.data import IGNORE_INDEX, collate, load_splits, tokenize, train_batches


@pytest.fixture(scope="module")
def byte_tok():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_llama")  # ByT5: id = byte + 3


def cfg(**kw):
    return DataConfig(path=str(ASSETS_DIR / "tiny_instructions.jsonl"), **kw)


def test_labels_mask_the_prompt_exactly(byte_tok):
    ds = Dataset.from_list([{"instruction": "Add 1 and 2.", "input": "", "output": "3"}])
    (row,) = tokenize(ds, byte_tok, cfg(), None, "train")
    prompt = "### Instruction:\nAdd 1 and 2.\n\n### Response:\n"  # empty Input block dropped
    prompt_ids = [b + 3 for b in prompt.encode()]
    assert row["input_ids"] == prompt_ids + [ord("3") + 3, byte_tok.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + [ord("3") + 3, 1]


def test_input_field_goes_into_the_prompt(byte_tok):
    ds = Dataset.from_list([{"instruction": "Reverse.", "input": "ab", "output": "ba"}])
    (row,) = tokenize(ds, byte_tok, cfg(), None, "train")
    text = bytes(i - 3 for i in row["input_ids"][:-1]).decode()
    assert text == "### Instruction:\nReverse.\n\n### Input:\nab\n\n### Response:\nba"


def test_truncation_keeps_partial_responses_and_drops_empty_ones(byte_tok):
    ds = Dataset.from_list([
        {"instruction": "x", "input": "", "output": "y" * 50},   # response cut short: kept
        {"instruction": "x" * 80, "input": "", "output": "z"},  # response cut away: dropped
    ])
    out = tokenize(ds, byte_tok, cfg(max_length=64), None, "train")
    assert len(out) == 1
    assert len(out[0]["input_ids"]) == 64
    assert out[0]["labels"][-1] == ord("y") + 3


def test_every_sample_dropped_is_a_clear_error(byte_tok):
    ds = Dataset.from_list([{"instruction": "x" * 80, "input": "", "output": "z"}])
    with pytest.raises(ConfigError, match="leaves no room for the response"):
        tokenize(ds, byte_tok, cfg(max_length=40), None, "train")


def test_missing_fields_are_named(byte_tok):
    ds = Dataset.from_list([{"prompt": "x", "completion": "y"}])
    with pytest.raises(ConfigError, match=r"need fields \['instruction', 'output'\]"):
        tokenize(ds, byte_tok, cfg(), None, "train")


def test_chat_template_path_masks_the_templated_prompt(byte_tok):
    byte_tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}" \
                             "{% if add_generation_prompt %}:{% endif %}"
    try:
        ds = Dataset.from_list([{"instruction": "hi", "input": "", "output": "yo"}])
        (row,) = tokenize(ds, byte_tok, cfg(), None, "train")
    finally:
        byte_tok.chat_template = None
    assert bytes(i - 3 for i in row["input_ids"][:-1]).decode() == "<hi>:yo"
    assert row["labels"] == [IGNORE_INDEX] * 5 + [ord("y") + 3, ord("o") + 3, 1]


def test_local_jsonl_with_held_out_fraction(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": str(i), "output": "o"}) + "\n"
                            for i in range(40)))
    splits = load_splits(DataConfig(path=str(path), eval_fraction=0.25))
    assert (len(splits.train), len(splits.eval)) == (30, 10)
    assert not set(splits.train["instruction"]) & set(splits.eval["instruction"])


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="data.path: cannot load"):
        load_splits(DataConfig(path=str(path)))


def test_a_malformed_json_line_is_named_in_the_error(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp\n'
                    '{"instruction": "e", "output": "f"}\n')
    with pytest.raises(ConfigError) as e:
        load_splits(DataConfig(path=str(path)))
    # The parse error and its row (0-based: the second line), not only datasets' wrapper.
    assert "JSON parse error" in str(e.value) and "row 1" in str(e.value), e.value
    assert "\n" not in str(e.value)


def test_a_record_missing_a_field_is_named(tmp_path, byte_tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    splits = load_splits(DataConfig(path=str(path), eval_fraction=0))
    with pytest.raises(ConfigError, match=r"data: 1 train records have no 'output' \(missing or"
                       r' null\), e.g. {"instruction": "c", "output": null}'):
        tokenize(splits.train, byte_tok, cfg(), None, "train")


def test_batches_pad_dynamically_and_are_seeded():
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 5, 2, 4)]
    batch = collate(rows[:2], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 5, 5, 0, 0], [5] * 5]
    assert batch["labels"][0].tolist() == [5, 5, 5, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].sum().item() == 8
    ds = Dataset.from_list(rows)
    a = [b["input_ids"].shape for _, b in zip(range(6), train_batches(ds, 2, 0, seed=1))]
    b = [b["input_ids"].shape for _, b in zip(range(6), train_batches(ds, 2, 0, seed=1))]
    assert a == b
