"""``hift generate``: prompts formatted as training formatted them, greedy and seeded
sampling, prompts from the command line or stdin, and one-line errors."""

import io
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import AutoConfig

from helpers import compose_config
from hift_cli.cli import main
from hift_cli.config import GenerateConfig
from hift_cli.data import IGNORE_INDEX, tokenize
from hift_cli.generate import Generator, load_generator
from hift_cli.models import load_model, load_tokenizer

TEMPLATE = "Q: {instruction}\nA: "  # the run's own, unlike any recipe's


def make_run(root: Path) -> Path:
    """A run dir as ``hift train`` leaves it (config.yaml with its own prompt template,
    summary.json, memory_report.json, model/, a checkpoint); the model is the tiny LLaMA
    at a seeded random init, so no training is needed."""
    cfg = compose_config()
    cfg.data.prompt_template = TEMPLATE
    root.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), root / "config.yaml", resolve=True)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    torch.manual_seed(2)  # an init whose greedy answers are not empty
    model = load_model(cfg.model, cfg.model.name_or_path, tokenizer.pad_token_id,
                       cfg.weights_dtype())
    checkpoint = root / "checkpoints" / "step-00000004"
    for folder in (root / "model", checkpoint):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    (checkpoint / "COMPLETE").touch()
    (checkpoint / "training_state.pt").write_bytes(b"optimizer state")
    (root / "summary.json").write_text(json.dumps(
        {"eval/loss_before": 5.9579, "eval/loss": 5.4186, "eval/perplexity_before": 386.82,
         "eval/perplexity": 225.56, "groups": 3, "data/train_samples": 243}))
    (root / "memory_report.json").write_text(json.dumps({"params": 197184, "units": 6,
                                                         "groups": 3}))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("gen") / "run")


@pytest.fixture
def prompts_seen(monkeypatch):
    """The texts the model was asked to answer, as they reached the Generator."""
    seen, original = [], Generator.prompt_ids
    monkeypatch.setattr(Generator, "prompt_ids", lambda self, text: seen.append(text)
                        or original(self, text))
    return seen


def test_the_prompt_is_the_one_training_saw(run):
    # The recipe (demo: math, no such template) is not what the run trained with.
    generator = load_generator(compose_config(f"checkpoint={run}", recipe="demo"))
    record = Dataset.from_list([{"instruction": "Reverse: abc", "input": "", "output": "cba"}])
    row = tokenize(record, generator.tok, generator.data_cfg, None, "train")[0]
    trained = [i for i, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
    assert generator.prompt_ids("Reverse: abc") == trained
    assert generator.tok.decode(trained) == "Q: Reverse: abc\nA: "


def test_a_prompt_is_answered_greedily_as_typed(run, capsys, prompts_seen):
    prompt = "Reverse: abc, then what's ${x}? \\'"  # commas, quotes, ${ reach the model as typed
    assert main(["generate", f"checkpoint={run}", f"prompt={prompt}",
                 "generate.max_new_tokens=12"]) == 0
    assert prompts_seen == [prompt]
    out, err = capsys.readouterr()
    answer = load_generator(compose_config(f"checkpoint={run}", "generate.max_new_tokens=12")
                            ).answer(prompt)
    assert answer and out == answer + "\n"  # stdout: the streamed answer alone
    assert "Prompts: data.prompt_template; greedy; at most 12 new tokens" in err
    assert not list(Path("outputs").glob("generate/*"))  # a conversation leaves no folder


def test_sampling_is_seeded(run):
    generator = load_generator(compose_config(f"checkpoint={run}"))

    def sampled(seed):
        generator.cfg = GenerateConfig(max_new_tokens=8, temperature=1.0, top_k=50, seed=seed)
        return generator.answer("Count the letters: stone")

    assert sampled(0) == sampled(0) != sampled(1)


def test_stdin_lines_are_answered_until_an_empty_line(run, capsys, monkeypatch, prompts_seen):
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond, too\n\nnever\n"))
    assert main(["generate", f"checkpoint={run}", "generate.max_new_tokens=4"]) == 0
    assert prompts_seen == ["first", "second, too"]


class Terminal(io.StringIO):
    """A terminal whose user types ``lines`` and then presses ``end`` (Ctrl-C or Ctrl-D)."""

    def __init__(self, lines, end):
        super().__init__(lines)
        self.end = end

    def isatty(self):
        return True

    def readline(self, *args):
        line = super().readline(*args)
        if not line and self.end is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line  # "": input() raises EOFError, as at Ctrl-D


@pytest.mark.parametrize("end", [KeyboardInterrupt, EOFError])
def test_the_interactive_loop_ends_cleanly(run, capsys, monkeypatch, prompts_seen, end):
    monkeypatch.setattr("sys.stdin", Terminal("hello\n", end))
    assert main(["generate", f"checkpoint={run}", "generate.max_new_tokens=4"]) == 0
    assert prompts_seen == ["hello"]
    assert capsys.readouterr().out.count("> ") == 2  # asked twice, answered once


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    config = AutoConfig.from_pretrained(compose_config().model.name_or_path)
    config.architectures = ["LlamaForSequenceClassification"]
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args,message", [
    (["checkpoint=/no/such/run", "prompt=hi"],
     "checkpoint: no saved model (config.json) in /no/such/run"),
    (["checkpoint={run}", "prompt= "], "prompt is empty: give the text to answer"),
    (["checkpoint={run}", "generate.top_p=0.9"], "generate.top_p and generate.top_k shape"
                                                 " sampling: set generate.temperature > 0"),
    (["checkpoint={run}", "generate.top_p=1.5", "generate.temperature=1"],
     "generate.top_p must be in (0, 1] (got 1.5)"),
    (["recipe=tiny", "prompt=hi"], "the recipe's model is random-init"),
    (["checkpoint={classifier}", "prompt=hi"], "is a classifier (LlamaForSequenceClassification)"),
])
def test_bad_input_is_one_line(run, classifier, capsys, args, message):
    args = [a.format(run=run, classifier=classifier) for a in args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hift generate: error: ") and message in err, err
    assert err.count("\n") == 1
    assert not list(Path("outputs").glob("generate/*"))


def test_a_prompt_longer_than_the_context_is_the_last_line(run, capsys):
    assert main(["generate", f"checkpoint={run}", "prompt=" + "x" * 300]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("hift generate: error: prompt: 307 tokens fill the"
                                    " model's context (256 positions): shorten it")
    assert "Traceback" not in err
