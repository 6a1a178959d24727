"""The hierarchical training engine.

One step trains one group of units; the others are frozen. The loop below reads top to
bottom as: pick group -> activate it -> fetch inputs, then prefetch state (this group's if
it is not on the device yet, the next group's) -> forward/backward (grad_accum
micro-batches) -> wait for this group's state -> clip -> optimizer step -> write its state
back -> (end of cycle: LR step) -> log -> checkpoint -> eval.

Why it is cheap:
  * Only the active group has ``requires_grad``, so autograd records nothing below it:
    lower layers keep no activations and backward stops at the group.
  * One optimizer holds every parameter, but inactive parameters have ``grad=None`` and
    ``torch.optim`` skips them: their state (momentum, per-parameter step count for bias
    correction) waits untouched until their group's next turn.
  * The LR schedule advances once per cycle (delayed LR update), so every group sees the
    same LR within a cycle and the schedule is sized in cycles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import datasets
import torch
import transformers
from hydra.utils import instantiate
from transformers import get_scheduler, set_seed

from hift_cli import data as data_lib
from hift_cli import distributed
from hift_cli.checkpoint import (
    MARKER,
    STATE_FILE,
    CheckpointError,
    rng_state,
    save_checkpoint,
)
from hift_cli.config import Config, ConfigError
from hift_cli.evaluate import build_evaluator
from hift_cli.grouping import Group, GroupSchedule, find_units, split_always_active
from hift_cli.memory import build_groups, estimate
from hift_cli.models import (
    autocast,
    enable_checkpointing,
    load_model,
    load_tokenizer,
    pick_device,
    resolve,
)
from hift_cli.offload import GroupStateStore, offload_enabled
from hift_cli.progress import TrainProgress
from hift_cli.trackers import Trackers

log = logging.getLogger(__name__)


class HiftTrainer:
    """Set up with :meth:`setup`, run with :meth:`train`, write with :meth:`save`."""

    def __init__(self, cfg: Config, output_dir: str | Path):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.global_step = 0
        self.batches_consumed = 0  # with the seed, this fixes the data order on resume
        self.bad_steps = 0  # non-finite steps in a row
        self.skipped_steps = 0
        self.stop_signal: int | None = None  # SIGINT/SIGTERM seen: stop after this step
        # Called as hook(trainer, group) right after each optimizer step, while the
        # group's gradients and optimizer state are on the device (memory probes).
        self.after_update: list = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        # Our own progress display replaces the libraries' tqdm bars.
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        self.dist = distributed.current()
        set_seed(cfg.trainer.seed)  # the same on every rank: same init, same group order
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        self.device = pick_device(cfg.trainer.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if self.dist.enabled:
            t = cfg.trainer
            log.info(f"Data parallel: {self.dist.world} processes"
                     f" ({distributed.dist.get_backend()}); global batch"
                     f" {t.batch_size * t.grad_accum * self.dist.world} = {t.batch_size} x"
                     f" {t.grad_accum} micro-batches x {self.dist.world} processes")
        self.model_path = resolve(cfg.model.name_or_path)
        self.tokenizer = load_tokenizer(self.model_path, cfg.model.trust_remote_code)
        self._setup_data()  # before the model: classification data sets num_labels
        self._setup_model()
        if self.dist.enabled:
            distributed.broadcast_parameters(self.model)
            torch.manual_seed(cfg.trainer.seed + self.dist.rank)  # own dropout masks
        self._setup_groups()
        self._resolve_steps()
        self._setup_optimizer()
        self._setup_store()
        self._setup_scheduler()

    def _setup_model(self) -> None:
        cfg = self.cfg.model
        if self.labels.names:
            cfg = dataclasses.replace(cfg, num_labels=len(self.labels.names))
        mixed = self.cfg.trainer.precision == "bf16-mixed"
        # bf16-mixed: load fp32 weights, keep them as the fp32 masters the optimizer
        # updates, and train a bf16 copy (no precision lost to a bf16 round trip).
        load_cfg = dataclasses.replace(cfg, dtype="float32") if mixed else cfg
        self.model = load_model(load_cfg, self.model_path, self.tokenizer.pad_token_id)
        if self.labels.names:  # saved with the model, so its predictions have names
            self.model.config.id2label = dict(enumerate(self.labels.names))
            self.model.config.label2id = {n: i for i, n in enumerate(self.labels.names)}
        self.masters: dict[int, torch.nn.Parameter] = {}
        if mixed:
            self.masters = {id(p): torch.nn.Parameter(p.data, requires_grad=False)
                            for p in self.model.parameters()}
            self.model.to(torch.bfloat16)  # new bf16 storage; masters keep the fp32 one
        self.model.to(self.device)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.train()
        n = sum(p.numel() for p in self.model.parameters())
        log.info(f"Model: {type(self.model).__name__}, {n / 1e6:.1f}M parameters on {self.device}")

    def _setup_data(self) -> None:
        cfg = self.cfg.data
        splits = data_lib.load_splits(cfg)
        classify = cfg.format == "classification"
        self.labels = (data_lib.label_map(splits.train, cfg, splits.eval) if classify
                       else data_lib.Labels())
        self.train_set = data_lib.tokenize(splits.train, self.tokenizer, cfg, cfg.max_samples,
                                           "train", self.labels)
        self.evaluator = build_evaluator(self.cfg, self.tokenizer, splits, self.labels,
                                         self.device)
        self.pad_id = self.tokenizer.pad_token_id
        self.restart_batches()
        log.info(f"Data ({cfg.format}): {len(self.train_set)} train / {len(self.eval_set)}"
                 f" eval samples from {cfg.path}"
                 + (f"; labels: {', '.join(self.labels.names)}" if self.labels.names else ""))

    def restart_batches(self) -> None:
        """(Re)start the batch stream after ``batches_consumed`` batches."""
        self.batches = data_lib.train_batches(
            self.train_set, self.cfg.trainer.batch_size, self.pad_id, self.cfg.trainer.seed,
            self.cfg.data.group_by_length, start=self.batches_consumed,
            rank=self.dist.rank, world=self.dist.world)

    def _next_batch(self) -> tuple[dict[str, torch.Tensor], int, int]:
        """The next micro-batch on the device, its loss items and its tokens."""
        self.batches_consumed += 1
        batch = next(self.batches)
        labels = batch["labels"]
        # What the model's loss averages over: (shifted) label tokens for a causal LM,
        # samples for classification.
        items = int((labels[:, 1:] != -100).sum()) if labels.dim() > 1 else len(labels)
        tokens = int(batch["attention_mask"].sum())
        if self.device.type == "cuda":  # from pinned memory, so the copy is truly async
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return ({k: v.to(self.device, non_blocking=True) for k, v in batch.items()},
                items, tokens)

    @property
    def eval_set(self):
        return self.evaluator.ds

    @eval_set.setter
    def eval_set(self, ds) -> None:
        self.evaluator.ds = ds

    def _setup_groups(self) -> None:
        hcfg = self.cfg.hift
        self.units = find_units(self.model)
        # hift.always_active: trained at every step besides the active group, in no group.
        # fpft already trains every unit at every step: the setting is ignored there.
        self.always, rest = (split_always_active(self.units, hcfg.always_active)
                             if hcfg.strategy != "fpft" else ([], self.units))
        # hift.k=auto: the fewest balanced groups that fit hift.memory_budget (memory.py).
        self.groups: list[Group] = build_groups(self.cfg, rest, self.device.type)
        self.schedule = GroupSchedule(hcfg.strategy, len(self.groups), self.cfg.trainer.seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.always_params = [p for u in self.always for p in u.params.values()]
        for p in self.always_params:
            p.requires_grad_(True)  # for the whole run
        self.active: Group | None = None
        # Data parallel: only the active group's (and always-active units') gradients
        # cross the wire.
        self.grad_sync = distributed.GradSync() if self.dist.enabled else None
        log.info(f"HiFT: {len(self.units)} units in {len(self.groups)} groups, strategy "
                 f"{hcfg.strategy}: " + ", ".join(
                     f"{g.name} ({g.numel / 1e6:.2f}M)" for g in self.groups)
                 + "".join(f"; always active: {u.name} ({u.numel / 1e6:.2f}M)"
                           for u in self.always))
        if hcfg.always_active and hcfg.strategy == "fpft":
            log.info("hift.always_active is ignored: fpft trains every unit at every step")

    def _resolve_steps(self) -> None:
        """``trainer.epochs`` -> ``trainer.max_steps`` (whole cycles), and epoch lengths."""
        tcfg, k = self.cfg.trainer, len(self.groups)
        # Micro-batches per epoch on each rank; grad_accum of them make a step.
        n, world = len(self.train_set), self.dist.world
        self.epoch_batches = data_lib.batches_per_epoch(n, tcfg.batch_size, world)
        if self.epoch_batches == 0:  # what the first batch would say
            raise ConfigError(f"data: {n} training samples cannot be shared by {world}"
                              " processes")
        if tcfg.epochs is not None:
            steps = math.ceil(tcfg.epochs * self.epoch_batches / tcfg.grad_accum)
            # trainer.epochs stays as given; max_steps is what everything downstream reads.
            tcfg.max_steps = math.ceil(steps / k) * k
            log.info(f"trainer.epochs={tcfg.epochs}: {tcfg.epochs} x {self.epoch_batches}"
                     " batches" + (f" / grad_accum {tcfg.grad_accum}" if tcfg.grad_accum > 1
                                   else "") + f" = {steps} steps"
                     + (f", rounded up to {tcfg.max_steps}" if tcfg.max_steps != steps else "")
                     + f" ({tcfg.max_steps // k} cycles of {k} groups)")
        if "epoch" in (tcfg.eval_every, tcfg.save_every):
            ends = [math.ceil(e * self.epoch_batches / tcfg.grad_accum) for e in (1, 2, 3)]
            log.info(f"Epoch ends ({self.epoch_batches} batches each): steps"
                     f" {', '.join(map(str, ends))}, ...")

    def _due(self, every) -> bool:
        """Whether the step just taken is on trainer.eval_every / save_every's schedule:
        every N steps, or ``epoch``: the step that consumed an epoch's last batch."""
        if every == "epoch":
            b, done = self.epoch_batches, self.batches_consumed
            return done // b > (done - self.cfg.trainer.grad_accum) // b
        return bool(every) and self.global_step % every == 0

    @property
    def epoch(self) -> float:
        """Epochs completed (batches consumed / batches per epoch): for metrics rows."""
        return round(self.batches_consumed / self.epoch_batches, 4)

    def _setup_optimizer(self) -> None:
        ocfg = dict(self.cfg.optimizer)
        # What the optimizer updates, per group: fp32 masters in bf16-mixed, else the
        # model's own parameters.
        self.opt_params = [[self.masters.get(id(p), p) for p in g.params.values()]
                           for g in self.groups]
        # Always-active units: updated every step; their state and masters stay on the
        # device (the store moves only the groups').
        self.always_opt = [self.masters.get(id(p), p) for p in self.always_params]
        decay, no_decay = [], []
        for params in [*self.opt_params, self.always_opt]:
            for p in params:
                # Norm weights and biases are vectors: no weight decay on them.
                (decay if p.ndim >= 2 else no_decay).append(p)
        param_groups = [
            {"params": decay, "weight_decay": ocfg.get("weight_decay", 0.0)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        log.info(f"Instantiating {ocfg['_target_']}")
        # The store also builds throw-away instances to learn the state layout.
        self.optimizer_factory = instantiate({**ocfg, "_partial_": True})
        self.optimizer = self.optimizer_factory(param_groups)

    def _setup_store(self) -> None:
        """Inactive groups' optimizer state (and masters) in host memory, if enabled."""
        enabled, why = offload_enabled(self.cfg.hift.offload, self.device.type,
                                       len(self.groups), str(self.cfg.optimizer["_target_"]))
        # fp32 masters start in host memory (the store moves them) or on the device.
        self.store = GroupStateStore(self.optimizer, self.opt_params, self.device, enabled,
                                     masters=bool(self.masters), factory=self.optimizer_factory)
        if self.masters:
            on_device = self.always_opt + ([] if enabled else
                                           [m for params in self.opt_params for m in params])
            for m in on_device:
                m.data = m.data.to(self.device)
        log.info(f"Optimizer state offload: {'on' if enabled else f'off ({why})'}"
                 + (" (fp32 masters too)" if self.masters and enabled else ""))

    def _setup_scheduler(self) -> None:
        tcfg = self.cfg.trainer
        self.num_cycles = self.schedule.num_cycles(tcfg.max_steps)
        self.scheduler = get_scheduler(
            tcfg.lr_scheduler, self.optimizer,
            num_warmup_steps=tcfg.warmup_cycles, num_training_steps=self.num_cycles)

    # ------------------------------------------------------------------ train
    def _activate(self, group: Group) -> None:
        if self.active is not None:
            for p in self.active.params.values():
                p.requires_grad_(False)
        for p in group.params.values():
            p.requires_grad_(True)
        if self.grad_sync is not None:
            self.grad_sync.attach(list(group.params.values()) + self.always_params)
        self.active = group

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.model, self.cfg.trainer.eval_batch_size)

    def train(self) -> dict[str, float]:
        """Run ``trainer.max_steps`` steps; returns the final metrics.

        Running out of device or host memory stops the run with one line (no checkpoint
        is written then: the last complete one stays as it was).
        """
        try:
            return self._train()
        except (torch.OutOfMemoryError, MemoryError) as e:
            kind = "device" if isinstance(e, torch.OutOfMemoryError) else "host"
            del e  # its traceback holds the step's tensors
        need, capacity = self._memory_need_and_capacity(kind)
        raise TrainingStopped(
            f"out of {kind} memory at step {self.global_step + 1} (group"
            f" {self.active.name if self.active else '-'}): estimated peak {need} for this"
            f" configuration, {capacity / 2**30:.1f} GiB on {self.device}; use fewer units per"
            " group (a larger hift.k or smaller hift.m), model.gradient_checkpointing=true, an"
            " 8-bit optimizer (optimizer=adamw8bit), or a smaller trainer.batch_size or"
            " data.max_length", 1)

    def _memory_need_and_capacity(self, kind: str) -> tuple[str, int]:
        """The estimated peak of this configuration, and the bytes of what ran out."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            report = estimate(dataclasses.replace(self.cfg, hift=dataclasses.replace(
                self.cfg.hift, offload=self.store.enabled)))
            column = "fpft" if self.cfg.hift.strategy == "fpft" else "hift"
            need = f"{report[column]['total'] / 2**30:.1f} GiB"
        except Exception:  # the estimate is a courtesy here; the stop message is not
            need = "unknown"
        if kind == "device" and self.device.type == "cuda":
            capacity = torch.cuda.get_device_properties(self.device).total_memory
        else:
            capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return need, capacity

    def _train(self) -> dict[str, float]:
        tcfg = self.cfg.trainer
        k = len(self.groups)
        main = self.dist.main  # only rank 0 writes files and logs
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.output_dir / "metrics.jsonl"
        summary: dict[str, float] = {}
        with (open(metrics_path, "a") if main else contextlib.nullcontext()) as metrics_file, \
                Trackers(tcfg.loggers, self.output_dir, self.cfg, enabled=main,
                         start_step=self.global_step) as trackers, \
                TrainProgress(tcfg.max_steps, enabled=main) as progress:

            def record(row: dict) -> None:
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                trackers.log(row)  # TensorBoard / W&B / MLflow (trainer.loggers)

            if tcfg.eval_before and len(self.eval_set):
                before = self.evaluate()
                summary.update({f"{k}_before": v for k, v in before.items()})
                record({"step": 0, "epoch": 0.0, **before})
                progress.note(f"eval before training: {_describe(before)}")
                if main:  # what the model says on the first few eval records
                    summary.update(self.evaluator.show_samples(self.model, "before",
                                                               progress.note))

            train_start, total_tokens = time.perf_counter(), 0
            total_moved = {"offload/stall_seconds": 0.0, "offload/h2d_bytes": 0,
                           "offload/d2h_bytes": 0}
            if self.dist.enabled:
                total_moved["dist/allreduce_bytes"] = 0
            first_step = self.global_step
            # Parameters updated per step (the active group's and the always-active ones).
            always_numel, updated = sum(u.numel for u in self.always), 0
            for step in range(first_step, tcfg.max_steps):
                step_start = time.perf_counter()
                cycle = step // k
                group = self.groups[self.schedule.group_at(step)]
                last = step + 1 == tcfg.max_steps
                next_index = None if last else self.schedule.group_at(step + 1)
                if group is not self.active:
                    self._activate(group)

                # Inputs first: their copies must not queue behind a large prefetch.
                window = [self._next_batch() for _ in range(tcfg.grad_accum)]
                # This group's state is normally already on its way (the previous step
                # fetched it; not at the first step of a run or after a resume); the next
                # group's comes in on the side stream while this step computes.
                self.store.prefetch(group.index)
                if next_index is not None:
                    self.store.prefetch(next_index)

                # Forward and backward; the same group stays active for the whole window.
                # Each micro-batch's mean loss is weighted by its share of the window's
                # items (over all ranks): the gradient of the mean over the global batch.
                counts = distributed.all_reduce_(torch.tensor(
                    [sum(w[1] for w in window), sum(w[2] for w in window)], dtype=torch.float64))
                total_items, tokens = max(float(counts[0]), 1.0), int(counts[1])
                loss_sum = torch.zeros((), device=self.device)
                for i, (batch, items, _) in enumerate(window):
                    if self.grad_sync is not None:  # sum across ranks on the last one only
                        self.grad_sync.arm(i == len(window) - 1)
                    with autocast(tcfg.precision, self.device):
                        loss = self.model(**batch).loss * (items / total_items)
                    loss.backward()
                    loss_sum += loss.detach()
                synced = self.grad_sync.finish() if self.grad_sync is not None else 0
                distributed.all_reduce_(loss_sum)  # the global batch's loss, on every rank

                # The group's parameters and the always-active ones, and what updates them.
                trained = [*group.params.values(), *self.always_params]
                params = self.opt_params[group.index] + self.always_opt
                self.store.wait(group.index)  # its state and masters must have arrived
                if self.masters:  # bf16 grads -> fp32 grads on the masters
                    for p, master in zip(trained, params):
                        master.grad, p.grad = (p.grad.float() if p.grad is not None else None,
                                               None)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in params if p.grad is not None],
                    tcfg.max_grad_norm if tcfg.max_grad_norm is not None else float("inf"))
                lr = self.optimizer.param_groups[0]["lr"]
                # A CPU-GPU sync point, needed to decide whether to update at all.
                finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
                if finite:
                    self.optimizer.step()
                    self.bad_steps = 0
                    updated += group.numel + always_numel
                    for hook in self.after_update:
                        hook(self, group)
                    if self.masters:
                        for p, master in zip(trained, params):
                            p.data.copy_(master.data)  # fp32 -> bf16 weights
                else:  # skip the update: weights and optimizer state stay as they were
                    self.bad_steps += 1
                    self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)  # free the group's grads now
                self.store.offload(group.index, keep=next_index == group.index)
                if self.schedule.ends_cycle(step):
                    self.scheduler.step()  # delayed LR update: once per full cycle
                self.global_step = step + 1

                # .item() is a CPU-GPU sync point; one per step is noise next to a step.
                train_loss = loss_sum.item()
                seconds = time.perf_counter() - step_start
                moved = self.store.take_stats()
                total_tokens += tokens
                row = {"step": self.global_step, "epoch": self.epoch, "cycle": cycle,
                       "group": group.index, "train/loss": train_loss, "lr": lr,
                       "tokens_per_second": tokens / seconds,
                       "step_seconds": seconds, "train/skipped": int(not finite),
                       "offload/stall_seconds": moved.stall_seconds,
                       "offload/h2d_bytes": moved.h2d_bytes, "offload/d2h_bytes": moved.d2h_bytes}
                if self.dist.enabled:
                    row["dist/allreduce_bytes"] = synced
                    # A signal seen by any rank stops every rank after this same step.
                    flag = distributed.all_reduce_(torch.tensor(
                        [self.stop_signal or 0], dtype=torch.int64), distributed.dist.ReduceOp.MAX)
                    self.stop_signal = self.stop_signal or int(flag[0]) or None
                for key in total_moved:
                    total_moved[key] += row[key]
                record(row)
                progress.update(row, log_line=self.global_step % tcfg.log_every == 0
                                or self.global_step == tcfg.max_steps)
                summary["train/loss"] = train_loss
                if not finite:
                    progress.note(f"step {self.global_step}: non-finite loss or gradient;"
                                  f" update skipped ({self.bad_steps} in a row)")
                    if self.bad_steps >= tcfg.max_bad_steps:
                        raise TrainingStopped(
                            f"stopping: {self.bad_steps} steps in a row with a non-finite loss"
                            f" or gradient (trainer.max_bad_steps={tcfg.max_bad_steps}) at step"
                            f" {self.global_step}; lower optimizer.lr or check the data", 1)

                if self.stop_signal is not None or (
                        self._due(tcfg.save_every) and self.global_step < tcfg.max_steps):
                    path = self.checkpoint()
                    if self.stop_signal is not None:
                        raise TrainingStopped(
                            f"interrupted by {signal.Signals(self.stop_signal).name} at step"
                            f" {self.global_step}; checkpoint saved to {path}. Resume with the"
                            f" same command plus resume={self.output_dir}",
                            128 + self.stop_signal)

                if self._due(tcfg.eval_every) and self.global_step < tcfg.max_steps \
                        and len(self.eval_set):
                    ev = self.evaluate()
                    record({"step": self.global_step, "epoch": self.epoch, **ev})
                    progress.note(f"step {self.global_step}: eval {_describe(ev)}")

            # The last write-back may still be landing in the buffers the optimizer's
            # state points at: let it finish before anyone reads them.
            self.store.synchronize()
            summary["train/skipped_steps"] = self.skipped_steps
            summary["train/params_updated_per_step"] = updated / max(
                self.global_step - first_step, 1)
            elapsed = time.perf_counter() - train_start
            summary["tokens_per_second"] = total_tokens / max(elapsed, 1e-9)
            summary["train/seconds"] = elapsed
            summary.update(total_moved)
            summary["offload/stall_fraction"] = total_moved["offload/stall_seconds"] / max(
                elapsed, 1e-9)
            if self.store.enabled:
                progress.note(
                    f"offload: waited {total_moved['offload/stall_seconds']:.2f} s for state"
                    f" ({100 * summary['offload/stall_fraction']:.1f}% of training), moved"
                    f" {total_moved['offload/h2d_bytes'] / 2**30:.2f} GiB to and"
                    f" {total_moved['offload/d2h_bytes'] / 2**30:.2f} GiB from the device")
            if self.dist.enabled:
                mib = total_moved["dist/allreduce_bytes"] / 2**20
                full = sum(p.numel() * p.element_size() for p in self.model.parameters())
                progress.note(
                    f"data parallel: all-reduced {mib:.1f} MiB of gradients,"
                    f" {mib / max(self.global_step - first_step, 1):.2f} MiB per step (all"
                    f" parameters' gradients: {full / 2**20:.2f} MiB)")
            if len(self.eval_set):
                after = self.evaluate()
                summary.update(after)
                record({"step": self.global_step, "epoch": self.epoch, **after})
                progress.note(f"eval after training: {_describe(after)}")
                if main:  # the same records as before training
                    summary.update(self.evaluator.show_samples(self.model, "after",
                                                               progress.note))
        return summary

    # ------------------------------------------------------------------ save
    def write_model(self, path: Path) -> None:
        """The model (safetensors) and tokenizer, loadable with plain ``from_pretrained``."""
        self.model.config.use_cache = True  # for whoever generates with it
        try:
            self.model.save_pretrained(path)
        finally:
            self.model.config.use_cache = False
        self.tokenizer.save_pretrained(path)

    def checkpoint(self) -> Path:
        """A resumable checkpoint, written by rank 0 while the others wait."""
        # Each rank's RNG (dropout masks) goes into rank 0's file.
        rngs = distributed.gather_objects(rng_state()) if self.dist.enabled else None
        path = save_checkpoint(self, self.cfg.trainer.keep_last, rngs) if self.dist.main \
            else None
        distributed.barrier()
        return distributed.broadcast_object(path)

    def save(self) -> Path | None:
        """A last resumable checkpoint, and its model as ``<output_dir>/model``."""
        if not self.cfg.trainer.save_model:
            return None
        checkpoint = self.checkpoint()
        if not self.dist.main:
            return self.output_dir / "model"
        path = self.output_dir / "model"
        try:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            for f in checkpoint.iterdir():
                if f.name not in (MARKER, STATE_FILE):
                    try:
                        os.link(f, path / f.name)  # same bytes, no second copy on disk
                    except OSError:
                        shutil.copy2(f, path / f.name)
        except OSError as e:
            raise CheckpointError(f"cannot write the model to {path}: {e.strerror or e}"
                                  ) from None
        return path


class TrainingStopped(SystemExit):
    """Training ended early on purpose (signal, non-finite steps): one line, an exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message


def _describe(metrics: dict[str, float]) -> str:
    shown = {"loss": "loss", "perplexity": "perplexity", "accuracy": "accuracy",
             "macro_f1": "macro-F1", "exact_match": "exact match",
             "answer_format": "answers in #### format"}
    return ", ".join(f"{label} {metrics['eval/' + key]:.4f}" for key, label in shown.items()
                     if "eval/" + key in metrics)
