"""``hift generate``: talk to a fine-tuned model.

The model answers ``prompt=...``, or else each line read from stdin (typed at a ``>``
prompt when stdin is a terminal) until an empty line, the end of input or Ctrl-C. Each
prompt is formatted the way the run formatted its training prompts: the same
:class:`~hift_cli.data.PromptBuilder` with the data settings of the run's
``config.yaml`` (chat template or ``data.prompt_template``), so the model sees now what it
saw in training. Each prompt is answered on its own, with no history. Decoding is
``model.generate`` with the KV cache: greedy unless ``generate.temperature > 0``. Answers
stream to stdout; logs go to stderr.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import torch
from transformers import TextStreamer

from hift_cli.config import Config, ConfigError, DataConfig, GenerateConfig
from hift_cli.data import PromptBuilder
from hift_cli.models import autocast, load_config, load_model, load_tokenizer, pick_device, \
    resolve
from hift_cli.runs import trained_model

log = logging.getLogger(__name__)

# What decides a prompt's tokens (the rest of the data config is about files and batches).
PROMPT_KEYS = ("format", "prompt_template", "use_chat_template")


class Generator:
    """A model, its tokenizer and the run's prompt format: text in, answer out."""

    def __init__(self, model, tokenizer, data_cfg: DataConfig, gen_cfg: GenerateConfig,
                 device: torch.device, precision: str = "fp32"):
        self.model = model.eval()
        self.tok = tokenizer
        self.data_cfg = data_cfg
        self.cfg = gen_cfg
        self.device = device
        self.precision = precision
        self.builder = PromptBuilder(tokenizer, data_cfg)

    def describe(self) -> str:
        """How prompts are formatted and answers decoded, for the log."""
        if self.data_cfg.format == "text":
            fmt = "continues the text (data.format=text)"
        else:
            fmt = "chat template" if self.builder.chat else "data.prompt_template"
        c = self.cfg
        decoding = "greedy" if c.temperature == 0 else \
            f"sampling (temperature {c.temperature:g}, top_p {c.top_p:g}, top_k" \
            f" {c.top_k or 'off'}, seed {c.seed})"
        return f"{fmt}; {decoding}; at most {c.max_new_tokens} new tokens"

    def prompt_ids(self, text: str) -> list[int]:
        """The tokens the model is given for ``text``: a training prompt with ``text`` as
        its instruction (question), or the text itself for ``data.format=text``."""
        if self.data_cfg.format == "text":
            return self.builder.prefix + self.tok(text, add_special_tokens=False).input_ids
        return self.builder.prompt_ids(text)

    @torch.no_grad()
    def answer(self, text: str, stream: bool = False) -> str:
        """The model's answer to ``text``, decoded without special tokens; ``stream``:
        also print it to stdout as it is generated."""
        ids = self.prompt_ids(text)
        new_tokens = self.cfg.max_new_tokens
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions:
            if len(ids) >= positions:
                raise ConfigError(f"prompt: {len(ids)} tokens fill the model's context"
                                  f" ({positions} positions): shorten it")
            new_tokens = min(new_tokens, positions - len(ids))
        c = self.cfg
        sample = c.temperature > 0
        if sample:
            torch.manual_seed(c.seed)  # per answer: the same prompt, the same answer
        input_ids = torch.tensor([ids], device=self.device)
        streamer = TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True) \
            if stream else None
        with autocast(self.precision, self.device):
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens, do_sample=sample,
                temperature=c.temperature if sample else None,
                top_p=c.top_p if sample else None, top_k=(c.top_k or None) if sample else None,
                pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                use_cache=True, streamer=streamer)
        return self.tok.decode(out[0, len(ids):], skip_special_tokens=True)


def load_generator(cfg: Config) -> Generator:
    """The model of ``checkpoint`` (else the recipe's ``model``) on ``trainer.device``, with
    the prompt format of the run it comes from (else the recipe's ``data``)."""
    trained = trained_model(cfg.checkpoint) if cfg.checkpoint else None
    if trained is None and cfg.model.random_init:
        raise ConfigError("the recipe's model is random-init (model.random_init=true), nothing"
                          " to talk to: give checkpoint=<run dir or model folder>")
    path = str(trained.path) if trained else resolve(cfg.model.name_or_path)
    remote = cfg.model.trust_remote_code
    architectures = getattr(load_config(path, remote), "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"{path} is a classifier ({architectures[0]}): hift generate"
                          " needs a causal LM")
    data_cfg = cfg.data
    if trained is not None and trained.config is not None:
        data_cfg = dataclasses.replace(cfg.data, **{
            k: trained.setting(f"data.{k}", getattr(cfg.data, k)) for k in PROMPT_KEYS})
    device = pick_device(cfg.trainer.device)
    tokenizer = load_tokenizer(path, remote)
    # Loaded as saved: a checkpoint always has weights, whatever the recipe says.
    model_cfg = dataclasses.replace(cfg.model, name_or_path=path, random_init=False,
                                    task="causal_lm")
    model = load_model(model_cfg, path, tokenizer.pad_token_id,
                       cfg.weights_dtype()).to(device)
    generator = Generator(model, tokenizer, data_cfg, cfg.generate, device,
                          cfg.trainer.precision)
    source = f"the run's {trained.run / 'config.yaml'}" if trained and trained.config \
        else "the recipe's data"
    log.info(f"Prompts: {generator.describe()} (prompt format from {source})")
    return generator


def run_generate(cfg: Config) -> list[str]:
    """The task behind ``hift generate``: answer ``cfg.prompt``, or each line of stdin
    until an empty line, its end or Ctrl-C. Returns the answers."""
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise ConfigError("prompt is empty: give the text to answer, prompt=\"...\" (or no"
                          " prompt at all to type prompts one a line)")
    generator = load_generator(cfg)
    if cfg.prompt is not None:
        return [generator.answer(cfg.prompt, stream=True)]
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        log.info("Type a prompt and Enter; an empty line, Ctrl-D or Ctrl-C ends.")
    answers = []
    try:
        while True:
            line = input("> ") if interactive else sys.stdin.readline()
            if not line.strip():  # an empty line, or the end of piped input
                break
            answers.append(generator.answer(line.rstrip("\n"), stream=True))
    except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C: a clean end
        if interactive:
            print(file=sys.stderr)  # the shell's prompt on a line of its own
    return answers
