"""``hift memprofile``: the memory breakdown of a recipe, estimated without weights, and
optionally measured on real steps beside the estimate (``measure``: a live trainer read
by a ``Probe``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from hift_cli.config import Config, ConfigError
from hift_cli.engine import HiftTrainer
from hift_cli.grouping import Group
from hift_cli.memory import (CATEGORIES, LiveBytes, NoGroupingFits, SavedBytes, Settings,
                             budget_lines, estimate, fixed_shape_batches, render, render_groups)
from hift_cli.progress import console

log = logging.getLogger(__name__)


def run_memprofile(cfg: Config, output_dir: str | Path) -> dict:
    """Print the estimate (and, with ``memprofile.measure``, the measurement).

    Raises:
        ConfigError: ``hift.k=auto`` and no grouping fits the budget, after printing the
            breakdown of the one with the smallest peak (one unit per group).
    """
    try:
        # With a budget: also the largest batch that fits (a few more activation passes).
        report = estimate(cfg, largest_batch=cfg.hift.memory_budget is not None)
    except NoGroupingFits as e:
        smallest = dataclasses.replace(cfg, hift=dataclasses.replace(cfg.hift, k=e.k, m=None))
        show(smallest, estimate(smallest), None)
        raise ConfigError(str(e)) from None
    measured = measure(cfg, output_dir) if cfg.memprofile.measure else None
    if measured:
        report["measured"] = measured
    show(cfg, report, measured)
    return report


def show(cfg: Config, report: dict, measured: dict | None) -> None:
    """The report as tables and lines (or JSON, ``memprofile.format=json``) on stdout."""
    if cfg.memprofile.format == "json":
        print(json.dumps(report, indent=2))
        return
    out = console()
    out.print(render(report, measured))
    if cfg.hift.strategy != "fpft":
        out.print(render_groups(report))
    for line in budget_lines(report):
        out.print(line, highlight=False, soft_wrap=True)


class Probe:
    """Measures the categories on a live :class:`~hift_cli.engine.HiftTrainer`.

    Activations: saved-tensor bytes of each training forward pass. Everything else: read
    right after each optimizer step, when the group's gradients, optimizer state and
    masters are all on the device.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.rows: list[dict] = []
        self._saved: SavedBytes | None = None
        model = trainer.model
        self._hooks = [
            model.register_forward_pre_hook(self._start),
            model.register_forward_hook(self._stop),
        ]
        trainer.after_update.append(self._read)
        # What the optimizer step allocates for a moment: counted beside "other" as the
        # estimate does (beyond the activations, which are gone by then).
        self._temporaries = 0
        step = self._step = trainer.optimizer.step

        def counted_step(*args, **kwargs):
            with LiveBytes() as live:
                out = step(*args, **kwargs)
            self._temporaries = live.temporaries
            return out
        trainer.optimizer.step = counted_step

    def _start(self, module, args):
        if module.training:
            self._saved = SavedBytes(module, [])
            self._saved.__enter__()

    def _stop(self, module, args, output):
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self._activations = self._saved.total
            self._saved = None

    def _read(self, trainer, group: Group) -> None:
        store = trainer.store

        def tensors(params, masters: bool):
            for p in params:
                if masters:
                    yield p.data
                else:
                    yield from (v for v in trainer.optimizer.state.get(p, {}).values()
                                if torch.is_tensor(v) and v.dim() > 0)

        def device_bytes(ts) -> int:  # not in the store's host buffers
            ts = list(ts)
            return _unique_bytes(t for t, at in zip(ts, store.holds(ts)) if at != "host")

        def slot_bytes(ts) -> int:
            ts = list(ts)
            return _unique_bytes(t for t, at in zip(ts, store.holds(ts)) if at == "slot")

        # Always-active units (hift.always_active) train with every group, on the device.
        always = getattr(trainer, "always_opt", [])
        active = trainer.opt_params[group.index] + always
        all_params = [p for ps in trainer.opt_params for p in ps] + always
        mixed = bool(trainer.masters)
        # The active group's (or, without offload, every group's) state on the device;
        # the next group's, already prefetched into the other slot, counts as "other".
        states = device_bytes(tensors(all_params, False)) - (
            slot_bytes(tensors(all_params, False)) - slot_bytes(tensors(active, False)))
        masters = 0
        if mixed:
            masters = device_bytes(tensors(all_params, True)) - (
                slot_bytes(tensors(all_params, True)) - slot_bytes(tensors(active, True)))
        active_in_slots = slot_bytes(tensors(active, False)) + (
            slot_bytes(tensors(active, True)) if mixed else 0)
        # Gradients by the memory they hold: a sub-unit's rows may be a view of its
        # parameter's whole dense gradient.
        grads = _storage_bytes([p.grad for p in trainer.model.parameters() if p.grad is not None]
                               + [m.grad for m in all_params if m.grad is not None])
        row = {"group": group.name,
               "weights": _unique_bytes(trainer.model.parameters()),
               "gradients": grads,
               "optimizer_states": states,
               "fp32_masters": masters,
               "activations": getattr(self, "_activations", 0),
               "other": store.footprint().device_bytes - active_in_slots
               + max(self._temporaries - getattr(self, "_activations", 0), 0)}
        row["total"] = sum(row[c] for c in CATEGORIES)
        if trainer.device.type == "cuda":
            row["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(trainer.device)
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self.rows.append(row)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.trainer.after_update.remove(self._read)
        self.trainer.optimizer.step = self._step


def _storage_bytes(tensors) -> int:
    """Bytes of the memory the tensors hold, each storage once and whole."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def _unique_bytes(tensors) -> int:
    """Bytes of the tensors, each memory region once (tied weights, repeated views);
    views into the store's flat buffers count their own bytes, not the whole buffer."""
    seen = {}
    for t in tensors:
        seen[(t.untyped_storage()._cdata, t.storage_offset(), t.nbytes)] = t.nbytes
    return sum(seen.values())


def measure(cfg: Config, output_dir) -> dict:
    """Real steps at the estimate's batch shape: one fpft step, and one full HiFT cycle
    after a warm-up cycle (which creates every group's optimizer state)."""
    settings = Settings.of(cfg)
    results = {}
    for name, strategy in (("fpft", "fpft"), ("hift", cfg.hift.strategy)):
        run_cfg = dataclasses.replace(
            cfg, hift=dataclasses.replace(cfg.hift, strategy=strategy),
            trainer=dataclasses.replace(cfg.trainer, save_model=False))
        trainer = HiftTrainer(run_cfg, f"{output_dir}/measure-{name}")
        trainer.setup()
        batches = fixed_shape_batches(settings.batch_size, settings.seq_len,
                                      trainer.model.config.vocab_size)
        k = len(trainer.groups)
        if name == "hift":
            trainer.train(k, evaluate=False, batches=batches)
        probe = Probe(trainer)
        trainer.train(k, evaluate=False, batches=batches)
        probe.close()
        rows = probe.rows
        column = {c: max(r[c] for r in rows) for c in CATEGORIES}
        peak = max(rows, key=lambda r: r["total"])
        column["total"] = peak["total"]
        if "cuda_peak_allocated" in peak:
            column["cuda_peak_allocated"] = max(r["cuda_peak_allocated"] for r in rows)
        results[name] = column
        results[f"{name}_peak_group"] = peak["group"]
        del trainer, probe
    return results
