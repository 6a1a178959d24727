"""``hift export``: a trained model as the folder a Hub model repo holds, with a model card,
and its upload.

The folder holds the model's files as they were saved (weights, config, generation config,
tokenizer; copied, so editing it leaves the run alone) and a README.md written with
huggingface_hub's ``ModelCard`` from the run's records: base model, data, HiFT settings,
optimizer, length, precision, and eval before / after from ``summary.json``.
``export.push`` uploads it with ``HfApi.create_repo`` and ``upload_folder``; offline, or on
any Hub error, it stops with one line and the folder stays, ready for a later upload.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from hift_cli import __version__
from hift_cli.checkpoint import MARKER, SHARDS, STATE_FILE
from hift_cli.config import DATA_GENERATOR_PREFIX, Config, ConfigError
from hift_cli.models import PYPI_PREFIX, load_tokenizer
from hift_cli.runs import TrainedModel, trained_model

log = logging.getLogger(__name__)

# A checkpoint's training state is hift's, not the model's; the card is written anew.
NOT_EXPORTED = {MARKER, STATE_FILE, SHARDS, "README.md"}
EVAL_METRICS = {"eval/loss": "loss", "eval/perplexity": "perplexity",
                "eval/accuracy": "accuracy", "eval/macro_f1": "macro-F1",
                "eval/exact_match": "exact match"}
HIFT_PAPER = "https://arxiv.org/abs/2401.15207"

CARD = """\
---
{{ card_data }}
---

# {{ name }}

{{ intro }}

## Training

| setting | value |
|---|---|
{% for key, value in training %}| {{ key }} | {{ value }} |
{% endfor %}
{%- if evaluation %}
## Evaluation

On the run's held-out eval split, before and after fine-tuning:

| metric | before | after |
|---|---|---|
{% for metric, before, after in evaluation %}| {{ metric }} | {{ before }} | {{ after }} |
{% endfor %}
{%- endif %}
## Use

Prompts: {{ prompt_format }}

```python
from transformers import AutoTokenizer, {{ auto_class }}

model = {{ auto_class }}.from_pretrained("{{ repo }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo }}")
```

Card written by `hift export` (hift {{ version }}).
"""


def run_export(cfg: Config, output_dir: str | Path) -> Path:
    """The task behind ``hift export``: write the folder of ``checkpoint`` with its model
    card to ``export.dir`` (default ``<output_dir>/model``) and, with ``export.push``,
    upload it to ``export.repo_id``. Returns the folder."""
    ecfg = cfg.export
    if not cfg.checkpoint:
        raise ConfigError("checkpoint is required: add checkpoint=<run dir or model folder>"
                          " to the command line")
    if ecfg.push and not ecfg.repo_id:
        raise ConfigError("export.repo_id is required to push: add export.repo_id=<user or"
                          " org>/<name>, or export.push=false to only write the folder")
    if ecfg.repo_id:
        try:
            validate_repo_id(ecfg.repo_id)
        except ValueError as e:
            raise ConfigError(f"export.repo_id: {str(e).splitlines()[0]}") from None
    target = Path(ecfg.dir).expanduser() if ecfg.dir else Path(output_dir) / "model"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"export.dir: {target} already exists and is not an empty folder:"
                          " give a new one")
    trained = trained_model(cfg.checkpoint)
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in trained.path.iterdir()
                   if p.is_file() and p.name not in NOT_EXPORTED)
    for f in files:
        shutil.copy2(f, target / f.name)
    model_card(trained, ecfg.repo_id).save(target / "README.md")
    log.info(f"Wrote {target}: {', '.join(f.name for f in files)} and README.md (model card)")
    if ecfg.push:
        url = push(target, ecfg.repo_id, ecfg.private)
        log.info(f"Pushed to {url}")
    return target


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if needed); its URL.

    Raises:
        ConfigError: offline, not logged in, or any other Hub error, in one line.
    """
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private or None, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder,
                          commit_message="Upload a model fine-tuned with hift")
    except OfflineModeIsEnabled:
        why = "offline (HF_HUB_OFFLINE=1)"
    except Exception as e:  # not logged in, no rights, network: the Hub's own words
        text = str(e).strip()
        why = text.splitlines()[0] if text else type(e).__name__
    else:
        return str(url)
    raise ConfigError(f"cannot push to the Hub: {why}; the folder is ready at {folder}")


def model_card(trained: TrainedModel, repo_id: str | None = None) -> ModelCard:
    """The model card of ``trained``, from its run's config, summary and memory report."""
    s = trained.setting
    name = repo_id.split("/")[-1] if repo_id else (trained.run or trained.path).name
    architecture = _architecture(trained.path)
    classifier = s("model.task") == "sequence_classification" or \
        architecture.endswith("ForSequenceClassification")
    base = s("model.name_or_path")
    data = s("data.path")
    card_data = ModelCardData(
        model_name=name, library_name="transformers",
        base_model=base if _hub_id(base) and not s("model.random_init") else None,
        datasets=[data] if _hub_id(data) else None,
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=["hift", "full-parameter-fine-tuning"])
    if trained.config is None:
        intro = (f"A {architecture} exported with hift. The records of the run that trained"
                 f" it (config.yaml beside `{trained.path.name}/`) were not found, so this card"
                 " has no training details.")
        training = [("architecture", architecture)]
    else:
        method = "full fine-tuning (hift.strategy=fpft)" if s("hift.strategy") == "fpft" else \
            (f"HiFT, hierarchical full-parameter fine-tuning ([Liu et al.]({HIFT_PAPER})):"
             " every parameter is trained, one group of layers per step, the rest frozen")
        start = f"from a random init of the `{_shown(base)}` config" if s("model.random_init") \
            else f"from `{_shown(base)}`"
        intro = f"A {architecture} fine-tuned {start} by {method}."
        training = _training(trained, architecture)
    return ModelCard.from_template(
        card_data, template_str=CARD, name=name, intro=intro, training=training,
        evaluation=_evaluation(trained.summary), prompt_format=_prompt_format(trained),
        auto_class="AutoModelForSequenceClassification" if classifier
        else "AutoModelForCausalLM",
        repo=repo_id or "<this folder>", version=__version__)


def _training(trained: TrainedModel, architecture: str) -> list[tuple[str, str]]:
    """(setting, value) rows of the card's training table."""
    s, mem, summary = trained.setting, trained.memory, trained.summary
    rows = [("base model", f"`{_shown(s('model.name_or_path'))}`"
             + (" (random init)" if s("model.random_init") else "")),
            ("architecture", architecture + (f", {mem['params'] / 1e6:.1f}M parameters"
                                              if mem.get("params") else ""))]
    data = s("data.path")
    if str(data).startswith(DATA_GENERATOR_PREFIX):
        task = data[len(DATA_GENERATOR_PREFIX):]
        data_text = (f"reasoning-gym `{task}`: {s('data.num_train')} training problems"
                     f" (seed {s('data.train_seed')}), {s('data.num_eval')} eval problems"
                     f" (seed {s('data.eval_seed')})"
                     + (f", options {dict(s('data.task_options'))}" if s("data.task_options")
                        else ""))
    else:
        data_text = f"`{_shown(data)}`"
    samples = summary.get("data/train_samples")
    rows.append(("data", f"{data_text}; format {s('data.format')}, max length"
                         f" {s('data.max_length')} tokens"
                 + (f", {samples} training samples" if samples else "")))
    strategy = s("hift.strategy")
    if strategy == "fpft":
        rows.append(("method", "fpft: every parameter at every step"))
    else:
        groups = summary.get("groups") or mem.get("groups")
        size = f"k={s('hift.k')}" if s("hift.k") is not None else f"m={s('hift.m')} units a group"
        units = f" of {mem['units']} units" if mem.get("units") else ""
        always = s("hift.always_active") or []
        per = s("hift.steps_per_group") or 1
        rows.append(("HiFT", f"strategy {strategy}, {size}"
                             + (f": {groups} groups{units}" if groups else "")
                             + (f", {per} steps per group" if per > 1 else "")
                             + (f"; always active: {', '.join(always)}" if always else "")))
    rows.append(("optimizer", f"`{s('optimizer._target_')}`, lr {s('optimizer.lr'):g},"
                              f" weight decay {s('optimizer.weight_decay', 0):g}"))
    rows.append(("LR schedule", f"{s('trainer.lr_scheduler')}, stepped once per cycle,"
                                + (f" warmup {s('trainer.warmup_ratio'):g} of the cycles"
                                   if s("trainer.warmup_ratio") is not None else
                                   f" warmup {s('trainer.warmup_cycles')} cycles")))
    step = trained.path.name.removeprefix("step-")
    length = f"{s('trainer.epochs')} epochs" if s("trainer.epochs") else \
        f"{s('trainer.max_steps')} steps"
    rows.append(("length", f"{int(step)} steps (a checkpoint of a run of {length})"
                 if step.isdigit() else length))
    world = summary.get("dist/world_size", 1)
    rows.append(("batch", f"{s('trainer.batch_size')} x {s('trainer.grad_accum')}"
                          " (batch size x gradient accumulation)"
                 + (f" x {world} processes" if world > 1 else "")))
    rows.append(("precision", str(s("trainer.precision"))))
    rows.append(("seed", str(s("trainer.seed"))))
    return rows


def _evaluation(summary: dict) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows: the run's eval metrics before and after training."""
    rows = []
    for key, metric in EVAL_METRICS.items():
        before, after = summary.get(f"{key}_before"), summary.get(key)
        if isinstance(after, (int, float)):
            rows.append((metric, f"{before:.4f}" if isinstance(before, (int, float)) else "",
                         f"{after:.4f}"))
    return rows


def _prompt_format(trained: TrainedModel) -> str:
    """How the run formatted prompts: a user of the model should do the same."""
    fmt = trained.setting("data.format")
    if fmt == "text":
        return "plain text (trained as language modelling, data.format=text)."
    if fmt == "classification":
        return "the text (and text pair) as is; the label is the class with the highest logit."
    chat = trained.setting("data.use_chat_template", True) and \
        load_tokenizer(str(trained.path)).chat_template
    if chat:
        return ("the tokenizer's chat template, the instruction (question) as the user's"
                " message (`tokenizer.apply_chat_template(..., add_generation_prompt=True)`).")
    template = trained.setting("data.prompt_template")
    if template is None:
        return "unknown (no run config)."
    return f"this template, the `### Input` block left out when empty:\n\n```\n{template}```"


def _architecture(path: Path) -> str:
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError):
        architectures = None
    return architectures[0] if architectures else "model"


def _hub_id(name) -> bool:
    """A Hub repo id (``owner/name``), not a local path or a ``pypi:`` package."""
    if not isinstance(name, str) or name.startswith((PYPI_PREFIX, DATA_GENERATOR_PREFIX)) \
            or "/" not in name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def _shown(name) -> str:
    """A name for a public card: a local path by its last part only."""
    name = str(name)
    return Path(name).name if Path(name).expanduser().exists() else name
