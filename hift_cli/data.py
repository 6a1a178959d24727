"""Training data: load records with ``datasets``, tokenize per format, batch.

Formats (``data.format``):
  instruction     Alpaca records (instruction, input, output) or chat ``messages`` lists;
                  loss on the response (assistant) tokens only.
  math            GSM8K records (question, answer ending in ``#### <number>``); trains on
                  the worked answer, scored by exact match of the final number.
  text            plain language modelling on ``data.text_field``; optionally packed into
                  blocks of ``data.max_length`` tokens.
  classification  a text (and optional text pair) with a label, for
                  ``model.task=sequence_classification``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
from datasets import Dataset, load_dataset

from hift_cli.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value torch's cross-entropy skips
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
            ".txt": "text", ".arrow": "arrow"}
PLAIN_CHAT = "### {role}:\n{content}\n\n"  # for messages when the tokenizer has no template


@dataclass
class Splits:
    train: Dataset
    eval: Dataset


@dataclass
class Labels:
    """Classification label names and their ids (empty for the LM formats)."""

    names: list[str] = field(default_factory=list)
    to_id: dict = field(default_factory=dict)


def load_splits(cfg: DataConfig) -> Splits:
    """Raw train / eval records (before tokenization)."""
    if cfg.path.startswith("reasoning_gym:"):
        name = cfg.path.split(":", 1)[1]
        options = dict(cfg.task_options)
        train = _generate(name, cfg.num_train, cfg.train_seed, options)
        evaluation = _generate(name, cfg.num_eval, cfg.eval_seed, options)
        # Different seeds can still draw the same problem: keep eval truly held out.
        held_out = set(evaluation["question"])
        kept = train.filter(lambda r: r["question"] not in held_out)
        if len(kept) < len(train):
            log.info(f"data: dropped {len(train) - len(kept)} training problems that are also"
                     " in the eval set")
        return Splits(kept, evaluation)
    train = _load(cfg.path, cfg.split, cfg.config, "data.path")
    if cfg.eval_path or cfg.eval_split:
        key = "data.eval_path" if cfg.eval_path else "data.eval_split"
        evaluation = _load(cfg.eval_path or cfg.path, cfg.eval_split or cfg.split,
                           cfg.config, key)
    elif cfg.eval_fraction > 0 and len(train) > 1:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=0)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = train.select([])
    return Splits(train, evaluation)


def _load(path: str, split: str, config: str | None, key: str) -> Dataset:
    expanded = os.path.expanduser(path)
    try:
        if os.path.isfile(expanded):
            if os.path.getsize(expanded) == 0:
                raise ConfigError(f"{key}: {path!r} has no records (empty file)")
            builder = BUILDERS.get(os.path.splitext(expanded)[1].lower())
            if builder is None:
                raise ConfigError(f"{key}: unsupported file type {path}"
                                  f" (use one of {', '.join(BUILDERS)})")
            ds = load_dataset(builder, data_files=expanded, split="train")
        else:
            ds = load_dataset(expanded, config, split=split)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{key}: cannot load {path!r} ({_reason(e)})") from None
    if len(ds) == 0:
        raise ConfigError(f"{key}: {path!r} (split {split!r}) has no records")
    return ds


def _generate(name: str, size: int, seed: int, options: dict | None = None) -> Dataset:
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("data.path=reasoning_gym:*: pip install reasoning-gym") from None
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ConfigError(f"data.path=reasoning_gym:{name}: reasoning-gym has no task {name!r}"
                          " (e.g. gsm_symbolic, family_relationships)")
    try:
        items = reasoning_gym.create_dataset(name, size=size, seed=seed, **(options or {}))
    except (TypeError, ValueError, AssertionError) as e:  # its config's own checks
        raise ConfigError(f"data.task_options={options}: reasoning-gym's {name} refuses them"
                          f" ({_reason(e)})") from None
    # gsm_symbolic carries GSM8K's own shape, a worked solution ending in "#### <number>";
    # other tasks have only the short answer (a label, for the classification format).
    return Dataset.from_list([{"question": it["question"],
                               "answer": it["metadata"].get("answer_cot", it["answer"])}
                              for it in items])


def _require(ds: Dataset, fields: set[str], cfg: DataConfig, what: str) -> None:
    missing = fields - set(ds.column_names)
    if missing:
        raise ConfigError(
            f"data: {what} records need fields {sorted(missing)} for data.format={cfg.format}"
            f" (found: {', '.join(ds.column_names)})")
    # A field some records lack is a column of nulls there (files are read as one table).
    for name in sorted(fields):
        empty = [i for i, v in enumerate(ds[name]) if v is None]
        if empty:
            example = json.dumps(ds[empty[0]], default=str)
            raise ConfigError(
                f"data: {len(empty)} {what} records have no {name!r} (missing or null),"
                f" e.g. {example if len(example) <= 80 else example[:77] + '...'}")


def _as_text(ds: Dataset, fields: set[str], cfg: DataConfig, what: str) -> Dataset:
    """The text ``fields`` as strings: numbers and booleans (``"output": 42``, common in
    math data) are read as their text, saying so; lists and objects are refused."""
    from datasets import Value

    source = cfg.eval_path if what == "eval" and cfg.eval_path else cfg.path
    for name in sorted(fields):
        feature = ds.features[name]
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null"):
            continue  # null: an optional field no record has (required ones were checked)
        if isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint", "float"))
                                           or feature.dtype == "bool"):
            log.warning(f"data: {source}: {what} field {name!r} holds {feature.dtype} values;"
                        " read as text")
            ds = ds.cast_column(name, Value("string"))
            continue
        kind = type(ds[0][name]).__name__
        raise ConfigError(f"data: {source}: {what} record 0 field {name!r} is a {kind}"
                          f" ({feature.dtype if isinstance(feature, Value) else 'nested'}),"
                          " not text")
    return ds


# ------------------------------------------------------------------ prompts
class PromptBuilder:
    """Turns one record into (prompt token ids, response token ids) for the LM formats."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tok = tokenizer
        self.cfg = cfg
        self.chat = bool(cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
        bos = tokenizer.bos_token_id
        # Does the tokenizer add a BOS by itself? Then keep it in front of plain prompts.
        self.prefix = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def prompt_text(self, instruction: str, extra: str = "") -> str:
        """The text a model is given before its answer (also used for generation)."""
        if self.chat:
            content = f"{instruction}\n\n{extra}" if extra else instruction
            return self.tok.apply_chat_template([{"role": "user", "content": content}],
                                                tokenize=False, add_generation_prompt=True)
        template = self.cfg.prompt_template
        if not extra:  # drop the empty Input block
            template = template.replace("### Input:\n{input}\n\n", "")
        return template.format(instruction=instruction, input=extra)

    def prompt_ids(self, instruction: str, extra: str = "") -> list[int]:
        return ([] if self.chat else self.prefix) + self._ids(self.prompt_text(instruction, extra))

    def single_turn(self, instruction: str, extra: str, response: str) -> tuple[list, list]:
        """Token ids and labels of one prompt + response, the prompt masked out."""
        prompt = self.prompt_ids(instruction, extra)
        answer = self._ids(response) + [self.tok.eos_token_id]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def conversation(self, messages: list[dict]) -> tuple[list, list]:
        """A chat; loss on the assistant turns only.

        With a chat template, an assistant turn's tokens are what rendering the chat
        through that turn adds beyond rendering it up to the turn's generation prompt.
        """
        ids, labels, pending = [], [], ""
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                pending += PLAIN_CHAT.format(role=str(message.get("role")).capitalize(),
                                             content=message.get("content"))
                continue
            if self.chat:
                before = self.tok.apply_chat_template(messages[:i], tokenize=False,
                                                      add_generation_prompt=True)
                through = self.tok.apply_chat_template(messages[: i + 1], tokenize=False)
                context = self._ids(before)[len(ids):]
                turn = self._ids(through)[len(ids) + len(context):]
            else:
                context = ([] if ids else self.prefix) + self._ids(pending + "### Assistant:\n")
                turn = self._ids(message["content"]) + [self.tok.eos_token_id]
            ids += context + turn
            labels += [IGNORE_INDEX] * len(context) + turn
            pending = ""
        return ids, labels


# ------------------------------------------------------------------ tokenize
def tokenize(ds: Dataset, tokenizer, cfg: DataConfig, max_samples: int | None, what: str,
             labels: Labels | None = None) -> Dataset:
    """Records -> ``input_ids`` (+ ``labels``) for ``cfg.format``; cached by ``datasets``."""
    if len(ds) == 0:
        return ds
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if cfg.format == "text":
        return _tokenize_text(ds, tokenizer, cfg, what)
    if cfg.format == "classification":
        return _tokenize_classification(ds, tokenizer, cfg, what, labels or Labels())
    builder = PromptBuilder(tokenizer, cfg)
    template = len(builder.prompt_ids(""))
    if template >= cfg.max_length:
        raise ConfigError(f"data.max_length={cfg.max_length} is smaller than the prompt template"
                          f" alone ({template} tokens): raise data.max_length")
    if cfg.format == "math":
        _require(ds, {"question", "answer"}, cfg, what)
        ds = _as_text(ds, {"question", "answer"}, cfg, what)

        def encode(row):
            return builder.single_turn(row["question"], "", row["answer"])
    elif "messages" in ds.column_names:
        def encode(row):
            return builder.conversation(row["messages"])
    else:
        _require(ds, {"instruction", "output"}, cfg, what)
        ds = _as_text(ds, {"instruction", "output"} | ({"input"} & set(ds.column_names)),
                      cfg, what)

        def encode(row):
            return builder.single_turn(row["instruction"], (row.get("input") or "").strip(),
                                       row["output"])

    def truncate(row):
        ids, lab = encode(row)
        return {"input_ids": ids[: cfg.max_length], "labels": lab[: cfg.max_length],
                "truncated": len(ids) > cfg.max_length}

    out = ds.map(truncate, remove_columns=ds.column_names, desc=f"Tokenizing {what}")
    truncated = sum(out["truncated"])
    kept = out.filter(lambda r: any(x != IGNORE_INDEX for x in r["labels"]))
    dropped = len(out) - len(kept)
    if truncated:
        log.warning(f"{what}: {truncated} of {len(out)} samples truncated to"
                    f" data.max_length={cfg.max_length}; {dropped} lost their whole response"
                    " and were dropped")
    if len(kept) == 0:
        raise ConfigError(f"data: every {what} sample was dropped: data.max_length="
                          f"{cfg.max_length} leaves no room for the response after the prompt")
    return kept.remove_columns("truncated")


def _tokenize_text(ds: Dataset, tokenizer, cfg: DataConfig, what: str) -> Dataset:
    _require(ds, {cfg.text_field}, cfg, what)
    ds = _as_text(ds, {cfg.text_field}, cfg, what)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prefix = PromptBuilder(tokenizer, cfg).prefix  # BOS, if the tokenizer adds one itself

    def encode(batch):
        texts = tokenizer(batch[cfg.text_field], add_special_tokens=False).input_ids
        return {"input_ids": [prefix + ids + eos for ids in texts]}

    out = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {what}")
    if cfg.packing:
        block = cfg.max_length

        def pack(batch):  # concatenate, then cut into full blocks (the tail is dropped)
            flat = [t for ids in batch["input_ids"] for t in ids]
            n = len(flat) // block * block
            return {"input_ids": [flat[i: i + block] for i in range(0, n, block)]}

        out = out.map(pack, batched=True, batch_size=1000, desc=f"Packing {what}")
        if len(out) == 0:
            raise ConfigError(f"data: {what} has fewer tokens than one block of"
                              f" data.max_length={block}")
    else:
        out = out.map(lambda r: {"input_ids": r["input_ids"][: cfg.max_length]})
    return out.map(lambda r: {"labels": r["input_ids"]})


def _reason(e: BaseException) -> str:
    """First line of the error and of the error it wraps: datasets reports a malformed
    file as "An error occurred while generating the dataset", the parse error and its row
    being the cause."""
    parts = []
    while e is not None and len(parts) < 2:
        text = str(e).strip()
        line = text.splitlines()[0] if text else type(e).__name__
        if line not in parts:
            parts.append(line)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def label_map(ds: Dataset, cfg: DataConfig, eval_ds: Dataset | None = None) -> Labels:
    """Label names and ids from the training split: integer labels are their own ids,
    string names are numbered in sorted order. Types are checked over both splits."""
    _require(ds, {cfg.text_field, cfg.label_field}, cfg, "train")
    values = list(ds[cfg.label_field])
    seen = values + (list(eval_ds[cfg.label_field]) if eval_ds is not None and len(eval_ds)
                     and cfg.label_field in eval_ds.column_names else [])
    kinds = {type(v).__name__ for v in seen}
    if kinds == {"str"}:
        # Files mixing numbers and names arrive as strings (Arrow unifies the column).
        numeric = {v.strip().lstrip("-").isdigit() for v in seen}
        if numeric == {True}:
            kinds = {"int"}
        elif numeric == {True, False}:
            kinds = {"int", "str"}
    if kinds <= {"int", "bool"} or kinds == {"str"}:
        distinct = set(values)
        if len(distinct) < 2:  # one class would train as regression (num_labels=1)
            raise ConfigError(
                f"data: classification needs at least 2 labels; {cfg.label_field!r} in the"
                f" training split has only {', '.join(map(repr, distinct))}")
    if kinds <= {"int", "bool"}:
        ids = {v: int(v) for v in set(values)}
        if min(ids.values()) < 0:
            raise ConfigError(f"data: integer labels in {cfg.label_field!r} must be >= 0")
        return Labels([str(i) for i in range(max(ids.values()) + 1)], ids)
    if kinds == {"str"}:
        names = sorted(set(values))
        return Labels(names, {n: i for i, n in enumerate(names)})
    raise ConfigError(f"data: labels in {cfg.label_field!r} mix types ({', '.join(sorted(kinds))});"
                      " use all integers or all strings")


def _tokenize_classification(ds: Dataset, tokenizer, cfg: DataConfig, what: str,
                             labels: Labels) -> Dataset:
    fields = {cfg.text_field, cfg.label_field} | ({cfg.text_pair_field} if cfg.text_pair_field
                                                  else set())
    _require(ds, fields, cfg, what)
    unknown = {v for v in ds[cfg.label_field] if v not in labels.to_id}
    if unknown:
        raise ConfigError(f"data: {what} labels {sorted(map(str, unknown))[:5]} do not occur in"
                          f" the training split (labels: {', '.join(labels.names)})")

    def encode(batch):
        pair = batch[cfg.text_pair_field] if cfg.text_pair_field else None
        enc = tokenizer(batch[cfg.text_field], pair, truncation=True, max_length=cfg.max_length)
        return {"input_ids": enc["input_ids"],
                **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}),
                "labels": [labels.to_id[v] for v in batch[cfg.label_field]]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names,
                  desc=f"Tokenizing {what}")


# ------------------------------------------------------------------ batches
def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch (dynamic padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    sequence_labels = isinstance(rows[0]["labels"], list)
    if sequence_labels:
        out["labels"] = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    else:
        out["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    if "token_type_ids" in rows[0]:
        out["token_type_ids"] = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        mask[i, :k] = 1
        if sequence_labels:
            out["labels"][i, :k] = torch.tensor(r["labels"])
        if "token_type_ids" in r:
            out["token_type_ids"][i, :k] = torch.tensor(r["token_type_ids"])
    return out


def batches_per_epoch(num_samples: int, batch_size: int, world: int = 1) -> int:
    """Batches each rank gets from one epoch of :func:`train_batches` (the last incomplete
    global batch is dropped)."""
    size = min(batch_size * world, num_samples - num_samples % world)
    return num_samples // size if size > 0 else 0


def train_batches(ds: Dataset, batch_size: int, pad_id: int, seed: int,
                  group_by_length: bool = False, start: int = 0, rank: int = 0,
                  world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches; epoch e uses permutation seed ``(seed, e)``.

    ``group_by_length``: batches of similar lengths (less padding), in shuffled order.
    ``start``: batches already consumed (a resumed run continues the same order).
    ``rank``/``world`` (data parallel): each global batch of ``batch_size * world`` samples
    is dealt out as DistributedSampler does (sample j to rank j mod world), so the ranks
    together see exactly the batches one process with the global batch size would.
    """
    if len(ds) == 0:
        raise ConfigError("data: the training split is empty")
    rows = ds.with_format(None)
    n = len(rows)
    if n < world:
        raise ConfigError(f"data: {n} training samples cannot be shared by {world} processes")
    # The last incomplete (global) batch of an epoch is dropped.
    size = min(batch_size * world, n - n % world)
    lengths = [len(x) for x in rows["input_ids"]] if group_by_length else None
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        if lengths is not None:
            # Sort within windows of 50 batches, then shuffle the batches.
            window = size * 50
            perm = [i for s in range(0, n, window)
                    for i in sorted(perm[s: s + window], key=lambda j: -lengths[j])]
        starts = list(range(0, n - size + 1, size))
        if lengths is not None:
            starts = [starts[i] for i in torch.randperm(len(starts), generator=g).tolist()]
        for first in starts:
            if start:
                start -= 1
                continue
            yield collate([rows[i] for i in perm[first + rank: first + size: world]], pad_id)
        epoch += 1


def eval_batches(ds: Dataset, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    rows = ds.with_format(None)
    for start in range(0, len(rows), batch_size):
        yield collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))],
                      pad_id)
