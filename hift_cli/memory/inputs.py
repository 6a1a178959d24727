"""What the estimate depends on, and nothing else: :class:`EstimateInput`, built from a
config (``hift memprofile``, k=auto before training) or from a set-up trainer (its device,
offload decision and processes as resolved)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hift_cli.config import Config, HiftConfig, memory_reserve_gib, usable_bytes

_UNSET: Any = object()


@dataclasses.dataclass(frozen=True)
class EstimateInput:
    # The architecture: a preset shape (memprofile.shape), else the model's own config.
    model: str  # model.name_or_path
    shape: str | None
    trust_remote_code: bool
    task: str  # causal_lm (a label per token) or classification (one per sequence)
    # Precision and optimizer.
    dtype: str  # Config.weights_dtype(): the weights on the device
    precision: str  # trainer.precision (bf16-mixed: fp32 masters and their gradients)
    optimizer: dict  # the optimizer's config: _target_ and its settings
    # The batch.
    batch_size: int
    seq_len: int  # memprofile.seq_len, else data.max_length
    checkpointing: bool  # model.gradient_checkpointing
    loss_chunk_tokens: Any  # model.loss_chunk_tokens: "auto", a count, or None
    # Where it runs.
    device_type: str  # "cpu" or "cuda": the offload rule, the reserve, the update's kernels
    world_size: int  # processes sharding the weights (FSDP2): every row per GPU
    # The grouping: strategy, k / m, steps per group, always-active units, sub-units
    # (max_unit_params), offload, the memory budget and its reserve.
    hift: HiftConfig

    @classmethod
    def of(cls, cfg: Config, *, device_type: str | None = None, offload: Any = _UNSET,
           world_size: int | None = None) -> "EstimateInput":
        """The estimate's input for ``cfg``: on a GPU unless ``trainer.device=cpu`` (or
        ``device_type``); ``offload`` and ``world_size`` as decided elsewhere (a trainer's
        store, its processes), else the config's."""
        hift = cfg.hift if offload is _UNSET else dataclasses.replace(cfg.hift, offload=offload)
        return cls(
            model=cfg.model.name_or_path, shape=cfg.memprofile.shape,
            trust_remote_code=cfg.model.trust_remote_code, task=cfg.model.task,
            dtype=cfg.weights_dtype(), precision=cfg.trainer.precision,
            optimizer=dict(cfg.optimizer), batch_size=cfg.trainer.batch_size,
            seq_len=cfg.memprofile.seq_len or cfg.data.max_length,
            checkpointing=cfg.model.gradient_checkpointing,
            loss_chunk_tokens=cfg.model.loss_chunk_tokens,
            device_type=device_type or ("cpu" if cfg.trainer.device == "cpu" else "cuda"),
            world_size=world_size or cfg.memprofile.world_size, hift=hift)

    def reserve_gib(self) -> float:
        """GiB of hift.memory_budget kept back (none on a CPU, by default)."""
        return memory_reserve_gib(self.hift, self.device_type == "cpu")

    def usable_bytes(self) -> float:
        """Bytes of hift.memory_budget the estimated peak may take."""
        return usable_bytes(self.hift, self.device_type == "cpu")


def as_input(source: Config | EstimateInput) -> EstimateInput:
    """An estimate's input, from a config as given."""
    return source if isinstance(source, EstimateInput) else EstimateInput.of(source)
