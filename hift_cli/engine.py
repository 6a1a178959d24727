"""The hierarchical training engine.

One step trains one group of units; the others are frozen. :meth:`HiftTrainer.train`
runs the loop: each step's micro-batches (the :class:`~hift_cli.update.Window`), the
update, the metrics row, evaluations, checkpoints and stops. The update is a rule
(``hift_cli/update.py``): :class:`~hift_cli.update.HiftUpdate` is HiFT's, top to bottom
(pick the group -> activate it -> forward/backward -> prefetch the next group's state ->
clip -> optimizer step -> at a cycle's end, the LR step). The resumable state is
:meth:`~HiftTrainer.state_dict`; ``checkpoint.py`` only writes and reads it.

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

import collections
import contextlib
import copy
import dataclasses
import logging
import os
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
from hift_cli.checkpoint import (CheckpointError, load_checkpoint, require_space, rng_state,
                                 set_rng_state)
from hift_cli.config import Config, ConfigError
from hift_cli.errors import TrainingStopped
from hift_cli.evaluate import build_evaluator
from hift_cli.grouping import (Group, GroupSchedule, block_stack, find_units, plan_units,
                               row_gradients)
from hift_cli.loss import ChunkedLoss, chunk_tokens, chunkable
from hift_cli.memory import build_groups, estimate
from hift_cli.models import (
    enable_checkpointing,
    load_model,
    load_tokenizer,
    pick_device,
    resolve,
)
from hift_cli.offload import (Delays, GroupStateStore, TransferStats, offload_enabled,
                              state_shapes)
from hift_cli.progress import RunLog
from hift_cli.runplan import RunPlan
from hift_cli.saving import Saver, tied_names
from hift_cli.update import HiftUpdate, Masters, StepResult, Update, Window

log = logging.getLogger(__name__)


class HiftTrainer:
    """A HiFT training run. :meth:`setup` assembles its parts, in this order:

    - ``tokenizer``, ``train_set``, ``evaluator`` and the batch stream (``batches``,
      ``batches_consumed``; data.py, evaluate.py);
    - ``model``, with ``masters`` (update.py: the fp32 masters of bf16-mixed) and ``loss``
      (loss.py: the chunked loss);
    - ``units``, ``always`` (always-active units), ``groups`` and ``schedule`` (grouping.py,
      memory.py for k=auto: which group trains at which step);
    - ``plan`` (runplan.py: the steps from epochs, the cycles, what is due after a step);
    - ``optimizer``, ``store`` (offload.py: inactive groups' state off the device) and
      ``scheduler`` (the delayed LR update);
    - ``update`` (update.py: HiFT's step) and ``saver`` (saving.py: checkpoints, model/).

    :meth:`train` runs the loop, :meth:`save` writes the model; :meth:`state_dict` /
    :meth:`load_state_dict` (or :meth:`checkpoint` / :meth:`resume`) carry a run across
    processes."""

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
        # Hooks called at the end of each step, after the group's write-back is queued.
        self.after_step: list = []
        # Race amplifiers for the state store (offload.Delays; the GPU check's races
        # stage), set before setup().
        self.store_delays: Delays | None = None
        # An out-of-memory stop names the estimated peak (an estimate: seconds for a 7B
        # model); False leaves it out (the GPU check, which records the OOM itself).
        self.explain_out_of_memory = True
        self.store: GroupStateStore | None = None  # setup() makes it after the groups

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        # Our own progress display replaces the libraries' tqdm bars.
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        self.dist = distributed.current()
        # trainer.shard_weights under torchrun: FSDP2 (one process: nothing to shard).
        self.sharded = cfg.trainer.shard_weights and self.dist.enabled
        if cfg.trainer.shard_weights and not self.dist.enabled:
            log.info("trainer.shard_weights=true is ignored: one process, nothing to shard")
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
            if not self.sharded:  # sharded: every rank has its part of rank 0's already
                distributed.broadcast_parameters(self.model)
            torch.manual_seed(cfg.trainer.seed + self.dist.rank)  # own dropout masks
        self._setup_groups()
        self.plan = self._setup_plan()
        self._setup_optimizer()
        self.store = self._setup_store()
        self.scheduler = self._setup_scheduler()
        # HiFT's update rule (train(update=...) takes another: the benchmark's peers).
        self.update = HiftUpdate(self)
        # Checkpoints and model/ (trainer.save_every, save_model, a stop signal).
        self.saver = Saver(self.output_dir, self.model, self.tokenizer, self.state_dict,
                           lambda: self.global_step, cfg.trainer, self.dist, self.sharded)

    def _setup_model(self) -> None:
        cfg = self.cfg.model
        if self.labels.names:
            cfg = dataclasses.replace(cfg, num_labels=len(self.labels.names))
        mixed = self.cfg.trainer.precision == "bf16-mixed"
        # bf16-mixed: load fp32 weights, keep them as the fp32 masters the optimizer
        # updates, and train a bf16 copy (no precision lost to a bf16 round trip).
        load_cfg = dataclasses.replace(cfg, dtype="float32") if mixed else cfg
        # Sharded: rank 0 alone reads the weights; the others build the model empty.
        self.model = load_model(load_cfg, self.model_path, self.tokenizer.pad_token_id,
                                empty=self.sharded and not self.dist.main)
        if self.labels.names:  # saved with the model, so its predictions have names
            self.model.config.id2label = dict(enumerate(self.labels.names))
            self.model.config.label2id = {n: i for i, n in enumerate(self.labels.names)}
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        if self.sharded:
            self._shard()
        self.masters = Masters(self.model, mixed)
        if mixed:
            names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
            self.model.to(torch.bfloat16)  # new bf16 storage; masters keep the fp32 one
            self.masters.rekey(names, self.model)
        self.model.to(self.device)
        self.model.train()
        n = sum(p.numel() for p in self.model.parameters())
        log.info(f"Model: {type(self.model).__name__}, {n / 1e6:.1f}M parameters on {self.device}")
        self.loss = self._chunked_loss()
        self.evaluator.loss_context = self.chunked

    def _chunked_loss(self) -> ChunkedLoss | None:
        """model.loss_chunk_tokens: the causal-LM loss a chunk of tokens at a time, for the
        models whose loss allows it."""
        chunk = chunk_tokens(self.cfg.model.loss_chunk_tokens, self.model.config.vocab_size) \
            if self.cfg.model.task == "causal_lm" else None
        if chunk is None:
            return None
        if not chunkable(self.model):
            log.info("model.loss_chunk_tokens: this model changes its logits before the loss;"
                     " it keeps its own loss")
            return None
        return ChunkedLoss(self.model, chunk)

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
        self.evaluator.should_stop = lambda: self.stop_signal is not None  # Ctrl-C
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

    def _setup_groups(self) -> None:
        hcfg = self.cfg.hift
        units = find_units(self.model)  # sharded: a forward pass on every rank
        if self.sharded:
            distributed.reshard(self.model)
            params = dict(self.model.named_parameters(remove_duplicate=False))
            for unit in units:  # the root's units were found gathered
                unit.params = {n: params[n] for n in unit.params}
        # hift.always_active: trained at every step besides the active group, in no group.
        # fpft already trains every unit at every step: the setting is ignored there.
        # Units over hift.max_unit_params: cut into sub-units of matrix rows.
        self.always, rest = plan_units(units, hcfg, self.sharded)
        self.units = [*self.always, *rest]
        # Sub-units' parameters whose gradient the model can give for their rows only
        # (embeddings: sparse; the chunked loss's head). Data parallel all-reduces dense ones.
        self.row_grads = ({} if self.dist.enabled else row_gradients(
            self.model, self.loss.head if self.loss is not None else None))
        # hift.k=auto: the fewest balanced groups that fit hift.memory_budget (memory.py).
        self.groups: list[Group] = build_groups(self.estimate_config(), rest)
        self.schedule = GroupSchedule(hcfg.strategy, len(self.groups), self.cfg.trainer.seed,
                                      1 if hcfg.strategy == "fpft" else hcfg.steps_per_group)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.always_params = [p for u in self.always for p in u.params.values()]
        self.always_pieces = [piece for u in self.always for piece in u.pieces]
        self.always_numel = sum(u.numel for u in self.always)  # trained at every step
        for p in self.always_params:
            p.requires_grad_(True)  # for the whole run
        # Data parallel: only the active group's (and always-active units') gradients
        # cross the wire (sharded: FSDP reduce-scatters them instead).
        self.grad_sync = (distributed.GradSync() if self.dist.enabled and not self.sharded
                          else None)
        per = self.schedule.steps_per_group
        log.info(f"HiFT: {len(self.units)} units in {len(self.groups)} groups, strategy "
                 f"{hcfg.strategy}" + (f", {per} steps per group" if per > 1 else "") + ": "
                 + ", ".join(
                     f"{g.name} ({g.numel / 1e6:.2f}M)" for g in self.groups)
                 + "".join(f"; always active: {u.name} ({u.numel / 1e6:.2f}M)"
                           for u in self.always))
        if hcfg.always_active and hcfg.strategy == "fpft":
            log.info("hift.always_active is ignored: fpft trains every unit at every step")

    def _shard(self) -> None:
        """FSDP2 over the processes, each rank's shards sent by rank 0
        (:func:`distributed.shard_model`)."""
        distributed.shard_model(self.model, block_stack(self.model)[1], self.device)
        local = sum(distributed.local(p).numel() for p in self.model.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        log.info(f"Sharded weights (FSDP2): {local / 1e6:.2f}M of {total / 1e6:.2f}M"
                 f" parameters on this rank ({self.dist.world} processes)")

    def estimate_config(self) -> Config:
        """The config ``memory.estimate`` (and k=auto's grouping) should see for this run:
        its device as resolved, its offload decision (once the store is set up) and, with
        sharded weights, the per-GPU arithmetic for this many processes."""
        cfg = self.cfg
        # trainer.device=auto resolved: the estimate's offload rule and reserve read it.
        if self.device.type == "cpu":
            # A copy, not dataclasses.replace: that would validate (and log) again.
            trainer = copy.copy(cfg.trainer)
            trainer.device = "cpu"
            cfg = dataclasses.replace(cfg, trainer=trainer)
        if self.store is not None:
            cfg = dataclasses.replace(cfg, hift=dataclasses.replace(
                cfg.hift, offload=self.store.enabled))
        if self.sharded:
            cfg = dataclasses.replace(cfg, memprofile=dataclasses.replace(
                cfg.memprofile, world_size=self.dist.world, measure=False))
        return cfg

    def _setup_plan(self) -> RunPlan:
        """The run plan: the steps (``trainer.epochs`` in whole cycles), the epochs'
        length, the LR schedule's cycles, said in the log."""
        tcfg = self.cfg.trainer
        plan = RunPlan.of(tcfg, len(self.train_set), self.dist.world, self.schedule.cycle_steps)
        if tcfg.epochs is not None:
            steps, k = plan.steps_from_epochs, plan.cycle_steps
            log.info(f"trainer.epochs={tcfg.epochs}: {tcfg.epochs} x {plan.epoch_batches}"
                     " batches" + (f" / grad_accum {tcfg.grad_accum}" if tcfg.grad_accum > 1
                                   else "") + f" = {steps} steps"
                     + (f", rounded up to {plan.max_steps}" if plan.max_steps != steps else "")
                     + f" ({plan.max_steps // k} cycles of {len(self.groups)} groups"
                     + (f" x {self.schedule.steps_per_group} steps"
                        if self.schedule.steps_per_group > 1 else "") + ")")
        if "epoch" in (tcfg.eval_every, tcfg.save_every):
            log.info(f"Epoch ends ({plan.epoch_batches} batches each): steps"
                     f" {', '.join(str(plan.epoch_end(e)) for e in (1, 2, 3))}, ...")
        return plan

    def _due(self, every) -> bool:
        """Whether the step just taken is on trainer.eval_every / save_every's schedule."""
        return self.plan.due(every, self.global_step, self.batches_consumed)

    @property
    def epoch(self) -> float:
        """Epochs completed (batches consumed / batches per epoch): for metrics rows."""
        return self.plan.epoch(self.batches_consumed)

    def _setup_optimizer(self) -> None:
        ocfg = dict(self.cfg.optimizer)
        # What the optimizer updates, per group: fp32 masters in bf16-mixed, else the
        # model's own parameters.
        self.opt_params = [self.masters.of(g.pieces) for g in self.groups]
        # Always-active units: updated every step; their state and masters stay on the
        # device (the store moves only the groups').
        self.always_opt = self.masters.of(self.always_pieces)
        self.masters.settle({id(piece.param) for g in self.groups for piece in g.pieces
                             if piece.whole} | {id(p) for p in self.always_params})
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

    def _setup_store(self) -> GroupStateStore:
        """Inactive groups' optimizer state (and masters) in host memory, if enabled."""
        enabled, why = offload_enabled(self.cfg, self.device.type, len(self.groups))
        # fp32 masters start in host memory (the store moves them) or on the device.
        store = GroupStateStore(self.optimizer, self.opt_params, self.device, enabled,
                                masters=bool(self.masters), factory=self.optimizer_factory,
                                pairs=self.schedule.pairs(), delays=self.store_delays)
        if self.masters and not self.sharded:  # sharded ones are made on the device
            on_device = self.always_opt + ([] if enabled else
                                           [m for params in self.opt_params for m in params])
            for m in on_device:
                m.data = m.data.to(self.device)
        log.info(f"Optimizer state offload: {'on' if enabled else f'off ({why})'}"
                 + (" (fp32 masters too)" if self.masters and enabled else ""))
        return store

    def _setup_scheduler(self):
        """The LR schedule, sized in cycles (delayed LR update)."""
        tcfg, plan = self.cfg.trainer, self.plan
        if tcfg.warmup_ratio is not None:
            log.info(f"trainer.warmup_ratio={tcfg.warmup_ratio}: {plan.warmup_cycles} of"
                     f" {plan.num_cycles} cycles")
        return get_scheduler(
            tcfg.lr_scheduler, self.optimizer,
            num_warmup_steps=plan.warmup_cycles, num_training_steps=plan.num_cycles)

    # ------------------------------------------------------------------ train
    def train(self, num_steps: int | None = None, *, eval_before: bool | None = None,
              evaluate: bool = True, batches=None, update: Update | None = None
              ) -> dict[str, float]:
        """Train from the current step; returns the final metrics.

        Args:
            num_steps: steps to take (default: up to the run plan's ``max_steps``). A
                later call goes on where this one stopped; the LR schedule is the one set
                up for the plan's steps.
            eval_before: evaluate before the first step (default ``trainer.eval_before``).
            evaluate: False skips every evaluation, before, during and after (measuring).
            batches: micro-batches (dicts of CPU tensors) to train on from now on instead
                of the data set's, e.g. fixed shapes for a memory measurement.
            update: the update rule (default :attr:`update`, HiFT's); another (the
                benchmark's peers) runs through the same loop and saves no checkpoints.

        Stops with one line (:class:`TrainingStopped`) on SIGINT/SIGTERM (after a
        checkpoint), on ``trainer.max_bad_steps`` non-finite steps in a row, and when
        device or host memory runs out (no checkpoint then: the last one stays as it was).
        """
        tcfg = self.cfg.trainer
        stop = self.plan.max_steps if num_steps is None else self.global_step + num_steps
        rule = self.update if update is None else update
        own = rule is self.update  # only HiFT's own state goes into checkpoints
        if not own and (tcfg.save_every or tcfg.save_model):
            raise ConfigError(f"{type(rule).__name__} has no resumable state: train it with"
                              " trainer.save_model=false trainer.save_every=null")
        if batches is not None:
            self.batches = iter(batches)
        evaluate = evaluate and len(self.eval_set) > 0
        eval_before = evaluate and (tcfg.eval_before if eval_before is None else eval_before)
        first, summary, totals = self.global_step, {}, collections.Counter()
        if self.dist.main and (tcfg.save_model or tcfg.save_every):
            # Stop before training, not after it, if not even one checkpoint would fit.
            model_only = not tcfg.save_every and not tcfg.save_final_state
            require_space(self.output_dir, self.saver.weight_bytes() if model_only
                          else self.checkpoint_bytes(),
                          "the model" if model_only else "a checkpoint of this run")
        with self._stop_when_out_of_memory(), RunLog(
                self.output_dir, self.cfg, start_step=first, total_steps=stop,
                enabled=self.dist.main) as out:
            if eval_before:
                before, samples = self._evaluate(out, "before")
                summary.update({**{f"{k}_before": v for k, v in before.items()}, **samples})
            train_start = time.perf_counter()
            for step in range(first, stop):
                start = time.perf_counter()
                window = self._window()  # inputs first: before any state transfer
                done = rule.step(step, stop, window)
                row = self._stepped(step, done, window.tokens, time.perf_counter() - start)
                totals.update({k: v for k, v in row.items() if k in SUMMED},
                              tokens=window.tokens, updated=done.updated)
                out.step(row, log_line=self.global_step % tcfg.log_every == 0
                         or self.global_step == stop)
                summary["train/loss"] = done.loss
                if not done.finite:
                    self._note_bad_step(out)
                if self.stop_signal is not None or (
                        self._due(tcfg.save_every) and self.global_step < stop):
                    self._stop_or_checkpoint(own)
                if evaluate and self._due(tcfg.eval_every) and self.global_step < stop:
                    self._evaluate(out, f"step {self.global_step}")
            summary.update(self._totals(totals, rule.finish(),
                                        time.perf_counter() - train_start,
                                        self.global_step - first, out, own))
            summary.update(rule.summary())
            if evaluate:
                after, samples = self._evaluate(out, "after")
                summary.update({**after, **samples})
        return summary

    def _stop_or_checkpoint(self, own: bool) -> None:
        """A checkpoint (``trainer.save_every``, or a signal: then stop). ``own``: HiFT's
        rule, whose state a checkpoint holds; another rule stops without one."""
        path = self.checkpoint() if own else None
        if self.stop_signal is None:
            return
        name, code = signal.Signals(self.stop_signal).name, 128 + self.stop_signal
        if not own:
            raise TrainingStopped(f"interrupted by {name} at step {self.global_step}; no"
                                  " checkpoint: this update rule has no resumable state", code)
        raise TrainingStopped(f"interrupted by {name} at step {self.global_step}; checkpoint"
                              f" saved to {path}. Resume with the same command plus"
                              f" resume={self.output_dir}", code)

    def _window(self) -> Window:
        """The step's ``grad_accum`` micro-batches on the device, each weighted by its
        share of the global batch's loss items (one all-reduce of the counts)."""
        micro = [self._next_batch() for _ in range(self.cfg.trainer.grad_accum)]
        counts = distributed.all_reduce_(torch.tensor(
            [sum(m[1] for m in micro), sum(m[2] for m in micro)], dtype=torch.float64))
        total_items = max(float(counts[0]), 1.0)
        return Window([m[0] for m in micro], [m[1] / total_items for m in micro],
                      int(counts[1]))

    def _stepped(self, step: int, done: StepResult, tokens: int, seconds: float) -> dict:
        """Step ``step`` is done: the counters, the ``after_step`` hooks, a stop signal
        agreed on by every rank; returns the step's metrics row."""
        self.global_step = step + 1
        if done.finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
        for hook in self.after_step:
            hook(self, done.group)
        self._agree_on_stop()
        return self._row(done, tokens, seconds, self.schedule.cycle_of(step))

    def _row(self, done: StepResult, tokens: int, seconds: float, cycle: int) -> dict:
        """The step's metrics row (metrics.jsonl, trackers, progress)."""
        row = {"step": self.global_step, "epoch": self.epoch, "cycle": cycle,
               **({"group": done.group.index} if done.group is not None else {}),
               "train/loss": done.loss, "lr": done.lr,
               "tokens_per_second": tokens / seconds,
               "step_seconds": seconds, "train/skipped": int(not done.finite),
               "offload/stall_seconds": done.moved.stall_seconds,
               "offload/h2d_bytes": done.moved.h2d_bytes,
               "offload/d2h_bytes": done.moved.d2h_bytes}
        if self.dist.enabled:
            row[self._sync_key] = done.synced
        return row

    def _agree_on_stop(self) -> None:
        """Data parallel: a signal seen by any rank stops every rank after this same step."""
        if self.dist.enabled:
            flag = distributed.all_reduce_(torch.tensor(
                [self.stop_signal or 0], dtype=torch.int64), distributed.dist.ReduceOp.MAX)
            self.stop_signal = self.stop_signal or int(flag[0]) or None

    def _note_bad_step(self, out: RunLog) -> None:
        max_bad = self.cfg.trainer.max_bad_steps
        out.note(f"step {self.global_step}: non-finite loss or gradient;"
                 f" update skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= max_bad:
            raise TrainingStopped(
                f"stopping: {self.bad_steps} steps in a row with a non-finite loss"
                f" or gradient (trainer.max_bad_steps={max_bad}) at step"
                f" {self.global_step}; lower optimizer.lr or check the data", 1)

    def _totals(self, totals: collections.Counter, last: TransferStats, elapsed: float,
                steps: int, out: RunLog, own: bool) -> dict[str, float]:
        """The run's summary of its steps (``last``: transfers in no step's row, e.g. the
        last step's write-back) and the transfer notes at its end."""
        totals.update({"offload/d2h_bytes": last.d2h_bytes, "offload/h2d_bytes": last.h2d_bytes,
                       "offload/stall_seconds": last.stall_seconds})
        moved = {k: totals[k] for k in SUMMED if not k.startswith("dist/")
                 or (self.dist.enabled and k == self._sync_key)}
        moved["offload/stall_seconds"] = float(moved["offload/stall_seconds"])
        summary = {"train/skipped_steps": self.skipped_steps,
                   "train/params_updated_per_step": totals["updated"] / max(steps, 1),
                   "tokens_per_second": totals["tokens"] / max(elapsed, 1e-9),
                   "train/seconds": elapsed, **moved,
                   "offload/stall_fraction": moved["offload/stall_seconds"] / max(elapsed, 1e-9)}
        if own and self.store.enabled:
            out.note(
                f"offload: waited {moved['offload/stall_seconds']:.2f} s for state"
                f" ({100 * summary['offload/stall_fraction']:.1f}% of training), moved"
                f" {moved['offload/h2d_bytes'] / 2**30:.2f} GiB to and"
                f" {moved['offload/d2h_bytes'] / 2**30:.2f} GiB from the device")
        if self.dist.enabled:
            mib = moved[self._sync_key] / 2**20
            full = sum(p.numel() * p.element_size() for p in self.model.parameters())
            out.note(("sharded weights: reduce-scattered" if self.sharded
                      else "data parallel: all-reduced") + f" {mib:.1f} MiB of gradients,"
                     f" {mib / max(steps, 1):.2f} MiB per step (all parameters' gradients:"
                     f" {full / 2**20:.2f} MiB)")
        return summary

    @property
    def _sync_key(self) -> str:
        """The metrics key of the gradient bytes that crossed the wire in a step."""
        return "dist/reduce_scatter_bytes" if self.sharded else "dist/allreduce_bytes"

    def chunked(self) -> contextlib.AbstractContextManager:
        """Where ``model(**batch).loss`` is computed chunk by chunk (model.loss_chunk_tokens)."""
        return self.loss.active() if self.loss is not None else contextlib.nullcontext()

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.model, self.cfg.trainer.eval_batch_size)

    def _evaluate(self, out: RunLog, when: str) -> tuple[dict[str, float], dict]:
        """Evaluate, record the row and say it (``when``: before, after, step N); before
        and after training also show (rank 0) and return what the model says on the
        first few eval records."""
        metrics = self.evaluate()
        out.record({"step": self.global_step, "epoch": 0.0 if when == "before" else self.epoch,
                    **metrics})
        if when not in ("before", "after"):
            out.note(f"{when}: eval {_describe(metrics)}")
            return metrics, {}
        out.note(f"eval {when} training: {_describe(metrics)}")
        if self.dist.main:
            return metrics, self.evaluator.show_samples(self.model, when, out.note)
        if self.sharded:  # every rank must run the same forward passes (all-gathers)
            self.evaluator.samples(self.model)
        return metrics, {}

    @contextlib.contextmanager
    def _stop_when_out_of_memory(self):
        """Running out of device or host memory: one line with the estimated peak and
        what to change, instead of a traceback."""
        try:
            yield
        except (torch.OutOfMemoryError, MemoryError) as e:
            kind = "device" if isinstance(e, torch.OutOfMemoryError) else "host"
            e.__traceback__ = None  # it holds the step's frames, and so their tensors
        else:
            return
        need, capacity = self._memory_need_and_capacity(kind)
        fewer = ("train with HiFT (hift.strategy=bottom2up hift.k=auto)"
                 if self.cfg.hift.strategy == "fpft"
                 else "use fewer units per group (a larger hift.k or smaller hift.m)")
        group = self.groups[self.schedule.group_at(self.global_step)]  # the failed step's
        raise TrainingStopped(
            f"out of {kind} memory at step {self.global_step + 1} (group"
            f" {group.name}): estimated peak {need} for this"
            f" configuration, {capacity / 2**30:.1f} GiB on {self.device}; {fewer},"
            " model.gradient_checkpointing=true, an 8-bit optimizer (optimizer=adamw8bit), or"
            " a smaller trainer.batch_size or data.max_length", 1, out_of_memory=kind)

    def _memory_need_and_capacity(self, kind: str) -> tuple[str, int]:
        """The estimated peak of this configuration, and the bytes of what ran out."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            if not self.explain_out_of_memory:
                raise LookupError("not asked for")
            report = estimate(self.estimate_config())
            column = "fpft" if self.cfg.hift.strategy == "fpft" else "hift"
            need = f"{report[column]['total'] / 2**30:.1f} GiB"
        except Exception:  # the estimate is a courtesy here; the stop message is not
            need = "unknown"
        if kind == "device" and self.device.type == "cuda":
            capacity = torch.cuda.get_device_properties(self.device).total_memory
        else:
            capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return need, capacity

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a resumed run needs besides the weights: the counters, every RNG and the
        update's state (:meth:`HiftUpdate.state_dict`: every group's optimizer state and
        fp32 masters, the scheduler). Tensors are the live ones: save them before training
        on. Collective under torchrun: each rank's RNG state goes into it."""
        rngs = distributed.gather_objects(rng_state()) if self.dist.enabled else []
        return {"global_step": self.global_step, "batches_consumed": self.batches_consumed,
                "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps,
                **self.update.state_dict(), "rng": rng_state(), "rng_ranks": rngs}

    def load_state_dict(self, state: dict, source: str = "the state") -> None:
        """Restore :meth:`state_dict` (and the weights, under ``"model"``, if given) into
        a set-up trainer.

        Raises:
            CheckpointError: the weights are another model's or sharded otherwise, or the
                optimizer state was saved under other settings (``source`` names it).
        """
        saved_over = state.get("sharded_over", 1)
        if saved_over != (self.dist.world if self.sharded else 1):
            how = (f"by {saved_over} processes sharding the weights" if saved_over > 1
                   else "with unsharded weights")
            raise CheckpointError(f"{source} was saved {how}: resume with the same"
                                  " trainer.shard_weights and number of processes")
        if "model" in state and self.sharded:
            distributed.reshard(self.model)  # write into the shards, not into a gathered root
            self._load_local_weights(state["model"], source)
        elif "model" in state:
            missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
            # Tied weights are saved once; anything else missing is a different model.
            if unexpected or set(missing) - tied_names(self.model):
                raise CheckpointError(f"{source} does not match this model (missing"
                                      f" {sorted(missing)[:3]}, unexpected {unexpected[:3]})")
        self.update.load_state_dict(state, source)  # optimizer state, masters, schedule
        for key in ("global_step", "batches_consumed", "bad_steps", "skipped_steps"):
            setattr(self, key, state[key])
        self.restart_batches()
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[self.dist.rank] if len(ranks) == self.dist.world else state["rng"])

    def _load_local_weights(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Sharded: this rank's part of every weight, as :meth:`checkpoint` saved it."""
        params = dict(self.model.named_parameters())
        if params.keys() != weights.keys():
            raise CheckpointError(f"{source} does not match this model (its shards hold"
                                  f" {len(weights)} weights, the model has {len(params)})")
        with torch.no_grad():
            for name, p in params.items():
                distributed.local(p).copy_(weights[name])

    # ------------------------------------------------------------------ save
    def checkpoint(self, keep_last: int | None = None) -> Path:
        """A resumable checkpoint of this step (:meth:`Saver.checkpoint`)."""
        return self.saver.checkpoint(keep_last)

    def save(self) -> Path | None:
        """The last checkpoint and ``model/`` (:meth:`Saver.save`)."""
        return self.saver.save()

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint of this run takes on disk: the weights, the fp32
        masters and every group's optimizer state (its layout learnt as the offload store
        learns it, by stepping a fresh optimizer on meta tensors of each shape)."""
        shapes: dict = {}
        total = self.saver.weight_bytes() + sum(m.numel() * 4 for m in self.update.all_masters())
        for p in [p for ps in self.opt_params for p in ps] + self.always_opt:
            key = (tuple(distributed.local(p).shape), p.dtype)
            if key not in shapes:
                try:
                    shapes[key] = state_shapes(self.optimizer_factory, *key)
                except RuntimeError:  # no telling in advance: the weights' size again
                    shapes[key] = {"guess": (torch.Size(key[0]), key[1])}
            total += sum(s.numel() * dt.itemsize for s, dt in shapes[key].values())
        return total

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: weights, state, counters, RNG."""
        self.load_state_dict(load_checkpoint(path, self.device, self.dist.rank, self.dist.world),
                             source=f"checkpoint {path}")


def _describe(metrics: dict[str, float]) -> str:
    shown = {"loss": "loss", "perplexity": "perplexity", "accuracy": "accuracy",
             "macro_f1": "macro-F1", "exact_match": "exact match",
             "answer_format": "answers in #### format"}
    return ", ".join(f"{label} {metrics['eval/' + key]:.4f}" for key, label in shown.items()
                     if "eval/" + key in metrics)


# Per-step transfer counters the summary adds up.
SUMMED = ("offload/stall_seconds", "offload/h2d_bytes", "offload/d2h_bytes",
          "dist/allreduce_bytes", "dist/reduce_scatter_bytes")
