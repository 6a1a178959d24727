"""``hift export``: the folder a Hub repo would hold, its model card, and the upload
(recorded through a patched HfApi, and refused for real offline)."""

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard
from omegaconf import OmegaConf

from hift_cli import __version__
from hift_cli.cli import main
from hift_cli.export import model_card
from hift_cli.runs import trained_model
from test_generate import make_run

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors",
               "tokenizer_config.json", "added_tokens.json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export") / "run")


def export(run, *args) -> int:
    return main(["export", f"checkpoint={run}", "export.repo_id=someone/tiny-hift", *args])


def test_export_writes_the_model_and_a_card_from_the_run(run, tmp_path):
    out = tmp_path / "out"
    assert export(run, "export.push=false", f"export.dir={out}") == 0
    assert {p.name for p in out.iterdir()} == MODEL_FILES | {"README.md"}
    for name in MODEL_FILES:
        assert (out / name).read_bytes() == (run / "model" / name).read_bytes(), name
    card = ModelCard.load(out / "README.md")
    assert card.data.model_name == "tiny-hift" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a random init has no base model on the Hub
    assert "hift" in card.data.tags
    text = card.text
    for row in ["| base model | `tiny_llama` (random init) |",
                "| architecture | LlamaForCausalLM, 0.2M parameters |",
                "| data | `tiny_instructions.jsonl`; format instruction, max length 96 tokens,"
                " 243 training samples |",
                "| HiFT | strategy bottom2up, k=3: 3 groups of 6 units |",
                "| optimizer | `torch.optim.AdamW`, lr 0.003, weight decay 0 |",
                "| length | 60 steps |", "| precision | fp32 |",
                "| loss | 5.9579 | 5.4186 |", "| perplexity | 386.8200 | 225.5600 |",
                "Q: {instruction}\nA: ",  # the run's prompt template, for the model's users
                'AutoModelForCausalLM.from_pretrained("someone/tiny-hift")',
                f"(hift {__version__})"]:
        assert row in text, row


def test_a_checkpoint_exports_its_model_without_the_training_state(run, tmp_path):
    out = tmp_path / "out"
    assert export(run / "checkpoints" / "step-00000004", "export.push=false",
                  f"export.dir={out}") == 0
    assert {p.name for p in out.iterdir()} == MODEL_FILES | {"README.md"}
    text = (out / "README.md").read_text()
    assert "| length | 4 steps (a checkpoint of a run of 60 steps) |" in text
    assert "## Evaluation" not in text  # the run's final numbers are not this checkpoint's


def test_hub_ids_become_the_cards_metadata(run):
    trained = trained_model(str(run))
    trained.config = OmegaConf.merge(trained.config, {
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M", "random_init": False},
        "data": {"path": "openai/gsm8k"}})
    card = model_card(trained, "someone/smol-gsm")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.datasets == ["openai/gsm8k"]
    assert "fine-tuned from `HuggingFaceTB/SmolLM2-135M` by HiFT" in card.text


def test_push_creates_the_repo_and_uploads_the_folder(run, monkeypatch, capsys):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", kwargs["repo_id"], files))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert export(run, "export.private=true") == 0
    assert calls == [("create_repo", "someone/tiny-hift", {"private": True, "exist_ok": True}),
                     ("upload_folder", "someone/tiny-hift", sorted(MODEL_FILES | {"README.md"}))]
    assert "Pushed to https://huggingface.co/someone/tiny-hift" in capsys.readouterr().out


def test_offline_the_push_is_refused_and_the_folder_kept(run, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert export(run) == 2
    (folder,) = Path("outputs", "export").glob("*/model")
    assert capsys.readouterr().err == (
        "hift export: error: cannot push to the Hub: offline (HF_HUB_OFFLINE=1); the folder"
        f" is ready at {folder.resolve()}\n")
    assert {p.name for p in folder.iterdir()} == MODEL_FILES | {"README.md"}


@pytest.mark.parametrize("args,message", [
    (["export.repo_id=null"], "export.repo_id is required to push: add export.repo_id="),
    (["export.repo_id=some/one/else"], "export.repo_id: Repo id must be in the form"),
    (["export.push=false", "export.dir={run}"], "export.dir: {run} already exists and is not"
                                                " an empty folder"),
])
def test_bad_input_is_one_line(run, capsys, args, message):
    assert export(run, *[a.format(run=run) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hift export: error: " + message.format(run=run)), err
    assert err.count("\n") == 1
    assert not list(Path("outputs").glob("export/*"))  # nothing left behind


def test_export_needs_a_checkpoint(capsys):
    assert main(["export", "export.push=false"]) == 2
    assert capsys.readouterr().err == ("hift export: error: checkpoint is required: add"
                                       " checkpoint=<run dir or model folder> to the command"
                                       " line\n")
