"""Evaluation: token-weighted loss and perplexity on a tokenized split."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from rich.table import Table

from hift_cli.config import Config, ConfigError, checkpoint_dir
from hift_cli.data import IGNORE_INDEX, eval_batches, load_splits, tokenize
from hift_cli.models import load_model, load_tokenizer, pick_device, resolve

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_loss(model, ds: Dataset, batch_size: int, pad_id: int, device: torch.device,
                  autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Mean loss over every label token of ``ds`` (not a mean of batch means).

    Returns:
        ``{"eval/loss", "eval/perplexity", "eval/tokens"}``; empty if ``ds`` is empty.
    """
    if len(ds) == 0:
        return {}
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), device=device, dtype=torch.float64), 0
    for batch in eval_batches(ds, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            loss = model(**batch).loss
        # The model shifts labels by one for causal LMs: count the tokens it scored.
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += loss.double() * n
        tokens += n
    model.train(was_training)
    mean = (total / max(tokens, 1)).item()
    return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0)), "eval/tokens": tokens}


def run_eval(cfg: Config, output_dir: str | Path) -> dict[str, float]:
    """The task behind ``hift eval``: score ``checkpoint`` (or ``model``) on the eval split."""
    checkpoint = checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else None
    path = str(checkpoint) if checkpoint else resolve(cfg.model.name_or_path)
    device = pick_device(cfg.trainer.device)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    # A checkpoint always has weights, whatever the recipe says about random_init.
    model_cfg = dataclasses.replace(cfg.model, random_init=cfg.model.random_init and not checkpoint)
    model = load_model(model_cfg, path, tokenizer.pad_token_id).to(device)
    splits = load_splits(cfg.data)
    ds = tokenize(splits.eval, tokenizer, cfg.data, cfg.data.max_eval_samples, "eval")
    if len(ds) == 0:
        raise ConfigError("data: the eval split is empty (set data.eval_path or data.eval_fraction)")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if cfg.trainer.precision == "bf16-autocast" else None)
    metrics = evaluate_loss(model, ds, cfg.eval.batch_size, tokenizer.pad_token_id, device,
                            autocast)
    result = {"model": path, "data": cfg.data.path, "samples": len(ds), **metrics}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "eval.json", "w") as f:
        json.dump(result, f, indent=2)

    table = Table(title=f"hift eval: {path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples", str(len(ds)))
    table.add_row("tokens", str(metrics["eval/tokens"]))
    table.add_row("loss", f"{metrics['eval/loss']:.4f}")
    table.add_row("perplexity", f"{metrics['eval/perplexity']:.3f}")
    Console().print(table)
    log.info(f"Wrote {output_dir / 'eval.json'}")
    return metrics
