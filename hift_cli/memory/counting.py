"""Counting without weights: the architecture on the meta device (or a small CPU sample of
it), the optimizer's state bytes per parameter (by stepping it on meta tensors), the
update's temporaries, and what one GPU keeps of a parameter under FSDP2."""

from __future__ import annotations

import copy
import functools
import math
import weakref
from dataclasses import dataclass

import torch
from hydra.utils import get_class
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hift_cli.config import SHAPES, Config, ConfigError, optimizer_kind
from hift_cli.models import DTYPES, load_config, resolve
from hift_cli.memory.inputs import EstimateInput, as_input
from hift_cli.offload import state_shapes


CATEGORIES = ("weights", "gradients", "optimizer_states", "fp32_masters", "activations",
              "other")


GIB = 2**30


SAMPLE_BLOCKS = 2  # blocks of the CPU sample the fallback measures


def gib(n: float) -> str:
    """Bytes in GiB for a message: 2 decimals, 3 significant digits below 1 GiB."""
    return f"{n / GIB:.2f}" if abs(n) >= GIB else f"{n / GIB:.3g}"


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
    def of(cls, source: Config | EstimateInput) -> "Settings":
        inp = as_input(source)
        bf16 = inp.dtype == "bfloat16"
        mixed = inp.precision == "bf16-mixed"
        return cls(weight_bytes=2 if bf16 else 4,
                   state_dtype=torch.bfloat16 if bf16 and not mixed else torch.float32,
                   mixed=mixed,
                   checkpointing=inp.checkpointing, batch_size=inp.batch_size,
                   seq_len=inp.seq_len, causal=inp.task == "causal_lm")


def _architecture(inp: EstimateInput):
    """The configured model's config, its Auto class and the dtype to count in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    shape = inp.shape
    if shape:
        if shape not in SHAPES:
            raise ConfigError(f"memprofile.shape: unknown preset {shape!r}"
                              f" (one of {', '.join(SHAPES)})")
        preset = dict(SHAPES[shape])
        config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    else:
        config = load_config(resolve(inp.model), inp.trust_remote_code)
    cls = (AutoModelForCausalLM if inp.task == "causal_lm"
           else AutoModelForSequenceClassification)
    # bf16-autocast saves mostly bf16 activations: build in bf16 for the estimate.
    compute = torch.bfloat16 if inp.precision != "fp32" else DTYPES[inp.dtype]
    return config, cls, compute


def meta_model(source: Config | EstimateInput) -> nn.Module:
    """The configured architecture on the meta device: no memory, no weights."""
    inp = as_input(source)
    config, cls, dtype = _architecture(inp)
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype, trust_remote_code=inp.trust_remote_code)


def sample_model(source: Config | EstimateInput) -> nn.Module:
    """A real, randomly initialised CPU copy of the architecture with at most
    ``SAMPLE_BLOCKS`` blocks (all of them if its config has no ``num_hidden_layers``)."""
    inp = as_input(source)
    config, cls, dtype = _architecture(inp)
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):  # leave training's RNG be
        torch.manual_seed(0)
        return cls.from_config(_truncated(config, SAMPLE_BLOCKS), dtype=dtype,
                               trust_remote_code=inp.trust_remote_code)


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
