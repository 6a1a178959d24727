"""Training data: load records with ``datasets``, tokenize with loss on responses only, batch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from datasets import Dataset, load_dataset

from hift_cli.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value torch's cross-entropy skips
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
            ".txt": "text", ".arrow": "arrow"}


@dataclass
class Splits:
    train: Dataset
    eval: Dataset


def load_splits(cfg: DataConfig) -> Splits:
    """Raw train / eval records (before tokenization)."""
    if cfg.path.startswith("reasoning_gym:"):
        name = cfg.path.split(":", 1)[1]
        return Splits(_generate(name, cfg.num_train, cfg.train_seed),
                      _generate(name, cfg.num_eval, cfg.eval_seed))
    train = _load(cfg.path, cfg.split)
    if cfg.eval_path or cfg.eval_split:
        evaluation = _load(cfg.eval_path or cfg.path, cfg.eval_split or cfg.split)
    elif cfg.eval_fraction > 0 and len(train) > 1:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=0)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = train.select([])
    return Splits(train, evaluation)


def _load(path: str, split: str) -> Dataset:
    expanded = os.path.expanduser(path)
    try:
        if os.path.isfile(expanded):
            builder = BUILDERS.get(os.path.splitext(expanded)[1].lower())
            if builder is None:
                raise ConfigError(f"data.path: unsupported file type {path}"
                                  f" (use one of {', '.join(BUILDERS)})")
            ds = load_dataset(builder, data_files=expanded, split="train")
        else:
            ds = load_dataset(expanded, split=split)
    except ConfigError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.path: cannot load {path!r} ({first})") from None
    if len(ds) == 0:
        raise ConfigError(f"data.path: {path!r} has no records")
    return ds


def _generate(name: str, size: int, seed: int) -> Dataset:
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("data.path=reasoning_gym:*: pip install reasoning-gym") from None
    items = reasoning_gym.create_dataset(name, size=size, seed=seed)
    # The worked solution ends in "#### <number>", GSM8K's own answer format.
    return Dataset.from_list([
        {"instruction": it["question"], "input": "", "output": it["metadata"]["answer_cot"]}
        for it in items
    ])


def tokenize(ds: Dataset, tokenizer, cfg: DataConfig, max_samples: int | None,
             what: str) -> Dataset:
    """Instruction records -> ``input_ids`` and ``labels`` with the prompt masked out."""
    missing = {"instruction", "output"} - set(ds.column_names)
    if missing:
        raise ConfigError(
            f"data: {what} records need fields {sorted(missing)} for data.format=instruction"
            f" (found: {', '.join(ds.column_names)})"
        )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    use_chat = cfg.use_chat_template and getattr(tokenizer, "chat_template", None)
    # Does the tokenizer add a BOS by itself? Then keep it in front of plain prompts.
    bos = tokenizer.bos_token_id
    plain_prefix = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []

    def encode(row):
        instruction, extra = row["instruction"], (row.get("input") or "").strip()
        if use_chat:
            content = f"{instruction}\n\n{extra}" if extra else instruction
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False,
                add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            template = cfg.prompt_template
            if not extra:  # drop the empty Input block
                template = template.replace("### Input:\n{input}\n\n", "")
            prompt = template.format(instruction=instruction, input=extra)
            prompt_ids = plain_prefix + tokenizer(prompt, add_special_tokens=False).input_ids
        response_ids = tokenizer(row["output"], add_special_tokens=False).input_ids
        response_ids = response_ids + [tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[: cfg.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: cfg.max_length]
        return {"input_ids": ids, "labels": labels,
                "truncated": len(prompt_ids) + len(response_ids) > cfg.max_length}

    out = ds.map(encode, remove_columns=ds.column_names, desc=f"Tokenizing {what}")
    truncated = sum(out["truncated"])
    kept = out.filter(lambda r: any(x != IGNORE_INDEX for x in r["labels"]))
    dropped = len(out) - len(kept)
    if truncated:
        log.warning(f"{what}: {truncated} of {len(out)} samples truncated to"
                    f" data.max_length={cfg.max_length}; {dropped} lost their whole response"
                    " and were dropped")
    if len(kept) == 0 and len(out) > 0:
        raise ConfigError(f"data: every {what} sample was dropped: data.max_length="
                          f"{cfg.max_length} leaves no room for the response")
    return kept.remove_columns("truncated")


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch (dynamic padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_batches(ds: Dataset, batch_size: int, pad_id: int, seed: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches; epoch e uses permutation seed ``(seed, e)``."""
    if len(ds) == 0:
        raise ConfigError("data: the training split is empty")
    rows = ds.with_format(None)
    n = len(rows)
    size = min(batch_size, n)  # the last incomplete batch of an epoch is dropped
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        for start in range(0, n - size + 1, size):
            yield collate([rows[i] for i in perm[start : start + size]], pad_id)
        epoch += 1


def eval_batches(ds: Dataset, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    rows = ds.with_format(None)
    for start in range(0, len(rows), batch_size):
        yield collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))],
                      pad_id)
