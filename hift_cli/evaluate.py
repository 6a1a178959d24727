"""Evaluation: loss and perplexity (LM formats), accuracy and macro-F1 (classification),
exact match of the answer (math, by greedy generation), and a few shown samples."""

from __future__ import annotations

import contextlib

import dataclasses
import io
import json
import logging
import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

import torch
from datasets import Dataset
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hift_cli.config import Config, ConfigError, DataConfig, EvalConfig, checkpoint_dir
from hift_cli.data import (
    IGNORE_INDEX,
    Labels,
    PromptBuilder,
    eval_batches,
    label_map,
    load_splits,
    tokenize,
)
from hift_cli.models import autocast, load_model, load_tokenizer, pick_device, resolve
from hift_cli.progress import FILE_WIDTH, console

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\s*\$?\s*-?\d[\d,]*(?:\.\d+)?|-?\s*\$?\s*-?\.\d+")


def extract_answer(text: str) -> Decimal | None:
    """The final number of a GSM8K-style answer: the one after the last ``####``, else
    the last number in the text. ``"#### 1,234"`` -> 1234, ``"$5.00"`` -> 5."""
    marks = list(re.finditer(r"####(.*)", text))
    numbers = _NUMBER.findall(marks[-1].group(1) if marks else text)
    if not numbers:
        return None
    raw = numbers[0] if marks else numbers[-1]
    sign = -1 if raw.count("-") % 2 else 1
    digits = re.sub(r"[^\d.]", "", raw)
    try:
        return sign * Decimal(digits).normalize()
    except InvalidOperation:
        return None


# ------------------------------------------------------------------ exact match
# How a reference answer is scored (per reference; the run reports one, or "mixed"):
RULE_GSM = "gsm8k-####"        # a worked answer ending in "#### <n>": the final number
RULE_NUMBER = "plain-number"   # the answer is one number: the generation's first line, as one
RULE_STRING = "short-string"   # any other short answer: the first line(s), normalised
_PLAIN_NUMBER = re.compile(r"([-+]?)\$?([-+]?)(\d{1,3}(?:,\d{3})+|\d+)?(\.\d*)?")
RULES = {RULE_GSM: "the number after the generation's last ####",
         RULE_NUMBER: "the generation's first line, read as a number",
         RULE_STRING: "the generation's first line, normalised"}
_STOP = re.compile(r"\n\s*\n|###")  # a blank line, or the plain prompt template's next block


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace collapsed, surrounding quotes / ``*`` / a final period dropped."""
    text = " ".join(text.split()).lower().strip("\"'`* ")
    return text[:-1].rstrip() if text.endswith(".") else text


def plain_number(text: str) -> Decimal | None:
    """``text`` as a number when it is one number alone: ``"1,234"``, ``"1234.0"``, ``"$5"``,
    ``"-4."`` (not ``"5 - 1 = 4"`` nor ``"about 4"``)."""
    m = _PLAIN_NUMBER.fullmatch(normalize_answer(text))
    if m is None or not (m.group(3) or (m.group(4) or "").strip(".")):
        return None
    sign = -1 if (m.group(1) + m.group(2)).count("-") % 2 else 1
    try:
        return sign * Decimal((m.group(3) or "0").replace(",", "") + (m.group(4) or ""))
    except InvalidOperation:
        return None


def answer_rule(reference: str) -> str:
    """How a generation is scored against ``reference`` (one of the ``RULE_*``)."""
    if "####" in reference:
        return RULE_GSM
    return RULE_NUMBER if plain_number(reference) is not None else RULE_STRING


def short_answer(generation: str, lines: int = 1) -> str:
    """Where a short answer is read from: the generation up to its first blank line or
    ``###`` (a model that keeps going after its answer), its first ``lines`` lines."""
    head = _STOP.split(generation.strip(), maxsplit=1)[0]
    return "\n".join([line for line in head.splitlines() if line.strip()][:lines])


def score_answer(generation: str, reference: str) -> bool:
    """Exact match by ``answer_rule(reference)``. GSM8K: the number after the generation's
    last ``####`` (else its last number) equals the reference's. A plain number: the
    generation's first line is that number (``1,234`` == ``1234`` == ``1234.0``); a number
    somewhere in a longer text does not count. Otherwise: the first line(s) equal the
    reference after :func:`normalize_answer`."""
    rule = answer_rule(reference)
    if rule == RULE_GSM:
        predicted = extract_answer(generation)
        return predicted is not None and predicted == extract_answer(reference)
    if rule == RULE_NUMBER:
        predicted = plain_number(short_answer(generation))
        return predicted is not None and predicted == plain_number(reference)
    lines = len([line for line in reference.strip().splitlines() if line.strip()]) or 1
    return normalize_answer(short_answer(generation, lines)) == normalize_answer(reference)


def rule_of(references) -> str:
    """The rule a set of references is scored by: one of the ``RULE_*``, or ``mixed``."""
    rules = {answer_rule(r) for r in references}
    return rules.pop() if len(rules) == 1 else "mixed"


class Evaluator:
    """Scores a model on a tokenized eval split, as its data format asks."""

    def __init__(self, tokenizer, data_cfg: DataConfig, eval_cfg: EvalConfig, ds: Dataset,
                 records: Dataset, labels: Labels, device: torch.device, precision: str):
        self.tok = tokenizer
        self.data_cfg = data_cfg
        self.eval_cfg = eval_cfg
        self.ds = ds
        self.records = records  # raw eval records, for generation
        self.labels = labels
        self.device = device
        self.precision = precision
        # Where the causal-LM loss is computed (the trainer's chunked loss, if it has one).
        self.loss_context = contextlib.nullcontext
        # True once the run is asked to stop (Ctrl-C): shown samples end early.
        self.should_stop: Callable[[], bool] = lambda: False

    def _autocast(self):
        return autocast(self.precision, self.device)

    @torch.no_grad()
    def __call__(self, model, batch_size: int | None = None) -> dict[str, float]:
        if len(self.ds) == 0:
            return {}
        was_training = model.training
        model.eval()
        try:
            bs = batch_size or self.eval_cfg.batch_size
            if self.data_cfg.format == "classification":
                return self._classification(model, bs)
            metrics = self._loss(model, bs)
            if self.data_cfg.format == "math" and self.eval_cfg.exact_match:
                metrics.update(self._exact_match(model, bs))
            return metrics
        finally:
            model.train(was_training)

    def _loss(self, model, batch_size: int) -> dict[str, float]:
        """Mean loss over every label token (not a mean of batch means)."""
        total, tokens = torch.zeros((), device=self.device, dtype=torch.float64), 0
        for batch in eval_batches(self.ds, batch_size, self.tok.pad_token_id):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast(), self.loss_context():
                loss = model(**batch).loss
            # The model shifts labels by one for causal LMs: count the tokens it scored.
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += loss.double() * n
            tokens += n
        mean = (total / max(tokens, 1)).item()
        return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0)),
                "eval/tokens": tokens}

    def _classification(self, model, batch_size: int) -> dict[str, float]:
        preds, golds, total = [], [], 0.0
        for batch in eval_batches(self.ds, batch_size, self.tok.pad_token_id):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                out = model(**batch)
            total += out.loss.double().item() * len(batch["labels"])
            preds += out.logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        return {"eval/loss": total / len(golds), "eval/accuracy": _accuracy(preds, golds),
                "eval/macro_f1": macro_f1(preds, golds, len(self.labels.names)),
                "eval/samples": len(golds)}

    def _answer_records(self, n: int | None = None) -> Dataset:
        """The raw eval records behind the tokenized ones (the first ``n``)."""
        count = min(len(self.records), len(self.ds), n if n is not None else len(self.ds))
        return self.records.select(range(count))

    def _generate(self, model, prompts: list[list[int]], max_new_tokens: int,
                  batch_size: int, interruptible: bool = False) -> list[str]:
        """Greedy continuations of token-id prompts, decoded without special tokens;
        ``interruptible``: they end where they are once :attr:`should_stop` (samples to
        show, not scores)."""
        from transformers import StoppingCriteria

        class Stopped(StoppingCriteria):
            def __call__(criterion, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool,
                                  device=input_ids.device)

        stop = [Stopped()] if interruptible else None
        texts, pad = [], self.tok.pad_token_id
        # Models with learnt absolute positions (GPT-2, OPT) index past their table and
        # crash: fit prompt + generation into max_position_embeddings (prompts lose their
        # start first).
        positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        for start in range(0, len(prompts), batch_size):
            if interruptible and self.should_stop():
                texts += ["(stopped)"] * (len(prompts) - start)
                break
            chunk = prompts[start: start + batch_size]
            width = max(map(len, chunk))
            new_tokens = max_new_tokens
            if width + new_tokens > positions:
                new_tokens = max(positions - width, min(max_new_tokens, positions // 4))
                chunk = [p[-(positions - new_tokens):] for p in chunk]
                width = max(map(len, chunk))
            # Left padding: every prompt ends where generation starts.
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                                device=self.device)
            with self._autocast():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=new_tokens, pad_token_id=pad,
                                     eos_token_id=self.tok.eos_token_id, use_cache=True,
                                     stopping_criteria=stop)
            texts += self.tok.batch_decode(out[:, width:], skip_special_tokens=True)
        return texts

    @property
    def exact_match_rule(self) -> str | None:
        """How exact match scores this eval set (None: exact match is off or impossible)."""
        if self.data_cfg.format != "math" or not self.eval_cfg.exact_match or not len(self.ds):
            return None
        return rule_of(self._answer_records()["answer"])

    def info(self) -> dict[str, str]:
        """Facts about the scoring beside the (float) metrics, for eval.json / summary.json."""
        rule = self.exact_match_rule
        return {"eval/exact_match_rule": rule} if rule else {}

    def _exact_match(self, model, batch_size: int) -> dict[str, float]:
        builder = PromptBuilder(self.tok, self.data_cfg)
        records = self._answer_records()
        texts = self._generate(model, [builder.prompt_ids(q) for q in records["question"]],
                               self.eval_cfg.max_new_tokens, batch_size)
        golds = records["answer"]
        hits = sum(score_answer(text, gold) for text, gold in zip(texts, golds))
        n = max(len(records), 1)
        metrics = {"eval/exact_match": hits / n, "eval/exact_match_samples": len(records)}
        gsm = [text for text, gold in zip(texts, golds) if answer_rule(gold) == RULE_GSM]
        if gsm:  # how often the model ends with GSM8K's "#### <number>" line
            metrics["eval/answer_format"] = sum("####" in text for text in gsm) / len(gsm)
        return metrics

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def samples(self, model, n: int | None = None) -> list[dict]:
        """What the model says on the first ``n`` (default ``eval.show_samples``) eval
        records: prompt / reference / generation (LM formats, greedy), or text / label /
        prediction (classification). The same records every time, so before and after
        training can be compared."""
        n = self.eval_cfg.show_samples if n is None else n
        if n <= 0 or len(self.ds) == 0:
            return []
        was_training = model.training
        model.eval()
        try:
            if self.data_cfg.format == "classification":
                return self._classification_samples(model, n)
            return self._lm_samples(model, n)
        finally:
            model.train(was_training)

    def _classification_samples(self, model, n: int) -> list[dict]:
        rows = self.ds.select(range(min(n, len(self.ds))))
        records = self.records.select(range(len(rows)))
        preds = []
        for batch in eval_batches(rows, self.eval_cfg.batch_size, self.tok.pad_token_id):
            batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
            with self._autocast():
                preds += model(**batch).logits.argmax(-1).tolist()
        names = self.labels.names
        out = []
        for record, row, pred in zip(records, rows, preds):
            sample = {"text": record[self.data_cfg.text_field]}
            if self.data_cfg.text_pair_field:
                sample["text_pair"] = record[self.data_cfg.text_pair_field]
            out.append({**sample, "label": names[int(row["labels"])],
                        "prediction": names[pred]})
        return out

    def _lm_samples(self, model, n: int) -> list[dict]:
        builder, cfg = PromptBuilder(self.tok, self.data_cfg), self.data_cfg
        limit = min(self.eval_cfg.max_new_tokens, SAMPLE_MAX_NEW_TOKENS)
        prompts, shown, references = [], [], []
        for record in self._answer_records(n):
            if cfg.format == "text":
                # The text's first part is the prompt; its next tokens are the reference.
                ids = self.tok(record[cfg.text_field], add_special_tokens=False).input_ids
                if not ids:
                    continue
                cut = max(1, min(len(ids) // 2, SAMPLE_TEXT_PROMPT_TOKENS))
                prompts.append(builder.prefix + ids[:cut])
                shown.append(self.tok.decode(ids[:cut]))
                references.append(self.tok.decode(ids[cut: cut + limit]))
            elif cfg.format == "math":
                prompts.append(builder.prompt_ids(record["question"]))
                shown.append(record["question"])
                references.append(record["answer"])
            elif record.get("messages"):
                if not any(m.get("role") == "assistant" for m in record["messages"]):
                    continue
                # The conversation up to its last assistant turn is the prompt.
                ids, labels = builder.conversation(record["messages"])
                turn = next((i for i in range(len(labels), 0, -1)
                             if labels[i - 1] == IGNORE_INDEX), 0)
                prompts.append(ids[:turn])
                last = max(i for i, m in enumerate(record["messages"])
                           if m.get("role") == "assistant")
                before = record["messages"][:last]
                shown.append("\n".join(f"{m.get('role')}: {m.get('content')}" for m in before)
                             if len(before) > 1 else str(before[0].get("content")) if before
                             else "")
                references.append(str(record["messages"][last].get("content")))
            else:
                extra = (record.get("input") or "").strip()
                prompts.append(builder.prompt_ids(record["instruction"], extra))
                shown.append(record["instruction"] + (f"\n\n{extra}" if extra else ""))
                references.append(record["output"])
        texts = self._generate(model, prompts, limit, self.eval_cfg.batch_size,
                               interruptible=True)
        return [{"prompt": p, "reference": r, "generation": g}
                for p, r, g in zip(shown, references, texts)]

    def show_samples(self, model, when: str, note=None) -> dict[str, list]:
        """:meth:`samples`, shown as a table through ``note`` (a log line; default: print)
        and returned as ``{"samples_<when>": [...]}`` ({} when eval.show_samples=0)."""
        rows = self.samples(model)
        if rows:
            table = samples_table(rows, f"eval samples {when} training")
            if note is None:
                console().print(table)
            else:
                note(render(table))
        return {f"samples_{when}": rows} if rows else {}


SAMPLE_MAX_NEW_TOKENS = 128  # generation length of shown samples (at most eval.max_new_tokens)
SAMPLE_TEXT_PROMPT_TOKENS = 32  # text format: a sample's prompt is at most this much text
SAMPLE_CELL_CHARS = 240  # longer texts are shortened in the table (not in the json)


def _shorten(text: str, limit: int = SAMPLE_CELL_CHARS) -> str:
    """For a table cell: blank lines squeezed, control characters shown as ``?``, a long
    text cut in the middle (its end is often the answer); an empty text says so."""
    text = re.sub(r"\n\s*\n+", "\n", str(text).strip())
    text = "".join(c if c.isprintable() or c == "\n" else "?" for c in text) or "(empty)"
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 3]} … {text[-tail:]}"


def samples_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, show_lines=True)
    table.add_column("#", justify="right")
    for key in rows[0]:
        table.add_column(key, overflow="fold")
    for i, row in enumerate(rows):
        table.add_row(str(i), *[escape(_shorten(v)) for v in row.values()])
    return table


def render(table: Table) -> str:
    """A rich table as plain text (for log lines and the run's log file)."""
    terminal = Console()
    text = io.StringIO()
    Console(file=text, width=terminal.width if terminal.is_terminal else FILE_WIDTH
            ).print(table)
    return text.getvalue().rstrip()


def _accuracy(preds: list[int], golds: list[int]) -> float:
    return sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)


def macro_f1(preds: list[int], golds: list[int], num_labels: int) -> float:
    """Unweighted mean of per-label F1 over the labels present in gold or predictions."""
    scores = []
    for label in range(num_labels):
        tp = sum(p == label and g == label for p, g in zip(preds, golds))
        fp = sum(p == label and g != label for p, g in zip(preds, golds))
        fn = sum(p != label and g == label for p, g in zip(preds, golds))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def build_evaluator(cfg: Config, tokenizer, splits, labels: Labels,
                    device: torch.device) -> Evaluator:
    ds = tokenize(splits.eval, tokenizer, cfg.data, cfg.data.max_eval_samples, "eval", labels)
    evaluator = Evaluator(tokenizer, cfg.data, cfg.eval, ds, splits.eval, labels, device,
                          cfg.trainer.precision)
    rule = evaluator.exact_match_rule
    if rule:
        log.info(f"Exact match: {rule} ({RULES.get(rule, 'each reference by its own rule')})")
    return evaluator


def run_eval(cfg: Config, output_dir: str | Path) -> dict[str, float]:
    """The task behind ``hift eval``: score ``checkpoint`` (or ``model``) on the eval split."""
    checkpoint = checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else None
    path = str(checkpoint) if checkpoint else resolve(cfg.model.name_or_path)
    device = pick_device(cfg.trainer.device)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    splits = load_splits(cfg.data)
    labels = label_map(splits.train, cfg.data, splits.eval) if cfg.data.format == "classification" \
        else Labels()
    # A checkpoint always has weights, whatever the recipe says about random_init.
    model_cfg = dataclasses.replace(cfg.model, random_init=cfg.model.random_init and not checkpoint,
                                    num_labels=len(labels.names) or cfg.model.num_labels,
                                    name_or_path=path)
    if model_cfg.random_init:
        log.warning(f"hift eval: scoring {path} with random weights (model.random_init=true and"
                    " no checkpoint=): an untrained model")
    model = load_model(model_cfg, path, tokenizer.pad_token_id,
                       cfg.weights_dtype()).to(device)
    evaluator = build_evaluator(cfg, tokenizer, splits, labels, device)
    if len(evaluator.ds) == 0:
        raise ConfigError("data: the eval split is empty"
                          " (set data.eval_path, data.eval_split or data.eval_fraction)")
    metrics = evaluator(model)
    shown = evaluator.samples(model)
    result = {"model": path, "data": cfg.data.path, "format": cfg.data.format,
              "samples": len(evaluator.ds), **metrics, **evaluator.info(),
              **({"sample_outputs": shown} if shown else {})}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "eval.json", "w") as f:
        json.dump(result, f, indent=2)

    table = Table(title=f"hift eval: {path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples", str(len(evaluator.ds)))
    for key, value in metrics.items():
        name = key.removeprefix("eval/")
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    for key, value in evaluator.info().items():
        table.add_row(key.removeprefix("eval/"), value)
    console().print(table)
    if shown:
        console().print(samples_table(shown, f"eval samples (first {len(shown)} eval records)"))
    log.info(f"Wrote {output_dir / 'eval.json'}")
    return metrics
