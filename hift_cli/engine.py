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

import contextlib
import logging
import signal
import time
from pathlib import Path

import datasets
import torch
import transformers
from transformers import set_seed

from hift_cli import distributed
from hift_cli.batches import BatchStream
from hift_cli.build import (build_data, build_grouping, build_loss, build_model,
                            build_optimizer, build_plan, build_scheduler, build_store)
from hift_cli.checkpoint import (CheckpointError, load_checkpoint, require_space, rng_state,
                                 set_rng_state)
from hift_cli.config import Config, ConfigError
from hift_cli.errors import TrainingStopped
from hift_cli.memory import EstimateInput
from hift_cli.meter import StepMeter
from hift_cli.models import load_tokenizer, pick_device, resolve
from hift_cli.offload import Delays, GroupStateStore
from hift_cli.oom import stop_on_out_of_memory
from hift_cli.progress import RunLog
from hift_cli.saving import Saver, load_weights, state_bytes
from hift_cli.update import HiftUpdate, StepResult, Update

log = logging.getLogger(__name__)


class HiftTrainer:
    """A HiFT training run. :meth:`setup` assembles its parts (build.py builds each from
    its config section), in this order:

    - ``tokenizer``; ``train_set``, ``labels``, ``evaluator`` (data.py, evaluate.py) and
      ``stream`` (batches.py: the batches in the seeded order, a step's window);
    - ``model``, with ``masters`` (update.py: the fp32 masters of bf16-mixed) and ``loss``
      (loss.py: the chunked loss);
    - ``units``, ``always`` (always-active units), ``groups`` and ``schedule`` (grouping.py,
      memory/ for k=auto: which group trains at which step);
    - ``plan`` (runplan.py: the steps from epochs, the cycles, what is due after a step);
    - ``optimizer``, ``store`` (offload.py: inactive groups' state off the device) and
      ``scheduler`` (the delayed LR update);
    - ``update`` (update.py: HiFT's step), ``meter`` (meter.py: the steps' rows and
      totals) and ``saver`` (saving.py: checkpoints, model/).

    :meth:`train` runs the loop, :meth:`save` writes the model; :meth:`state_dict` /
    :meth:`load_state_dict` (or :meth:`checkpoint` / :meth:`resume`) carry a run across
    processes."""

    def __init__(self, cfg: Config, output_dir: str | Path):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.global_step = 0
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
        cfg, tcfg = self.cfg, self.cfg.trainer
        # Our own progress display replaces the libraries' tqdm bars.
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        self.dist = dist = distributed.current()
        # trainer.shard_weights under torchrun: FSDP2 (one process: nothing to shard).
        self.sharded = tcfg.shard_weights and dist.enabled
        if tcfg.shard_weights and not dist.enabled:
            log.info("trainer.shard_weights=true is ignored: one process, nothing to shard")
        set_seed(tcfg.seed)  # the same on every rank: same init, same group order
        if tcfg.num_threads:
            torch.set_num_threads(tcfg.num_threads)
        self.device = pick_device(tcfg.device)
        if dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(self.device)
        if dist.enabled:
            log.info(f"Data parallel: {dist.world} processes"
                     f" ({distributed.dist.get_backend()}); global batch"
                     f" {tcfg.batch_size * tcfg.grad_accum * dist.world} = {tcfg.batch_size}"
                     f" x {tcfg.grad_accum} micro-batches x {dist.world} processes")
        self.model_path = resolve(cfg.model.name_or_path)
        self.tokenizer = load_tokenizer(self.model_path, cfg.model.trust_remote_code)
        # The data before the model: classification data sets num_labels.
        data = build_data(cfg, self.tokenizer, self.device)
        self.train_set, self.labels, self.evaluator = data.train_set, data.labels, data.evaluator
        self.evaluator.should_stop = lambda: self.stop_signal is not None  # Ctrl-C
        self.stream = BatchStream(self.train_set, tcfg.batch_size, self.tokenizer.pad_token_id,
                                  tcfg.seed, cfg.data.group_by_length, self.device, dist.rank,
                                  dist.world)
        self.model, self.masters = build_model(cfg, self.model_path, self.tokenizer,
                                               self.labels, self.device, dist, self.sharded)
        self.loss = build_loss(cfg, self.model)
        self.evaluator.loss_context = self.chunked
        if dist.enabled:
            if not self.sharded:  # sharded: every rank has its part of rank 0's already
                distributed.broadcast_parameters(self.model)
            torch.manual_seed(tcfg.seed + dist.rank)  # own dropout masks
        self.setup_groups()
        self.plan = build_plan(tcfg, len(self.train_set), dist.world, self.schedule)
        self.setup_update()
        self.scheduler = build_scheduler(tcfg, self.optimizer, self.plan)
        self.meter = StepMeter(tcfg.max_bad_steps, dist, self.sharded)
        # Checkpoints and model/ (trainer.save_every, save_model, a stop signal).
        self.saver = Saver(self.output_dir, self.model, self.tokenizer, self.state_dict,
                           lambda: self.global_step, tcfg, dist, self.sharded)

    # HiFT's parts over a model, for setup() and for a loop that is not train()'s (the
    # Hugging Face Trainer's: hift_cli/integrations). They need cfg, dist, sharded,
    # device, model, masters and loss.
    def setup_groups(self) -> None:
        """The units, the always-active ones, the groups and their schedule."""
        g = build_grouping(self.cfg, self.model, self.loss, self.dist, self.sharded,
                           self.estimate_input)
        self.units, self.always, self.groups, self.schedule = g.units, g.always, g.groups, \
            g.schedule
        self.row_grads, self.grad_sync = g.row_grads, g.grad_sync
        self.always_params, self.always_pieces = g.always_params, g.always_pieces
        self.always_numel = sum(u.numel for u in self.always)  # trained at every step
        self.grouping = g

    def setup_update(self) -> None:
        """The optimizer, the state store and HiFT's update rule (after setup_groups)."""
        opt = build_optimizer(self.cfg.optimizer, self.grouping, self.masters)
        self.optimizer, self.optimizer_factory = opt.optimizer, opt.factory
        self.opt_params, self.always_opt = opt.group_params, opt.always_params
        self.store = build_store(self.cfg, opt, self.masters, self.schedule, self.device,
                                 self.sharded, self.store_delays)
        # HiFT's update rule (train(update=...) takes another: the benchmark's peers).
        self.update = HiftUpdate(self)

    @property
    def eval_set(self):
        return self.evaluator.ds

    @property
    def batches_consumed(self) -> int:
        """Micro-batches drawn so far on this rank (with the seed: the data order)."""
        return self.stream.consumed

    def estimate_input(self) -> EstimateInput:
        """What ``memory.estimate`` (and k=auto's grouping) should see for this run: its
        device as resolved, its offload decision (once the store is set up) and, with
        sharded weights, the per-GPU arithmetic for this many processes."""
        return EstimateInput.of(
            self.cfg, device_type="cpu" if self.device.type == "cpu" else None,
            **({} if self.store is None else {"offload": self.store.enabled}),
            world_size=self.dist.world if self.sharded else None)

    def _due(self, every) -> bool:
        """Whether the step just taken is on trainer.eval_every / save_every's schedule."""
        return self.plan.due(every, self.global_step, self.stream.consumed)

    @property
    def epoch(self) -> float:
        """Epochs completed (batches consumed / batches per epoch): for metrics rows."""
        return self.plan.epoch(self.stream.consumed)

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
            self.stream.use(batches)
        evaluate = evaluate and len(self.eval_set) > 0
        eval_before = evaluate and (tcfg.eval_before if eval_before is None else eval_before)
        first, summary = self.global_step, {}
        self.meter.start()
        if self.dist.main and (tcfg.save_model or tcfg.save_every):
            # Stop before training, not after it, if not even one checkpoint would fit.
            model_only = not tcfg.save_every and not tcfg.save_final_state
            require_space(self.output_dir, self.saver.weight_bytes() if model_only
                          else self.checkpoint_bytes(),
                          "the model" if model_only else "a checkpoint of this run")
        with stop_on_out_of_memory(self), RunLog(
                self.output_dir, self.cfg, start_step=first, total_steps=stop,
                enabled=self.dist.main) as out:
            if eval_before:
                before, samples = self._evaluate(out, "before")
                summary.update({**{f"{k}_before": v for k, v in before.items()}, **samples})
            train_start = time.perf_counter()
            for step in range(first, stop):
                start = time.perf_counter()
                window = self.stream.window(tcfg.grad_accum)  # before any state transfer
                done = rule.step(step, stop, window)
                row = self._stepped(step, done, window.tokens, time.perf_counter() - start)
                out.step(row, log_line=self.global_step % tcfg.log_every == 0
                         or self.global_step == stop)
                summary["train/loss"] = done.loss
                if not done.finite:
                    self.meter.note_bad_step(out, self.global_step)
                if self.stop_signal is not None or (
                        self._due(tcfg.save_every) and self.global_step < stop):
                    self._stop_or_checkpoint(own)
                if evaluate and self._due(tcfg.eval_every) and self.global_step < stop:
                    self._evaluate(out, f"step {self.global_step}")
            summary.update(self.meter.summary(
                rule.finish(), time.perf_counter() - train_start, self.global_step - first,
                out, own and self.store.enabled, self.saver.weight_bytes()))
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

    def _stepped(self, step: int, done: StepResult, tokens: int, seconds: float) -> dict:
        """Step ``step`` is done: the counter, the meter's row, the ``after_step`` hooks,
        a stop signal agreed on by every rank; returns the step's metrics row."""
        self.global_step = step + 1
        row = self.meter.row(self.global_step, self.epoch, self.schedule.cycle_of(step), done,
                             tokens, seconds)
        for hook in self.after_step:
            hook(self, done.group)
        self._agree_on_stop()
        return row

    def _agree_on_stop(self) -> None:
        """Data parallel: a signal seen by any rank stops every rank after this same step."""
        if self.dist.enabled:
            flag = distributed.all_reduce_(torch.tensor(
                [self.stop_signal or 0], dtype=torch.int64), distributed.dist.ReduceOp.MAX)
            self.stop_signal = self.stop_signal or int(flag[0]) or None

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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a resumed run needs besides the weights: the counters, every RNG and the
        update's state (:meth:`HiftUpdate.state_dict`: every group's optimizer state and
        fp32 masters, the scheduler). Tensors are the live ones: save them before training
        on. Collective under torchrun: each rank's RNG state goes into it."""
        rngs = distributed.gather_objects(rng_state()) if self.dist.enabled else []
        return {"global_step": self.global_step, **self.stream.state_dict(),
                **self.meter.state_dict(), **self.update.state_dict(), "rng": rng_state(),
                "rng_ranks": rngs}

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
        if "model" in state:
            load_weights(self.model, state["model"], source, self.sharded)
        self.update.load_state_dict(state, source)  # optimizer state, masters, schedule
        self.global_step = state["global_step"]
        self.meter.load_state_dict(state)
        self.stream.load_state_dict(state)
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[self.dist.rank] if len(ranks) == self.dist.world else state["rng"])

    # ------------------------------------------------------------------ save
    def checkpoint(self, keep_last: int | None = None) -> Path:
        """A resumable checkpoint of this step (:meth:`Saver.checkpoint`)."""
        return self.saver.checkpoint(keep_last)

    def save(self) -> Path | None:
        """The last checkpoint and ``model/`` (:meth:`Saver.save`)."""
        return self.saver.save()

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint of this run takes on disk: the weights, the fp32
        masters and every group's optimizer state."""
        params = [p for ps in self.opt_params for p in ps] + self.always_opt
        return (self.saver.weight_bytes() + state_bytes(params, self.optimizer_factory)
                + sum(m.numel() * 4 for m in self.update.all_masters()))

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

