"""Exact match beyond GSM8K's ``#### n`` (plain numbers, short strings), and the eval
samples ``hift eval`` / ``hift train`` show and store (eval.show_samples)."""

import json
import re
from pathlib import Path

import pytest

from helpers import build_trainer
from hift_cli.cli import main
from hift_cli.evaluate import (
    RULE_GSM,
    RULE_NUMBER,
    RULE_STRING,
    Evaluator,
    _shorten,
    answer_rule,
    rule_of,
    score_answer,
)
from test_formats import sentiment_rows, tiny_bert, write_jsonl  # noqa: F401 (a fixture)

GSM = "She has 3 + 4 = 7 apples.\nThen 7 * 2 = 14.\n#### 14"


@pytest.mark.parametrize("generation,reference,hit", [
    # Plain numbers (reasoning_gym basic_arithmetic, chain_sum, leg_counting): the first
    # line is the answer; what a trained model adds after it does not matter.
    ("-4", "-4", True),
    ("-4\n### Instruction:\nCalculate 2 + 2.", "-4", True),
    ("  1,234.\n\nCalculate 7 * 3.", "1234", True),
    ("1234.0", "1234", True),
    ("$5", "5", True),
    ("-4### Instruction", "-4", True),
    ("106475279601", "106475279601", True),
    ("-5", "-4", False),
    ("", "-4", False),
    # Rambling: the right number at the end of a long text is not an exact answer.
    ("Let me think. 5 - 3 = 2 and 2 - 6 = -4", "-4", False),
    ("5 - 3 - 6\n= -4", "-4", False),
    ("The answer is 7.\nOr -4", "-4", False),
    # Short strings (family_relationships): the first line, normalised.
    ("son", "son", True),
    ("Son.", "son", True),
    ("  Mother-in-law \nHere is why: ...", "mother-in-law", True),
    ("**son**", "son", True),
    ("daughter", "son", False),
    ("He is her son", "son", False),
    ("The relation is son-in-law, and therefore son", "son", False),
    # GSM8K's "#### n" line, as before.
    ("3 + 4 = 7, 7 * 2 = 14\n#### 14", GSM, True),
    ("so 14 in all\n#### 14.00", GSM, True),
    ("#### 13", GSM, False),
    ("3 + 4 = 7 then 14", GSM, True),  # no #### line: its last number (GSM8K's convention)
])
def test_score_answer(generation, reference, hit):
    assert score_answer(generation, reference) is hit


def test_rules():
    assert answer_rule(GSM) == RULE_GSM == "gsm8k-####"
    assert answer_rule("-14282") == RULE_NUMBER == "plain-number"
    assert answer_rule("1,234.5") == RULE_NUMBER
    assert answer_rule("mother-in-law") == RULE_STRING == "short-string"
    assert rule_of(["1", "2"]) == RULE_NUMBER
    assert rule_of(["1", "son"]) == "mixed"


def test_long_texts_are_shortened_in_the_table_only():
    text = "step " * 100 + "#### 42"
    short = _shorten(text)
    assert len(short) <= 240 and short.startswith("step step") and short.endswith("#### 42")
    assert _shorten("") == "(empty)" and _shorten("a\x06b") == "a?b"


def math_file(tmp_path, answers):
    rows = [{"question": f"Calculate {i} + {i}.", "answer": a} for i, a in enumerate(answers)]
    return write_jsonl(tmp_path / "math.jsonl", rows)


def only_run(command="eval"):
    (run,) = Path("outputs", command).glob("*/")
    return run


def test_plain_answers_are_scored_and_the_rule_reported(tmp_path, monkeypatch):
    """The model answers right, then goes on (a new prompt block): exact match 1.0."""
    answers = ["-4", "1234", "7", "son"]
    data = math_file(tmp_path, answers * 2)
    noisy = [a if a != "1234" else "1,234" for a in answers] * 2

    def generate(self, model, prompts, max_new_tokens, batch_size):
        return [f"{a}\n### Instruction:\nCalculate 9 * 9." for a in noisy[: len(prompts)]]

    monkeypatch.setattr(Evaluator, "_generate", generate)
    args = ["recipe=tiny", "data.format=math", f"data.path={data}", f"data.eval_path={data}",
            "eval.exact_match=true", "eval.show_samples=0"]
    assert main(["eval", *args]) == 0
    result = json.load(open(only_run() / "eval.json"))
    assert result["eval/exact_match"] == 1.0
    assert result["eval/exact_match_rule"] == "mixed"
    assert "eval/answer_format" not in result  # no reference has a #### line
    assert "sample_outputs" not in result


@pytest.mark.parametrize("answers,rule", [(["-4", "12"], "plain-number"),
                                          (["son", "aunt"], "short-string"),
                                          ([GSM, "x\n#### 3"], "gsm8k-####")])
def test_the_rule_is_in_eval_json(tmp_path, answers, rule):
    data = math_file(tmp_path, answers)
    assert main(["eval", "recipe=tiny", "data.format=math", f"data.path={data}",
                 f"data.eval_path={data}", "eval.exact_match=true", "eval.max_new_tokens=4",
                 "eval.show_samples=0"]) == 0
    result = json.load(open(only_run() / "eval.json"))
    assert result["eval/exact_match_rule"] == rule
    assert ("eval/answer_format" in result) is (rule == "gsm8k-####")


def test_hift_eval_stores_lm_samples(capsys):
    assert main(["eval", "recipe=tiny", "eval.show_samples=2"]) == 0
    samples = json.load(open(only_run() / "eval.json"))["sample_outputs"]
    assert len(samples) == 2
    assert all(set(s) == {"prompt", "reference", "generation"} for s in samples)
    assert samples[0]["reference"] and samples[0]["prompt"]
    out = capsys.readouterr().out
    assert "eval samples" in out and samples[0]["reference"] in out


def test_text_format_samples_continue_the_text(tmp_path):
    text = "the quick brown fox jumps over the lazy dog " * 3
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": text}] * 4)
    assert main(["eval", "recipe=tiny", "data.format=text", f"data.path={data}",
                 f"data.eval_path={data}", "eval.show_samples=1"]) == 0
    (sample,) = json.load(open(only_run() / "eval.json"))["sample_outputs"]
    # ByT5: a token is a byte; the prompt is the first 32, the reference what follows.
    assert sample["prompt"] == text[:32]
    assert text.startswith(sample["prompt"] + sample["reference"])


def test_chat_samples_answer_the_last_assistant_turn(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}] * 3)
    assert main(["eval", "recipe=tiny", f"data.path={data}", f"data.eval_path={data}",
                 "eval.show_samples=1"]) == 0
    (sample,) = json.load(open(only_run() / "eval.json"))["sample_outputs"]
    assert sample["prompt"] == "user: hi\nassistant: yo\nuser: again"
    assert sample["reference"] == "ok"


def test_hift_eval_stores_classification_samples(tmp_path, tiny_bert):  # noqa: F811
    data = write_jsonl(tmp_path / "reviews.jsonl", sentiment_rows(24))
    assert main(["eval", "recipe=minilm_cls", f"model.name_or_path={tiny_bert}",
                 "model.random_init=true", f"data.path={data}", f"data.eval_path={data}",
                 "eval.show_samples=2"]) == 0
    samples = json.load(open(only_run() / "eval.json"))["sample_outputs"]
    assert [s["text"] for s in samples] == ["good film", "great film"]
    assert [s["label"] for s in samples] == ["pos", "pos"]
    assert all(s["prediction"] in ("pos", "neg") for s in samples)


@pytest.mark.integration
def test_hift_train_stores_samples_before_and_after(capsys):
    assert main(["train", "recipe=tiny", "trainer.max_steps=3", "eval.show_samples=2",
                 "trainer.save_model=false", "trainer.log_every=1"]) == 0
    summary = json.load(open(only_run("train") / "summary.json"))
    before, after = summary["samples_before"], summary["samples_after"]
    assert len(before) == len(after) == 2
    # The same eval records before and after, so the change shows.
    assert [s["prompt"] for s in before] == [s["prompt"] for s in after]
    assert [s["reference"] for s in before] == [s["reference"] for s in after]
    out = capsys.readouterr().out
    assert "eval samples before training" in out and "eval samples after training" in out
    log = next(only_run("train").glob("*.log")).read_text()
    assert "eval samples after training" in log  # in the run's log file too
    # Without a terminal (no progress bar), step lines say how far and how long to go.
    assert re.search(r"step 2/3 cycle 0 group 1 \| loss .* tok/s \| ETA 0:\d\d\n", log), log


def test_ctrl_c_ends_shown_samples_early(tmp_path):
    trainer = build_trainer(tmp_path, "eval.show_samples=3")
    calls = []

    def stop_after_two_tokens() -> bool:  # asked once per generated token
        calls.append(1)
        return len(calls) > 2

    trainer.evaluator.should_stop = stop_after_two_tokens
    rows = trainer.evaluator.samples(trainer.model)
    assert len(rows) == 3 and len(calls) == 3  # one batch: generation ended after 2 tokens
    assert all(len(trainer.tokenizer(r["generation"]).input_ids) <= 4 for r in rows)
    trainer.evaluator.should_stop = lambda: True  # already stopped: nothing generated
    assert {r["generation"] for r in trainer.evaluator.samples(trainer.model)} == {"(stopped)"}


def test_show_samples_zero_stores_none(capsys):
    assert main(["train", "recipe=tiny", "trainer.max_steps=3", "eval.show_samples=0",
                 "trainer.save_model=false"]) == 0
    summary = json.load(open(only_run("train") / "summary.json"))
    assert "samples_before" not in summary and "samples_after" not in summary
    assert "eval samples before training" not in capsys.readouterr().out


def test_show_samples_must_not_be_negative(capsys):
    assert main(["train", "recipe=tiny", "eval.show_samples=-1"]) == 2
    assert "eval.show_samples must be >= 0 (got -1)" in capsys.readouterr().err
