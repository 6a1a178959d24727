"""Running out of memory during training: one line with the estimated peak and what to
change (:class:`~hift_cli.errors.TrainingStopped`), instead of a traceback."""

from __future__ import annotations

import contextlib
import os

import torch

from hift_cli.errors import TrainingStopped
from hift_cli.memory import estimate


@contextlib.contextmanager
def stop_on_out_of_memory(trainer):
    """Around a set-up trainer's steps: device or host memory running out stops the run
    with the estimated peak of its configuration (unless ``trainer.explain_out_of_memory``
    is False), what there was, and what to change."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        kind = "device" if isinstance(e, torch.OutOfMemoryError) else "host"
        e.__traceback__ = None  # it holds the step's frames, and so their tensors
    else:
        return
    need, capacity = _need_and_capacity(trainer, kind)
    fewer = ("train with HiFT (hift.strategy=bottom2up hift.k=auto)"
             if trainer.cfg.hift.strategy == "fpft"
             else "use fewer units per group (a larger hift.k or smaller hift.m)")
    step = trainer.global_step  # the failed step's group
    group = trainer.groups[trainer.schedule.group_at(step)]
    raise TrainingStopped(
        f"out of {kind} memory at step {step + 1} (group {group.name}): estimated peak"
        f" {need} for this configuration, {capacity / 2**30:.1f} GiB on {trainer.device};"
        f" {fewer}, model.gradient_checkpointing=true, an 8-bit optimizer"
        " (optimizer=adamw8bit), or a smaller trainer.batch_size or data.max_length", 1,
        out_of_memory=kind)


def _need_and_capacity(trainer, kind: str) -> tuple[str, int]:
    """The estimated peak of the trainer's configuration, and the bytes of what ran out."""
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        if not trainer.explain_out_of_memory:
            raise LookupError("not asked for")
        report = estimate(trainer.estimate_input())
        column = "fpft" if trainer.cfg.hift.strategy == "fpft" else "hift"
        need = f"{report[column]['total'] / 2**30:.1f} GiB"
    except Exception:  # the estimate is a courtesy here; the stop message is not
        need = "unknown"
    if kind == "device" and device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need, capacity
