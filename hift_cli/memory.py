"""Where training memory goes: weights, gradients, optimizer states, fp32 masters,
activations and other, for full fine-tuning (fpft) and HiFT side by side.

``estimate`` needs no weights: the model is built on the meta device from its config,
activations are the bytes autograd saves in a meta forward pass (each storage counted
once, parameters excluded), and optimizer-state bytes come from stepping the configured
optimizer on meta tensors. Models whose forward pass cannot run on meta tensors are
measured on a real 2-block CPU sample instead, scaled to the configured shape.
``hift_cli.memprofile.measure`` measures the same categories on real steps.

With ``memprofile.world_size`` N > 1 every row is per GPU for ``trainer.shard_weights``
(FSDP2 over N processes): :func:`fsdp_shard` gives what one GPU keeps, and the rows add
the full weights of the two units gathered at once and one unit's unsharded gradient.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import weakref
from dataclasses import dataclass

import torch
from hydra.utils import get_class
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hift_cli.config import SHAPES, Config, ConfigError, optimizer_kind
from hift_cli.grouping import (ForwardPassError, Group, GroupSchedule, Piece, Unit, block_stack,
                               find_units, make_groups, plan_units, row_gradients)
from hift_cli.loss import ChunkedLoss, chunk_tokens, chunkable
from hift_cli.models import DTYPES, load_config, resolve
from hift_cli.offload import offload_enabled, state_shapes

CATEGORIES = ("weights", "gradients", "optimizer_states", "fp32_masters", "activations",
              "other")
GIB = 2**30
SAMPLE_BLOCKS = 2  # blocks of the CPU sample the fallback measures
SAMPLE_LENGTHS = (8, 16, 24)  # its sequence lengths (a quadratic in length fits them)

log = logging.getLogger(__name__)

@dataclass
class Settings:
    """What the accounting depends on, read off a Config."""

    weight_bytes: int  # per parameter on the device
    state_dtype: torch.dtype  # dtype of the tensors the optimizer updates
    mixed: bool  # bf16-mixed: fp32 masters and fp32 master grads
    checkpointing: bool
    batch_size: int
    seq_len: int
    causal: bool  # causal_lm: a label per token; else one per sequence
    loss_chunk: int | None = None  # tokens per chunk of the chunked loss; None: plain

    @classmethod
    def of(cls, cfg: Config) -> "Settings":
        bf16 = cfg.model.dtype == "bfloat16"
        mixed = cfg.trainer.precision == "bf16-mixed"
        return cls(weight_bytes=2 if bf16 else 4,
                   state_dtype=torch.bfloat16 if bf16 and not mixed else torch.float32,
                   mixed=mixed,
                   checkpointing=cfg.model.gradient_checkpointing,
                   batch_size=cfg.trainer.batch_size, seq_len=cfg.memprofile.seq_len
                   or cfg.data.max_length, causal=cfg.model.task == "causal_lm")


def _architecture(cfg: Config):
    """The configured model's config, its Auto class and the dtype to count in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    shape = cfg.memprofile.shape
    if shape:
        if shape not in SHAPES:
            raise ConfigError(f"memprofile.shape: unknown preset {shape!r}"
                              f" (one of {', '.join(SHAPES)})")
        preset = dict(SHAPES[shape])
        config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    else:
        config = load_config(resolve(cfg.model.name_or_path), cfg.model.trust_remote_code)
    cls = (AutoModelForCausalLM if cfg.model.task == "causal_lm"
           else AutoModelForSequenceClassification)
    # bf16-autocast saves mostly bf16 activations: build in bf16 for the estimate.
    compute = torch.bfloat16 if cfg.trainer.precision != "fp32" else DTYPES[cfg.model.dtype]
    return config, cls, compute


def meta_model(cfg: Config) -> nn.Module:
    """The configured architecture on the meta device: no memory, no weights."""
    config, cls, dtype = _architecture(cfg)
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)


def sample_model(cfg: Config) -> nn.Module:
    """A real, randomly initialised CPU copy of the architecture with at most
    ``SAMPLE_BLOCKS`` blocks (all of them if its config has no ``num_hidden_layers``)."""
    config, cls, dtype = _architecture(cfg)
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):  # leave training's RNG be
        torch.manual_seed(0)
        return cls.from_config(_truncated(config, SAMPLE_BLOCKS), dtype=dtype,
                               trust_remote_code=cfg.model.trust_remote_code)


def _truncated(config, blocks: int):
    """``config`` with ``blocks`` layers; per-layer lists (``layer_types``) cut to match."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= blocks:
        return config
    config = copy.deepcopy(config)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n:
            setattr(config, key, value[:blocks])
    config.num_hidden_layers = blocks
    return config


def optimizer_state_bytes(opt_cfg: dict, params: list[torch.Tensor],
                          dtype: torch.dtype) -> dict[int, int]:
    """Device bytes of optimizer state per parameter (keyed by ``id``).

    Steps the configured optimizer once on a meta tensor of each distinct shape, so any
    ``torch.optim`` class reports its own state. Optimizers that cannot step on meta
    tensors step on a real CPU tensor of that shape instead; bitsandbytes' 8-bit ones
    (CUDA only) use their documented layout.
    """
    kwargs = {k: v for k, v in opt_cfg.items() if k != "_target_"}
    target, kind = opt_cfg["_target_"], optimizer_kind(opt_cfg)
    per_shape: dict[tuple, int] = {}
    out = {}
    for p in params:
        key = tuple(p.shape)
        if key not in per_shape:
            if kind.bitsandbytes and kind.eight_bit:
                per_shape[key] = _bnb_8bit_state_bytes(p.numel())
            else:
                per_shape[key] = _stepped_state_bytes(get_class(target), kwargs, key, dtype)
        out[id(p)] = per_shape[key]
    return out


def _stepped_state_bytes(cls, kwargs: dict, shape: tuple, dtype: torch.dtype) -> int:
    try:
        shapes = state_shapes(functools.partial(cls, **kwargs), shape, dtype)
    except RuntimeError:
        raise ConfigError(f"optimizer {cls.__name__}: cannot tell its state size") from None
    return sum(s.numel() * dt.itemsize for s, dt in shapes.values())


class LiveBytes(TorchDispatchMode):
    """The peak bytes of tensors that ops create and drop within the mode (outputs that
    are neither views nor written in place), tracked by their lifetimes."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable:
            given = {id(t) for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
            for t in tree_flatten(out)[0]:
                if torch.is_tensor(t) and id(t) not in given and t._base is None:
                    n = t.numel() * t.element_size()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n

    @property
    def temporaries(self) -> int:
        """The peak less what is still alive (what the ops created to keep, e.g. an
        optimizer's state at its first step)."""
        return self.peak - self.live


def update_temporaries(opt_cfg: dict, dtype: torch.dtype,
                       multi_tensor: bool) -> tuple[float, float, float]:
    """What one step of the optimizer allocates for a moment, per element of the tensors
    it updates: ``(a, b, c)`` with temporaries = a x (all of them) + b x (the largest) +
    c x (the second largest), in ``dtype``'s bytes. A multi-tensor (foreach) update, the
    default for CUDA tensors, allocates across all its tensors at once (AdamW: the
    second moment's sqrt, a = 1); a per-tensor one, the default on a CPU, one or two
    tensors' worth at a time (AdamW: b = 2 for the current tensor's sqrt and quotient,
    c = 1 for the previous one's denominator, alive until it is replaced). Measured on
    the second step (the state exists) of two probes on meta tensors (else the CPU)."""
    if optimizer_kind(opt_cfg).bitsandbytes:  # fused CUDA kernels, in place
        return 0.0, 0.0, 0.0
    given = {k: v for k, v in opt_cfg.items() if k != "_target_"}
    kwargs = dict(given)
    if multi_tensor and "foreach" not in kwargs and not kwargs.get("fused"):
        kwargs["foreach"] = True  # what torch.optim picks for CUDA tensors
    cls = get_class(opt_cfg["_target_"])
    big, small, size = 256 * 256, 256, dtype.itemsize

    def temporaries(shapes, device) -> int:
        params = [nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
                  for shape in shapes]
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            opt = cls(params, **kwargs)
        except TypeError:  # no foreach keyword
            opt = cls(params, **given)
        opt.step()
        with LiveBytes() as live:
            opt.step()
        return live.temporaries

    for device in ("meta", "cpu"):
        try:
            one = temporaries([(256, 256), (256,)], device) / size  # big, small
            two = temporaries([(256, 256), (256, 256)], device) / size  # big, big
        except Exception:  # e.g. fused kernels on meta, .item() in the update
            continue
        if multi_tensor:  # one = a (big + small) + b big; two = 2 a big + b big
            a = max((two - one) / (big - small), 0.0)
            return a, max(one / big - a * (big + small) / big, 0.0), 0.0
        # one = b big + c small; two = (b + c) big
        c = max((two - one) / (big - small), 0.0)
        return 0.0, max((one - c * small) / big, 0.0), c
    return 0.0, 0.0, 0.0


def _bnb_8bit_state_bytes(numel: int) -> int:
    if numel < 4096:  # bitsandbytes keeps small tensors' states in 32 bits
        return 2 * 4 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)  # 2 x uint8 + fp32 absmax per block


def fsdp_shard(params, states: dict[int, int], world_size: int) -> tuple[int, int]:
    """(elements, optimizer-state bytes) of ``params`` that one of ``world_size`` ranks
    keeps under FSDP2's ``fully_shard``: it shards each parameter on dim 0, rank r holding
    the r-th ``torch.chunk``, padded to ceil(d0 / N) rows x the other dims; the optimizer
    state of a parameter (bytes in ``states``, by ``id``) in proportion to the elements
    kept. world_size=1: all of them."""
    numel = state_bytes = 0
    for p in params:
        full = p.numel()
        local = math.ceil(p.shape[0] / world_size) * math.prod(p.shape[1:]) if p.dim() else full
        numel += local
        state_bytes += states[id(p)] * local // full if full else 0
    return numel, state_bytes


class _FlashAttention(torch.autograd.Function):
    """Saves what flash attention saves (q, k, v as given, the output and a log-sum-exp).
    Only counted, never differentiated: on meta tensors the output is empty, on real ones
    the original kernel computes it."""

    @staticmethod
    def forward(ctx, sdpa, query, key, value, kwargs):
        out = torch.empty_like(query)
        if not query.is_meta:  # in the layout the GPU kernels return: like the query
            out.copy_(sdpa(query, key, value, **kwargs))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out


class _MetaGroupedMm(torch.autograd.Function):
    """``grouped_mm`` (MoE experts) on meta tensors of any dtype: the meta kernel accepts
    only bf16 (the CUDA kernel's rule), the CPU one runs fp32 too. Saves what the real op
    saves: each operand where the other needs a gradient, and the offsets."""

    @staticmethod
    def forward(ctx, grouped_mm, mat_a, mat_b, offs, kwargs):
        shape = grouped_mm(mat_a.to(torch.bfloat16), mat_b.to(torch.bfloat16), offs=offs,
                           **kwargs).shape
        need_a, need_b = ctx.needs_input_grad[1:3]
        ctx.save_for_backward(*(t for t, keep in ((mat_a, need_b), (mat_b, need_a), (offs, True))
                                if keep and t is not None))
        return mat_a.new_empty(shape, dtype=kwargs.get("out_dtype") or mat_a.dtype)


@contextlib.contextmanager
def counting_kernels(real_attention: bool = False):
    """Run a forward pass for counting saved tensors, on meta tensors where possible.

    On meta tensors SDPA falls back to the math path, which saves the full attention
    matrix; the kernels that really run (flash / memory-efficient on CUDA, flash on CPU)
    save only q, k, v, the output and a log-sum-exp, so attention is routed to a function
    that saves exactly those (also on real tensors with ``real_attention``: the CPU sample
    of :func:`sampled_activation_bytes` must count what a GPU saves). Meta ``grouped_mm``
    gets any dtype, and transformers' padding warning, which reads token values, is skipped.
    """
    import torch.nn.functional as F
    from transformers import PreTrainedModel

    sdpa, grouped_mm = F.scaled_dot_product_attention, getattr(F, "grouped_mm", None)
    warn = PreTrainedModel.warn_if_padding_and_no_attention_mask

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, **kwargs):
        kwargs.update(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa)
        if query.is_meta or real_attention:
            return _FlashAttention.apply(sdpa, query, key, value, kwargs)
        return sdpa(query, key, value, **kwargs)

    def meta_grouped_mm(mat_a, mat_b, *, offs=None, **kwargs):
        if mat_a.is_meta and mat_a.dtype != torch.bfloat16:
            return _MetaGroupedMm.apply(grouped_mm, mat_a, mat_b, offs, kwargs)
        return grouped_mm(mat_a, mat_b, offs=offs, **kwargs)

    F.scaled_dot_product_attention = flash
    if grouped_mm is not None:
        F.grouped_mm = meta_grouped_mm
    PreTrainedModel.warn_if_padding_and_no_attention_mask = lambda *args: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        if grouped_mm is not None:
            F.grouped_mm = grouped_mm
        PreTrainedModel.warn_if_padding_and_no_attention_mask = warn


def activation_bytes(model: nn.Module, groups: list[Group], settings: Settings
                     ) -> list[int]:
    """Bytes autograd keeps for backward while each group is the active one."""
    blocks = list(block_stack(model)[1])
    result = []
    for group in groups:
        saved = _saved_bytes(model, blocks, group.params.values(), settings.batch_size,
                             settings.seq_len, settings.causal, settings.loss_chunk)
        result.append(saved.with_checkpointing() if settings.checkpointing else saved.total)
    return result


def _saved_bytes(model: nn.Module, blocks: list[nn.Module], active, batch: int, seq_len: int,
                 causal: bool, loss_chunk: int | None = None) -> "SavedBytes":
    """One training forward pass with only the ``active`` parameters requiring grad (the
    causal-LM loss chunked by ``loss_chunk`` tokens, as the engine computes it)."""
    device = next(model.parameters()).device
    # Real (sample) models get real token ids; on meta any ids will do.
    vocab = max(4, getattr(model.config, "vocab_size", None) or 4)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)
                        ).to(device)
    labels = ids if causal else torch.zeros(batch, dtype=torch.long, device=device)
    active = {id(p) for p in active}
    for p in model.parameters():
        p.requires_grad_(id(p) in active)
    saved = SavedBytes(model, blocks)
    chunked = (ChunkedLoss(model, loss_chunk).active() if loss_chunk and causal
               else contextlib.nullcontext())
    try:
        with saved, counting_kernels(real_attention=not ids.is_meta), chunked:
            model(input_ids=ids, labels=labels)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return saved


# ------------------------------------------------------- fallback: a sampled CPU model
def _block_states(units: set[str], num_blocks: int):
    """What requires grad in each block while ``units`` are active: "params" (the first
    active block above frozen embeddings), "both", "input" (frozen, above an active unit)
    or None (nothing: the block saves nothing). The rest of the model's saved bytes
    depend on the flags (embeddings active, head active, a unit below the head active)."""
    grad_in, states = "embeddings" in units, []
    for i in range(num_blocks):
        active = f"block.{i}" in units
        states.append(("both" if grad_in else "params") if active
                      else ("input" if grad_in else None))
        grad_in = grad_in or active
    return ("embeddings" in units, "head" in units, grad_in), states


def _sample_stats(sample: nn.Module, units: dict[str, Unit], batch: int, seq_len: int,
                  causal: bool, needed: set, loss_chunk: int | None = None) -> dict:
    """Saved bytes of a sample model, split into what the groups of a deeper model are
    made of: the part outside the blocks per flags (those ``needed``), and a block's part
    per state (the first saving block separately: it also saves tensors shared by all
    blocks, such as rotary tables and masks), with the block inputs checkpointing keeps."""
    blocks = list(block_stack(sample)[1])
    n = len(blocks)
    # The first three give every block state; the others only their outside part.
    patterns = [set(units), {"embeddings"}, {"block.0"}, {f"block.{n - 1}", "head"}, {"head"}]
    stats: dict = {}
    for i, names in enumerate(patterns):
        names &= set(units)
        flags, states = _block_states(names, n)
        if i >= 3 and flags not in needed:
            continue
        active = [p for name in names for p in units[name].params.values()]
        saved = _saved_bytes(sample, blocks, active, batch, seq_len, causal, loss_chunk)
        stats[("outside", flags)] = saved.outside
        per_block = saved.per_block()
        first = True
        for j, state in enumerate(states):
            if state is not None:
                stats[("first" if first else "own", state)] = per_block.get(j, 0)
                stats[("input", state)] = saved.block_inputs.get(j, 0)
                first = False
    return stats


def _fit(points: dict[int, dict], x: int) -> dict:
    """Each statistic at ``x``, interpolated from its values at the points' keys: exact
    for sizes linear in batch and quadratic in length (a length x length matrix)."""
    out = {}
    for key in set().union(*points.values()):
        out[key] = sum(value.get(key, 0) * math.prod((x - xk) / (xj - xk) for xk in points
                                                      if xk != xj)
                       for xj, value in points.items())
    return out


def sampled_activation_bytes(sample: nn.Module, groups: list[Group], num_blocks: int,
                             settings: Settings) -> list[int]:
    """Activations per group, scaled from a real CPU sample of the architecture with
    fewer blocks, measured at batch 2 and 3 and three short lengths (for models whose
    meta forward fails)."""
    batch, seq_len = settings.batch_size, settings.seq_len
    # Batch 1 is a special case for some models (Bloom's ALiBi broadcasts it).
    batches = (batch,) if batch <= 3 else (2, 3)
    lengths = (seq_len,) if seq_len <= max(SAMPLE_LENGTHS) else SAMPLE_LENGTHS
    shapes = [_block_states({u.parent or u.name for u in g.units}, num_blocks) for g in groups]
    needed = {flags for flags, _ in shapes}
    units = {u.name: u for u in find_units(sample)}
    stats = _fit({b: _fit({n: _sample_stats(sample, units, b, n, settings.causal, needed,
                                            settings.loss_chunk)
                           for n in lengths}, seq_len) for b in batches}, batch)
    result = []
    for flags, states in shapes:
        parts, inputs, first = [], 0, True
        for state in states:
            if state is not None:
                key = ("first", state) if first or ("own", state) not in stats else ("own", state)
                parts.append(stats[key])
                inputs += stats[("input", state)] if stats[key] else 0
                first = False
        outside = stats[("outside", flags)]
        total = (outside + inputs + max(parts, default=0) if settings.checkpointing
                 else outside + sum(parts))
        result.append(round(total))
    return result


class SavedBytes:
    """Counts the storages autograd saves during a forward pass, once each, and which
    transformer block saved them (to model gradient checkpointing)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.blocks = blocks
        self.seen: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, block)
        self.block_inputs: dict[int, int] = {}
        self.current: int | None = None
        self._hooks = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.params and storage._cdata not in self.seen:
            self.seen[storage._cdata] = (storage.nbytes(), self.current)
        return t

    def __enter__(self) -> "SavedBytes":
        for i, block in enumerate(self.blocks):
            def pre(module, args, kwargs, i=i):
                self.current = i
                hidden = args[0] if args else kwargs.get("hidden_states")
                if torch.is_tensor(hidden):
                    self.block_inputs[i] = hidden.nbytes if hidden.requires_grad else 0

            def post(module, args, output, i=i):
                self.current = None

            self._hooks += [block.register_forward_pre_hook(pre, with_kwargs=True),
                            block.register_forward_hook(post)]
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def total(self) -> int:
        return sum(b for b, _ in self.seen.values())

    @property
    def outside(self) -> int:
        return sum(b for b, blk in self.seen.values() if blk is None)

    def per_block(self) -> dict[int, int]:
        per_block: dict[int, int] = {}
        for b, blk in self.seen.values():
            if blk is not None:
                per_block[blk] = per_block.get(blk, 0) + b
        return per_block

    def with_checkpointing(self) -> int:
        """Checkpointed blocks keep only their input; one block's internals come back
        at a time during backward."""
        per_block = self.per_block()
        inputs = sum(self.block_inputs.get(i, 0) for i in per_block)
        return self.outside + inputs + max(per_block.values(), default=0)


class Estimator:
    """The estimate's pieces for one config, built once: the meta model, its units (and the
    always-active ones, which the groups leave), every parameter's optimizer-state bytes.
    Rows for any grouping of the units come without a forward pass but for activations,
    which are memoised per (batch, active units): a k scan repeats no pass."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.settings = Settings.of(cfg)
        self.model = meta_model(cfg)
        self.sample: nn.Module | None = None
        self.methods = {"unit_split_method": "meta", "activation_method": "meta"}
        try:
            with counting_kernels():
                self.units = find_units(self.model)
        except ForwardPassError:
            self.sample = sample_model(cfg)
            self.units = find_units(self.model, reference=self.sample)
            self.methods["unit_split_method"] = "cpu-sample"
        # What one GPU keeps of each unit (memprofile.world_size > 1: sharded with FSDP2).
        self.world_size = cfg.memprofile.world_size
        # The engine's units: hift.always_active's, and the rest with units over
        # hift.max_unit_params cut into sub-units (not when sharded), in forward order.
        order = {u.name: i for i, u in enumerate(self.units)}
        self.always, self.rest = plan_units(self.units, cfg.hift, self.world_size > 1)
        self.units = sorted([*self.always, *self.rest], key=lambda u: order[u.parent or u.name])
        all_params = list({id(p): p for u in self.units for p in u.params.values()}.values())
        self.total_numel = sum(p.numel() for p in all_params)
        self.states = optimizer_state_bytes(dict(cfg.optimizer), all_params,
                                            self.settings.state_dtype)
        # What the update allocates for a moment (after backward: activations are gone).
        self.update_temps = update_temporaries(dict(cfg.optimizer), self.settings.state_dtype,
                                               multi_tensor=cfg.trainer.device != "cpu")
        self._piece_states: dict[tuple, int] = {}
        self.master_bytes = 4 if self.settings.mixed else 0
        self.shard = {u.name: fsdp_shard(u.params.values(), self.states, self.world_size)
                      for u in self.units}
        # The engine's loss: chunked where the model allows; and the parameters whose
        # sub-units get gradients for their rows only (embeddings, the chunked head).
        self.settings = dataclasses.replace(self.settings, loss_chunk=self._loss_chunk())
        head = self.model.get_output_embeddings() if self.settings.loss_chunk else None
        self.routable = row_gradients(self.model, head)
        self.passes = 0  # activation passes run (meta, or sampled groups)
        self._acts: dict[tuple, int] = {}
        self._meta_error: Exception | None = None

    def _loss_chunk(self) -> int | None:
        """Tokens per chunk of the engine's chunked loss for this model, or None (plain)."""
        cfg = self.cfg
        vocab = getattr(self.model.config, "vocab_size", None)
        if cfg.model.task != "causal_lm" or not vocab:
            return None
        chunk = chunk_tokens(cfg.model.loss_chunk_tokens, vocab)
        if chunk is None:
            return None
        try:
            with counting_kernels():
                ok = chunkable(self.model)
        except Exception:  # a meta forward that reads values: ask the CPU sample
            if self.sample is None:
                self.sample = sample_model(cfg)
            ok = chunkable(self.sample)
        return chunk if ok else None

    def piece_state(self, piece: Piece) -> int:
        """Optimizer-state bytes of the tensor the optimizer updates for ``piece``."""
        if piece.whole:
            return self.states[id(piece.param)]
        shape = piece.shape
        if shape not in self._piece_states:
            probe = torch.empty(shape, device="meta")
            self._piece_states[shape] = optimizer_state_bytes(
                dict(self.cfg.optimizer), [probe], self.settings.state_dtype)[id(probe)]
        return self._piece_states[shape]

    def gradient_bytes(self, pieces: list[Piece]) -> int:
        """Gradients while ``pieces`` train: each piece's (fp32 on the masters in
        bf16-mixed); a sub-unit whose parameter cannot give its rows alone costs the
        parameter's whole dense gradient (in bf16-mixed, beside its rows' fp32 one)."""
        mb, wb = self.master_bytes, self.settings.weight_bytes
        total = 0
        for pc in pieces:
            dense = pc.param.numel() * wb if (not pc.whole and id(pc.param)
                                              not in self.routable) else 0
            # bf16-mixed: fp32 rows beside a dense bf16 gradient; else the rows are a view
            # of the dense gradient, or the gradient itself.
            total += pc.numel * mb + dense if mb else (dense or pc.numel * wb)
        return total

    def groups(self, k: int | None, m: int | None = None,
               grouping: str | None = None) -> list[Group]:
        """HiFT groups of the units that are not always active."""
        return make_groups(self.rest, "bottom2up", k, m, grouping)

    def offload(self, num_groups: int) -> bool:
        """The engine's rule (e.g. no offload with k <= 2); estimates are for the GPU you
        train on unless trainer.device=cpu."""
        device = "cpu" if self.cfg.trainer.device == "cpu" else "cuda"
        return offload_enabled(self.cfg, device, num_groups)[0]

    def active_units(self, group: Group) -> list[Unit]:
        """What requires grad while ``group`` trains: it and the always-active units."""
        names = {u.name for u in (*self.always, *group.units)}
        return [u for u in self.units if u.name in names]

    def activations(self, unit_lists: list[list[Unit]], batch: int | None = None) -> list[int]:
        """Activation bytes while each list of units is active (memoised)."""
        settings = (self.settings if batch is None
                    else dataclasses.replace(self.settings, batch_size=batch))
        keys = [(settings.batch_size, tuple(u.name for u in units)) for units in unit_lists]
        todo = {key: units for key, units in zip(keys, unit_lists) if key not in self._acts}
        if todo:
            groups = [Group(i, units) for i, units in enumerate(todo.values())]
            acts = None
            if self._meta_error is None:
                try:
                    acts = activation_bytes(self.model, groups, settings)
                except Exception as e:  # code that reads tensor values: .item(), nonzero()
                    self._meta_error = e
                    self.methods["activation_method"] = "cpu-sample-scaled"
                    announce = True
            else:
                announce = False
            if acts is None:
                if self.sample is None:
                    with contextlib.suppress(Exception):  # else _sampled_or_fail says why
                        self.sample = sample_model(self.cfg)
                acts = _sampled_or_fail(self.cfg, self.sample, self.model, groups, settings,
                                        self._meta_error, announce)
            self.passes += len(groups)
            self._acts.update(zip(todo, acts))
        return [self._acts[key] for key in keys]

    def gathered_units(self) -> list[Unit]:
        """The units whose full weights FSDP2 holds at once at most, as the engine wraps
        them (``distributed.shard_model``): the root (every unit that is not a block:
        embeddings, final norm, head), gathered for the whole step, plus the running
        block and the next one, prefetched (bounded by the two largest blocks)."""
        blocks = [u for u in self.units if u.name.startswith("block.")]
        root = [u for u in self.units if not u.name.startswith("block.")]
        return root + sorted(blocks, key=lambda u: -u.numel)[:2]

    def rows(self, groups: list[Group], offload: bool, acts: list[int] | None = None,
             always: bool = True) -> list[dict]:
        """Each group's row, per GPU; activations 0 where ``acts`` is None (a lower bound).

        Sizes are what one GPU keeps (``self.shard``: all of it with world_size=1). With
        world_size > 1 two more terms: the full weights of the gathered units, and the
        full gradient of the largest active unit before its reduce-scatter.
        """
        mb, wb = self.master_bytes, self.settings.weight_bytes
        sharded = self.world_size > 1
        always_units = self.always if always else []
        always_pieces = [pc for u in always_units for pc in u.pieces]

        def kept(pieces) -> tuple[int, int]:  # (elements, optimizer-state bytes) on this GPU
            if sharded:  # nothing is cut into sub-units: whole parameters
                return fsdp_shard([pc.param for pc in pieces], self.states, self.world_size)
            return sum(pc.numel for pc in pieces), sum(self.piece_state(pc) for pc in pieces)

        # What the optimizer holds: every group's pieces (a unit's sub-units in one group
        # are one tensor) and the always-active units'.
        all_numel, all_states = kept([pc for g in groups for pc in g.pieces] + always_pieces)
        # Always-active units' state and masters stay on the device, outside the slots.
        always_numel, always_states = kept(always_pieces)
        gathered = sum(u.numel for u in self.gathered_units()) * wb if sharded else 0
        kept_by_group = [kept(g.pieces) for g in groups]
        # The store's device slots hold the active group and the next one, at the two ends
        # of one buffer as large as the largest pair that can follow each other.
        own = [s + n * mb for n, s in kept_by_group]
        pairs = GroupSchedule(self.cfg.hift.strategy, len(groups), 0).pairs()
        slots = max([own[a] + own[b] for a, b in pairs] + own)
        a, b, c = self.update_temps
        rows = []
        for i, (g, (g_numel, g_states)) in enumerate(zip(groups, kept_by_group)):
            numel = g_numel + always_numel
            unsharded_grad = (max(u.numel for u in (*g.units, *always_units)) * wb
                              if sharded else 0)
            act = acts[i] if acts is not None else 0
            sizes = sorted((pc.numel for pc in [*g.pieces, *always_pieces]), reverse=True)
            largest, second = (sizes + [0])[:2]
            if sharded:  # each rank updates its shard
                largest, second = (math.ceil(n / self.world_size) for n in (largest, second))
            temps = int((a * numel + b * largest + c * second)
                        * self.settings.state_dtype.itemsize)
            row = {
                "group": g.name,
                "weights": all_numel * wb + gathered,
                # bf16-mixed: the group's bf16 grads become fp32 grads on its masters,
                # one parameter at a time, so the fp32 ones set the peak.
                "gradients": (numel * (mb or wb) if sharded
                              else self.gradient_bytes([*g.pieces, *always_pieces]))
                + unsharded_grad,
                "optimizer_states": g_states + always_states if offload else all_states,
                "fp32_masters": (numel if offload else all_numel) * mb,
                "activations": act,
                # The other slot, and the update's temporaries where they outgrow the
                # activations (freed by then): the peak is one or the other.
                "other": (slots - own[i] if offload else 0) + max(temps - act, 0),
            }
            if sharded:
                row["unsharded_gradient"] = unsharded_grad
            row["total"] = sum(row[c] for c in CATEGORIES)
            row["update_temporaries"] = temps
            row["params"] = g.numel
            # Offload: the bytes a switch to (and away from) this group copies each way.
            row["moved"] = own[i] if offload else 0
            rows.append(row)
        return rows

    def evaluate(self, groups: list[Group], offload: bool, budget: float | None = None,
                 batch: int | None = None) -> list[dict] | None:
        """Every group's row; with a ``budget`` (bytes), None as soon as one group is
        over it, trying first the groups without activations over it (no pass), then the
        bottom group (activations spanning the most layers), then the others."""
        static = self.rows(groups, offload)
        if budget is not None:
            if max(r["total"] for r in static) > budget:
                return None
            for i in [0, *sorted(range(1, len(groups)), key=lambda i: -static[i]["total"])]:
                (act,) = self.activations([self.active_units(groups[i])], batch)
                # static holds the update's temporaries; the peak, the larger of the two
                if static[i]["total"] + max(act - static[i]["update_temporaries"], 0) > budget:
                    return None
        acts = self.activations([self.active_units(g) for g in groups], batch)
        return self.rows(groups, offload, acts)

    def fpft(self) -> dict:
        acts = self.activations([self.units])
        return self.rows([Group(0, list(self.units))], False, acts, always=False)[0]

    def choose(self, budget: float) -> tuple[list[Group], list[dict]]:
        """The fewest balanced groups whose every row fits ``budget`` (bytes), k = 1, 2, ...
        A grouping whose rows without activations are already over it costs no pass."""
        n = len(self.rest)
        for k in range(1, n + 1):
            groups = self.groups(k, grouping="balanced")
            rows = self.evaluate(groups, self.offload(k), budget)
            if rows is not None:
                return groups, rows
        groups = self.groups(n, grouping="balanced")
        peak = max(r["total"] for r in self.evaluate(groups, self.offload(n)))
        s = self.settings
        fixes = ([] if s.checkpointing else ["model.gradient_checkpointing=true"]) + (
            [] if optimizer_kind(self.cfg.optimizer).eight_bit
            or self.cfg.trainer.device == "cpu" else ["an 8-bit optimizer (optimizer=adamw8bit)"]
        ) + [
            f"a smaller trainer.batch_size (now {s.batch_size}) or data.max_length"
            f" (now {s.seq_len})"]
        raise NoGroupingFits(n,
            f"hift.memory_budget={self.cfg.hift.memory_budget:g} GiB: no grouping fits in"
            f" its {gib(self.cfg.usable_bytes())} GiB left after the"
            f" {self.cfg.memory_reserve_gib():g} GiB reserve; the smallest peak, one unit per"
            f" group (k={n}), is {gib(peak)} GiB; to fit, try {', '.join(fixes)}")

    def largest_batch(self, groups: list[Group], offload: bool, budget: float) -> int:
        """The largest trainer.batch_size at which every group fits ``budget`` (bytes).

        Activations are linear in the batch: each group's line is fitted through the run's
        batch b and 2b, and the answer is confirmed by full estimates at it and one above.
        """
        static = self.rows(groups, offload)
        if max(r["total"] for r in static) > budget:
            return 0  # over it before any activation
        units = [self.active_units(g) for g in groups]
        b0 = self.settings.batch_size
        b1 = 2 * b0
        a0, a1 = self.activations(units, b0), self.activations(units, b1)
        best = 1 << 20
        for row, x0, x1 in zip(static, a0, a1):
            slope = (x1 - x0) / (b1 - b0)
            room = budget - row["total"] - (x0 - slope * b0)
            if slope > 0:
                best = min(best, math.floor(room / slope))
            elif room < 0:
                best = 0
        batch = max(0, best)

        def fits(b: int) -> bool:
            return b >= 1 and self.evaluate(groups, offload, budget, batch=b) is not None

        while batch >= 1 and not fits(batch):
            batch -= 1
        for _ in range(4):  # a line is exact for these models: at most a step off
            if not fits(batch + 1):
                break
            batch += 1
        return batch


class NoGroupingFits(ConfigError):
    """``hift.k=auto`` found no grouping under the budget; ``k``: the smallest peak's."""

    def __init__(self, k: int, message: str):
        super().__init__(message)
        self.k = k


def gib(n: float) -> str:
    """Bytes in GiB for a message: 2 decimals, 3 significant digits below 1 GiB."""
    return f"{n / GIB:.2f}" if abs(n) >= GIB else f"{n / GIB:.3g}"


def resolve_grouping(cfg: Config, estimator: Estimator | None = None, list_groups: bool = True
                     ) -> tuple[int, list[list[str]], dict]:
    """``hift.k=auto``: the fewest balanced groups whose estimated peak fits
    ``hift.memory_budget``, as ``(k, each group's unit names, report)``; logs the choice
    (and each group, with ``list_groups``).

    Raises:
        ConfigError: no grouping fits (one line: the smallest peak, what would fit).
    """
    import time

    start = time.perf_counter()
    est = estimator or Estimator(cfg)
    budget = cfg.usable_bytes()
    groups, rows = est.choose(budget)
    seconds = time.perf_counter() - start
    peak = max(r["total"] for r in rows)
    k = len(groups)
    report = {
        "k": k, "grouping": "balanced", "memory_budget_gib": cfg.hift.memory_budget,
        "reserve_gib": cfg.memory_reserve_gib(), "peak": peak, "headroom": budget - peak,
        "passes": est.passes,
        "seconds": round(seconds, 2), "always_active": [u.name for u in est.always],
        "groups": [{"group": g.name, "units": [u.name for u in g.units], "params": g.numel,
                    "peak": r["total"]} for g, r in zip(groups, rows)],
    }
    log.info(f"hift.k=auto: {k} balanced group(s) fit hift.memory_budget="
             f"{cfg.hift.memory_budget:g} GiB less its {cfg.memory_reserve_gib():g} GiB reserve:"
             f" estimated peak {gib(peak)} GiB, headroom"
             f" {gib(budget - peak)} GiB ({est.passes} activation passes,"
             f" {seconds:.1f} s)" + (f"; always active: {', '.join(report['always_active'])}"
                                    if est.always else ""))
    if k == 1:
        log.info("hift.k=auto: the budget holds full fine-tuning's peak; one group of every"
                 " unit is full fine-tuning (hift.strategy=fpft)")
    for g, r in zip(groups, rows) if list_groups else ():
        log.info(f"  group {g.index}: {g.name} ({g.numel / 1e6:.2f}M params), estimated peak"
                 f" {gib(r['total'])} GiB")
    return k, [[u.name for u in g.units] for g in groups], report


def build_groups(cfg: Config, units: list[Unit]) -> list[Group]:
    """The training run's groups of ``units`` (those not always active). ``hift.k=auto`` is
    resolved on the meta estimate for ``cfg`` (the trainer's ``estimate_config()``: its
    device resolved), and the groups are rebuilt from ``units`` by the same unit names."""
    hcfg = cfg.hift
    if hcfg.strategy == "fpft" or hcfg.k != "auto":
        return make_groups(units, hcfg.strategy, hcfg.k, hcfg.m,
                           None if hcfg.m is not None else hcfg.grouping)
    _, names, _ = resolve_grouping(cfg)
    by_name = {u.name: u for u in units}
    return [Group(i, [by_name[n] for n in group]) for i, group in enumerate(names)]


def estimate(cfg: Config, largest_batch: bool = False) -> dict:
    """Estimated device bytes per category for fpft and for HiFT (every group).

    The meta model's forward passes split it into units and count its activations.
    Where a meta forward pass fails (code that reads tensor values), a real CPU sample
    of the architecture with ``SAMPLE_BLOCKS`` blocks does that instead; the report's
    ``unit_split_method`` and ``activation_method`` say which was used. ``hift.k=auto``
    is resolved here (:func:`resolve_grouping`); with ``hift.memory_budget`` the report's
    ``budget`` says whether the grouping fits, and with ``largest_batch`` the largest
    trainer.batch_size that does. With ``memprofile.world_size`` > 1 every number is per
    GPU, and the report's ``sharding`` says what the rows add for sharding.
    """
    est = Estimator(cfg)
    hcfg = cfg.hift
    budget = cfg.usable_bytes() if hcfg.memory_budget else None
    resolution = None
    if hcfg.k == "auto" and budget is not None:
        # The report lists the groups (hift memprofile's table): not the log too.
        k, _, resolution = resolve_grouping(cfg, est, list_groups=False)
        grouping = "balanced"
        hift_groups = est.groups(k, grouping=grouping)
    elif hcfg.k == "auto":  # fpft with k=auto and no budget: one unit per group
        grouping, hift_groups = "contiguous", est.groups(len(est.rest))
    else:
        grouping = "contiguous" if hcfg.m is not None else hcfg.grouping or "contiguous"
        hift_groups = est.groups(hcfg.k, hcfg.m, grouping)
    offload = est.offload(len(hift_groups))
    per_group = est.evaluate(hift_groups, offload)
    fpft = est.fpft()
    report = {**_report(cfg, est.settings, offload, fpft, per_group, len(est.units),
                        est.total_numel), **est.methods}
    report["grouping"] = grouping
    report["always_active"] = [u.name for u in est.always]
    per = 1 if hcfg.strategy == "fpft" else hcfg.steps_per_group
    report["steps_per_group"] = per
    if offload:  # host <-> device traffic: each group's state in and out once per cycle
        cycle = sum(row["moved"] for row in per_group)
        report["transfer"] = {"bytes_per_cycle": cycle,
                              "bytes_per_step": cycle / (len(per_group) * per)}
    for row, g in zip(per_group, hift_groups):
        row["units"] = [u.name for u in g.units]
    if est.world_size > 1:
        report["sharding"] = _sharding(est, fpft, per_group)
    if budget is not None:
        column = "fpft" if hcfg.strategy == "fpft" else "hift"
        peak = report[column]["total"]
        report["budget"] = {"memory_budget_gib": hcfg.memory_budget,
                            "reserve_gib": cfg.memory_reserve_gib(), "fits": peak <= budget,
                            "peak": peak, "headroom": budget - peak,
                            "k": 1 if column == "fpft" else len(hift_groups),
                            "chosen": resolution is not None}
        if resolution is not None:
            report["budget"].update(passes=resolution["passes"],
                                    seconds=resolution["seconds"])
        if largest_batch:
            groups = [Group(0, list(est.units))] if column == "fpft" else hift_groups
            report["budget"]["largest_batch_size"] = est.largest_batch(
                groups, offload if column == "hift" else False, budget)
            report["budget"]["largest_batch_method"] = (
                "linear fit through batch b and 2b, confirmed by estimates at the answer"
                " and one above")
    return report


def _sampled_or_fail(cfg: Config, sample: nn.Module | None, model: nn.Module,
                     groups: list[Group], settings: Settings, error: Exception,
                     announce: bool = True) -> list[int]:
    """Activations from the CPU sample, for a model whose meta forward pass failed."""
    def reason(e: Exception) -> str:  # the first sentence: torch's can run for lines
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].split('. ')[0]}"

    if announce:
        log.info(f"the meta forward pass of {type(model).__name__} failed ({reason(error)});"
                 f" measuring activations on a {SAMPLE_BLOCKS}-block CPU sample")
    try:
        sample = sample if sample is not None else sample_model(cfg)
        return sampled_activation_bytes(sample, groups, len(block_stack(model)[1]), settings)
    except Exception as e:
        raise ConfigError(f"cannot estimate the activations of {type(model).__name__}: its"
                          f" forward pass fails on meta tensors ({reason(error)}) and on a"
                          f" CPU sample ({reason(e)})") from None


def _sharding(est: Estimator, fpft: dict, per_group: list[dict]) -> dict:
    """What the per-GPU rows of ``memprofile.world_size`` > 1 are made of."""
    wb, n = est.settings.weight_bytes, est.world_size
    gathered = est.gathered_units()
    kept = sum(est.shard[u.name][0] for u in est.units)
    return {
        "world_size": n,
        "method": "FSDP2 fully_shard per unit: each parameter sharded on dim 0, ceil(d0/N)"
                  " rows per GPU; optimizer state and fp32 masters sharded alike",
        "weights_unsharded_bytes": est.total_numel * wb,
        "weights_per_gpu_bytes": kept * wb,
        "gathered_units": [u.name for u in gathered],
        "gathered_units_bytes": sum(u.numel for u in gathered) * wb,
        "unsharded_grad_bytes": {"fpft": fpft["unsharded_gradient"],
                                 "hift": max(r["unsharded_gradient"] for r in per_group)},
    }


def _report(cfg, settings: Settings, offload: bool, fpft: dict, per_group: list[dict],
            num_units: int, total_params: int) -> dict:
    peak = max(per_group, key=lambda r: r["total"])
    hift = {c: max(r[c] for r in per_group) for c in CATEGORIES}
    hift["total"] = peak["total"]
    return {
        "model": cfg.memprofile.shape or cfg.model.name_or_path,
        "params": total_params,
        "units": num_units,
        "groups": len(per_group),
        "strategy": cfg.hift.strategy,
        "precision": cfg.trainer.precision,
        "optimizer": cfg.optimizer["_target_"],
        "offload": offload,
        "gradient_checkpointing": settings.checkpointing,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "world_size": cfg.memprofile.world_size,
        "fpft": {k: fpft[k] for k in (*CATEGORIES, "total")},
        "hift": hift,
        "hift_peak_group": peak["group"],
        "per_group": per_group,
    }


def _methods_line(report: dict) -> str:
    if report.get("activation_method", "meta") == "meta":
        acts = "activations: meta forward pass"
    else:
        acts = f"activations: scaled from a {SAMPLE_BLOCKS}-block CPU sample"
    if report.get("unit_split_method", "meta") != "meta":
        return f"units: split on a CPU sample; {acts}"
    return acts


def fixed_shape_batches(batch: int, seq_len: int, vocab: int):
    """Random token ids of one fixed shape, every position a target: memory and time
    depend on the shape alone, so measurements match the estimate's assumptions."""
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
        yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def render(report: dict, measured: dict | None = None):
    """A rich table: rows are categories, columns fpft and HiFT (GiB and % of total)."""
    from rich.table import Table

    unit, scale = ("GiB", GIB) if report["fpft"]["total"] >= GIB else ("MiB", 2**20)
    params = report["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    title = (f"{report['model']}: {size} params, {report['units']} units"
             f" in {report['groups']} {report.get('grouping', 'contiguous')} groups"
             f" ({report['strategy']})"
             + (f", always active: {', '.join(report['always_active'])}"
                if report.get("always_active") else "") + f", {report['precision']},"
             f" {report['optimizer'].rsplit('.', 1)[-1]}, batch {report['batch_size']} x"
             f" {report['seq_len']}, offload {'on' if report['offload'] else 'off'},"
             f" checkpointing {'on' if report['gradient_checkpointing'] else 'off'}")
    sharding = report.get("sharding")
    if sharding:
        title = (f"per GPU, {sharding['world_size']} processes sharding the weights"
                 f" (FSDP2) — {title}")
    table = Table(title=title)
    table.add_column(unit, justify="left")
    for name in ("fpft", "hift"):
        table.add_column(name, justify="right")
        table.add_column("%", justify="right")
        if measured:
            table.add_column(f"{name} measured", justify="right")
    for cat in (*CATEGORIES, "total"):
        cells = [cat.replace("_", " ")]
        for name in ("fpft", "hift"):
            value, total = report[name][cat], report[name]["total"]
            cells += [f"{value / scale:.3f}", f"{100 * value / total:.1f}"]
            if measured:
                cells.append(f"{measured[name][cat] / scale:.3f}")
        table.add_row(*cells, style="bold" if cat == "total" else None)
    table.caption = (f"hift rows: the largest over groups; hift total: the peak group"
                     f" ({report['hift_peak_group']})\n{_methods_line(report)}")
    if report.get("transfer"):
        per, moved = report.get("steps_per_group", 1), report["transfer"]
        table.caption += (
            f"\noffload: {moved['bytes_per_cycle'] / scale:.3f} {unit} each way per cycle,"
            f" {moved['bytes_per_step'] / scale:.3f} {unit} per step"
            f" ({report['groups']} groups x {per} step{'s' if per > 1 else ''})")
    if sharding:
        n = sharding["world_size"]
        table.caption += (
            f"\nper GPU of {n}: 1/{n} of every weight, gradient, optimizer state and fp32"
            f" master (dim 0 sharded); weights + {', '.join(sharding['gathered_units'])}"
            f" gathered ({sharding['gathered_units_bytes'] / scale:.3f} {unit}), gradients +"
            f" one unit's unsharded gradient before its reduce-scatter")
    return table


def render_groups(report: dict):
    """A rich table of the HiFT groups: units, parameters and estimated peak of each."""
    from rich.table import Table

    unit, scale = ("GiB", GIB) if report["fpft"]["total"] >= GIB else ("MiB", 2**20)
    always = report.get("always_active") or []
    table = Table(title=f"{report['groups']} {report.get('grouping', 'contiguous')} groups"
                  + (f" (+ always active: {', '.join(always)})" if always else ""))
    for name, justify in (("#", "right"), ("group", "left"), ("units", "right"),
                          ("params", "right"), (f"activations {unit}", "right"),
                          (f"peak {unit}", "right")):
        table.add_column(name, justify=justify)
    for i, row in enumerate(report["per_group"]):
        params = row.get("params", 0)
        table.add_row(str(i), row["group"], str(len(row.get("units", []))),
                      f"{params / 1e6:.2f}M", f"{row['activations'] / scale:.3f}",
                      f"{row['total'] / scale:.3f}",
                      style="bold" if row["group"] == report["hift_peak_group"] else None)
    return table


def budget_lines(report: dict) -> list[str]:
    """"Will it fit?" under hift.memory_budget, in words."""
    b = report.get("budget")
    if not b:
        return []
    what = (f"hift.k=auto chose k={b['k']} (balanced)" if b["chosen"]
            else f"k={b['k']} ({report.get('grouping', 'contiguous')})")
    per_gpu = (f" per GPU ({report['world_size']} processes)"
               if report.get("world_size", 1) > 1 else "")
    reserve = b.get("reserve_gib", 0)
    lines = [f"memory budget {b['memory_budget_gib']:g} GiB less a {reserve:g} GiB reserve:"
             f" {what}; estimated peak{per_gpu}"
             f" {gib(b['peak'])} GiB, {'fits' if b['fits'] else 'does NOT fit'}, headroom"
             f" {gib(b['headroom'])} GiB"]
    if b["chosen"] and b["k"] == 1:
        lines.append("k=1: the budget holds full fine-tuning's peak (one group of every unit)")
    if "largest_batch_size" in b:
        lines.append(f"largest trainer.batch_size that fits at this grouping:"
                     f" {b['largest_batch_size']} (at {report['seq_len']} tokens;"
                     f" {b['largest_batch_method']})")
    return lines
