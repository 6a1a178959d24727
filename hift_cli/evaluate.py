"""Evaluation: loss and perplexity (LM formats), accuracy and macro-F1 (classification),
exact match of the final number (math, by greedy generation)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
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
            with self._autocast():
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

    def _exact_match(self, model, batch_size: int) -> dict[str, float]:
        builder = PromptBuilder(self.tok, self.data_cfg)
        records = self.records.select(range(min(len(self.records), len(self.ds))))
        hits, formatted, pad = 0, 0, self.tok.pad_token_id
        for start in range(0, len(records), batch_size):
            rows = records[start: start + batch_size]
            prompts = [builder.prompt_ids(q) for q in rows["question"]]
            width = max(map(len, prompts))
            # Left padding: every prompt ends where generation starts.
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                device=self.device)
            with self._autocast():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=self.eval_cfg.max_new_tokens,
                                     pad_token_id=pad, eos_token_id=self.tok.eos_token_id,
                                     use_cache=True)
            texts = self.tok.batch_decode(out[:, width:], skip_special_tokens=True)
            for text, gold in zip(texts, rows["answer"]):
                predicted = extract_answer(text)
                hits += predicted is not None and predicted == extract_answer(gold)
                formatted += "####" in text
        n = max(len(records), 1)
        # answer_format: how often the model ends with GSM8K's "#### <number>" line.
        return {"eval/exact_match": hits / n, "eval/answer_format": formatted / n,
                "eval/exact_match_samples": len(records)}


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
    return Evaluator(tokenizer, cfg.data, cfg.eval, ds, splits.eval, labels, device,
                     cfg.trainer.precision)


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
                                    num_labels=len(labels.names) or cfg.model.num_labels)
    model = load_model(model_cfg, path, tokenizer.pad_token_id).to(device)
    evaluator = build_evaluator(cfg, tokenizer, splits, labels, device)
    if len(evaluator.ds) == 0:
        raise ConfigError("data: the eval split is empty"
                          " (set data.eval_path, data.eval_split or data.eval_fraction)")
    metrics = evaluator(model)
    result = {"model": path, "data": cfg.data.path, "format": cfg.data.format,
              "samples": len(evaluator.ds), **metrics}
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
    Console().print(table)
    log.info(f"Wrote {output_dir / 'eval.json'}")
    return metrics
