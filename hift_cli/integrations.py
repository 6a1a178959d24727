"""HiFT inside the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``, a subclass of it).

Two lines in a script that already trains with a ``Trainer``::

    from hift_cli.integrations import HiFT

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, ...)
    HiFT(k=4).attach(trainer)  # or HiFT(k="auto", memory_budget=24), strategy=..., ...
    trainer.train()

The Trainer keeps its loop: data collator, forward and backward passes, gradient
accumulation and clipping, logging, evaluation, ``save_steps`` and
``resume_from_checkpoint``. HiFT brings its parts and its update rule, the same code
``hift train`` runs (engine.py's :meth:`~hift_cli.engine.HiftTrainer.setup_groups` /
:meth:`~hift_cli.engine.HiftTrainer.setup_update`, update.py's
:class:`~hift_cli.update.HiftUpdate`): before a step's first micro-batch the step's group
becomes the active one and its state is fetched (:meth:`HiftUpdate.begin
<hift_cli.update.HiftUpdate.begin>`); the Trainer's ``optimizer.step()`` is HiFT's update
of that group (:meth:`~hift_cli.update.HiftUpdate.end`: the next group's state prefetched,
the optimizer step, fp32 masters written back); its ``lr_scheduler.step()`` moves the
schedule only at a cycle's end (:meth:`~hift_cli.update.HiftUpdate.end_cycle`; the
schedule is sized in cycles). The Trainer's checkpoints hold every group's optimizer state
and masters (its ``optimizer.pt``), checked on resume like ``hift train``'s.

Data parallel (torchrun, ``accelerate launch``): HiFT all-reduces the active group's
gradients itself, instead of the DDP wrapper Accelerate would put around the model. Not
supported, each refused with one line: DeepSpeed, FSDP, DataParallel, and an optimizer or
scheduler of the user's own (``optimizers=``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from typing import Any

import torch
from transformers import TrainerCallback, get_scheduler

from hift_cli import distributed
from hift_cli.build import build_masters
from hift_cli.config import (Config, ConfigError, DataConfig, HiftConfig, ModelConfig,
                             TrainerConfig)
from hift_cli.engine import HiftTrainer
from hift_cli.models import enable_checkpointing
from hift_cli.runplan import RunPlan

log = logging.getLogger(__name__)

# How the weights are trained (HiFT(precision=...)), from the model's dtype by default.
PRECISIONS = ("fp32", "bf16", "bf16-mixed")


class HiFT:
    """HiFT's settings for a Hugging Face Trainer run.

    Args:
        optimizer: the optimizer as ``hift train``'s ``optimizer`` section (``_target_``
            and its settings), e.g. ``{"_target_": "bitsandbytes.optim.AdamW8bit"}``;
            settings it leaves out come from the Trainer's arguments. Default:
            ``torch.optim.AdamW`` with the arguments' learning rate, weight decay (matrices
            only, as ``hift train``), betas and epsilon.
        precision: ``fp32`` / ``bf16`` (the weights are updated in their own dtype) or
            ``bf16-mixed`` (fp32 master weights updated by the optimizer, the model
            turned into bf16 for its forward and backward passes). Default: ``bf16`` for
            a bf16 model, else ``fp32``. (The Trainer's ``bf16=True`` on an fp32 model
            is autocast, its own business.)
        seq_len: tokens per sample, for ``k="auto"``'s estimate (default: the arguments'
            ``max_length``, which TRL's ``SFTConfig`` has).
        **hift: ``hift train``'s ``hift`` section: ``strategy``, ``k`` or ``m``,
            ``grouping``, ``steps_per_group``, ``always_active``, ``max_unit_params``,
            ``offload``, ``memory_budget``, ``memory_reserve`` (docs/config.md).

    Raises:
        ConfigError: a setting that ``hift train`` would refuse, in one line.
    """

    def __init__(self, optimizer: dict | None = None, precision: str | None = None,
                 seq_len: int | None = None, **hift: Any):
        if "m" in hift and "k" not in hift:
            hift["k"] = None  # one of the pair, as on hift train's command line
        names = {f.name for f in dataclasses.fields(HiftConfig)}
        unknown = sorted(set(hift) - names)
        if unknown:
            raise ConfigError(f"HiFT: no setting {', '.join(unknown)} (settings:"
                              f" {', '.join(sorted(names))})")
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"HiFT: precision must be one of {', '.join(PRECISIONS)}"
                              f" (got {precision!r})")
        self.hift = HiftConfig(**hift)
        self.optimizer = dict(optimizer or {})
        self.precision = precision
        self.seq_len = seq_len
        self.engine: HiftTrainer | None = None  # HiFT's parts, once the Trainer asks
        self.step = 0  # the Trainer's step in progress (its global_step)
        self.stop = 0  # the Trainer's max_steps
        self.group = None  # the step's group
        self.last = None  # the last step's StepResult
        self.moved = 0  # bytes the state store copied since the last log line
        self.synced = 0  # gradient bytes all-reduced since the last log line
        self.trainer = None

    # ------------------------------------------------------------------ attach
    def attach(self, trainer) -> "HiFT":
        """Make ``trainer`` (a ``transformers.Trainer`` or subclass, not trained yet) train
        with HiFT. Returns self (``engine``: HiFT's parts once training starts).

        Raises:
            ConfigError: the Trainer is set up in a way HiFT does not support.
        """
        args = trainer.args
        if getattr(trainer, "is_deepspeed_enabled", False) or args.deepspeed:
            raise ConfigError("HiFT: DeepSpeed is not supported (HiFT moves the optimizer"
                              " state itself): remove the deepspeed argument")
        if getattr(trainer, "is_fsdp_enabled", False) or args.fsdp:
            raise ConfigError("HiFT: the Trainer's FSDP is not supported: remove the fsdp"
                              " argument (hift train has trainer.shard_weights)")
        if args.n_gpu > 1:
            raise ConfigError(f"HiFT: {args.n_gpu} GPUs in one process (DataParallel): start a"
                              " process per GPU (torchrun or accelerate launch)")
        optim = getattr(args.optim, "value", args.optim)
        if optim not in ("adamw_torch", "adamw_torch_fused") and not self.optimizer:
            raise ConfigError(f"HiFT: TrainingArguments.optim={optim}: HiFT builds the optimizer"
                              " itself (torch.optim.AdamW by default): give it as"
                              " HiFT(optimizer={'_target_': ...})")
        if trainer.optimizer is not None or trainer.lr_scheduler is not None:
            raise ConfigError("HiFT: the Trainer has an optimizer or scheduler of its own"
                              " (optimizers=...): HiFT brings both; pass HiFT(optimizer=...)")
        self.trainer = trainer
        # The Trainer calls these when train() starts (create_optimizer_and_scheduler).
        trainer.create_optimizer = self._create_optimizer
        trainer.create_scheduler = self._create_scheduler
        trainer.add_callback(_Callback(self))
        original_log = trainer.log

        def log_with_hift(logs: dict, *rest, **kwargs):
            if "loss" in logs and self.last is not None:  # a training line: what HiFT did
                logs["hift/group"] = self.last.group.index if self.last.group else 0
                if self.engine.store.enabled:
                    logs["hift/offload_gib"] = self.moved / 2**30
                    self.moved = 0
                if self.engine.dist.enabled:
                    logs["hift/allreduce_gib"] = self.synced / 2**30
                    self.synced = 0
            return original_log(logs, *rest, **kwargs)

        trainer.log = log_with_hift
        if args.world_size > 1:
            # Data parallel: HiFT all-reduces the active group's gradients itself,
            # overlapped with the backward pass of a step's last micro-batch. Accelerate
            # prepares the model without its DDP wrapper (its evaluation mode: mixed
            # precision and compilation only), which would sync every parameter.
            accelerator = trainer.accelerator
            original_prepare = accelerator.prepare_model

            def prepare_model(model, device_placement=None, evaluation_mode=False):
                return original_prepare(model, device_placement=device_placement,
                                        evaluation_mode=True)

            accelerator.prepare_model = prepare_model
            original_step = trainer.training_step

            def training_step(model, inputs, *rest, **kwargs):
                sync = self.engine.grad_sync
                last = trainer.accelerator.sync_gradients  # as DDP's no_sync would
                sync.arm(last)
                loss = original_step(model, inputs, *rest, **kwargs)
                if last:  # the mean, as DDP's: the Trainer scales the loss for it
                    self.synced += sync.finish(scale=1 / self.engine.dist.world)
                return loss

            trainer.training_step = training_step
        return self

    def config(self, model: torch.nn.Module, args) -> Config:
        """The ``hift train`` config this Trainer run amounts to (what the parts are built
        from): the model (its config saved to a temporary folder, for k="auto"'s
        estimate), HiFT's settings, the optimizer and precision."""
        classify = type(model).__name__.endswith("ForSequenceClassification")
        dtype = next(model.parameters()).dtype
        precision = self.precision or ("bf16" if dtype == torch.bfloat16 else "fp32")
        if dtype != torch.float32 and precision in ("fp32", "bf16-mixed"):
            raise ConfigError(f"HiFT: precision={precision} needs the model loaded in float32"
                              f" (it is {dtype}): from_pretrained(..., dtype=torch.float32)")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"HiFT: a {dtype} model: load it in float32 or bfloat16")
        seq_len = self.seq_len or getattr(args, "max_length", None)
        if self.hift.k == "auto" and not seq_len:
            raise ConfigError("HiFT: k='auto' estimates the memory of a batch: give"
                              " HiFT(seq_len=...), the tokens per sample")
        # k="auto"'s estimate builds the architecture from a config: this model's own, as
        # it is now (a Hub id or a folder may say otherwise, or nothing).
        folder = tempfile.mkdtemp(prefix="hift-model-config-")
        try:
            return self._config(model, args, folder, classify, precision, seq_len)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _config(self, model, args, folder: str, classify: bool, precision: str,
                seq_len: int | None) -> Config:
        model.config.save_pretrained(folder)
        mcfg = ModelConfig(name_or_path=folder, task="sequence_classification"
                           if classify else "causal_lm",
                           num_labels=getattr(model.config, "num_labels", 2),
                           gradient_checkpointing=_checkpointing(model),
                           trust_remote_code=bool(getattr(model.config, "auto_map", None)))
        optimizer = {"_target_": "torch.optim.AdamW", "lr": args.learning_rate,
                     "weight_decay": args.weight_decay,
                     "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon}
        if self.optimizer.get("_target_", optimizer["_target_"]) != optimizer["_target_"]:
            optimizer = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
        optimizer.update(self.optimizer)
        device = next(model.parameters()).device
        return Config(
            model=mcfg,
            data=DataConfig(format="classification" if classify else "instruction",
                            path="(the Trainer's)", max_length=seq_len or 512),
            optimizer=optimizer, hift=self.hift,
            trainer=TrainerConfig(
                precision=precision, seed=args.seed,
                batch_size=args.per_device_train_batch_size,
                grad_accum=args.gradient_accumulation_steps,
                # The Trainer clips (args.max_grad_norm); HiFT only measures the norm.
                max_grad_norm=None, device="cpu" if device.type == "cpu" else "auto",
                save_model=False, eval_before=False))

    # ------------------------------------------------------------------ the Trainer's calls
    def _create_optimizer(self, model=None):
        trainer = self.trainer
        if trainer.optimizer is not None:
            return trainer.optimizer
        model = trainer.model  # HiFT's parts hold the model itself, not a wrapper
        cfg = self.config(model, trainer.args)
        engine = HiftTrainer(cfg, trainer.args.output_dir)
        engine.dist, engine.sharded = distributed.current(), False
        engine.device = next(model.parameters()).device
        if cfg.model.gradient_checkpointing:
            # Non-reentrant, without the hook that makes every frozen layer record a graph.
            enable_checkpointing(model)
        engine.model, engine.loss = model, None  # the Trainer computes the loss
        if engine.dist.enabled:  # rank 0's weights everywhere, as DDP's wrapper would
            distributed.broadcast_parameters(model)
        engine.masters = build_masters(model, cfg.trainer.precision == "bf16-mixed")
        for m in engine.masters.by_id.values():
            # In host memory, as hift train loads them: the store puts on the device
            # those that live there (offload off, always-active units).
            m.data = m.data.to("cpu")
        try:
            engine.setup_groups()
            # The Trainer clips and logs dense gradients: a sub-unit's rows come from them.
            engine.row_grads = {}
            engine.setup_update()
        finally:  # the model's config, saved for the estimate (config())
            shutil.rmtree(cfg.model.name_or_path, ignore_errors=True)
        self.engine = engine
        trainer.optimizer = _Optimizer(self)
        return trainer.optimizer

    def _create_scheduler(self, num_training_steps: int, optimizer=None):
        trainer = self.trainer
        if trainer.lr_scheduler is not None:
            return trainer.lr_scheduler
        engine, args = self.engine, trainer.args
        cycle = engine.schedule.cycle_steps
        cycles = math.ceil(num_training_steps / cycle)
        # Warmup in cycles: a fraction of them (warmup_steps < 1; transformers 4.x:
        # warmup_ratio), or the steps' cycles.
        warmup = args.warmup_steps or getattr(args, "warmup_ratio", 0) or 0
        warmup = round(warmup * cycles) if warmup < 1 else math.ceil(warmup / cycle)
        engine.plan = RunPlan(num_training_steps, None, 0, args.gradient_accumulation_steps,
                              cycle, cycles, warmup)
        kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        # Sized in cycles: the delayed LR update steps it once per cycle.
        engine.scheduler = get_scheduler(kind, engine.optimizer, num_warmup_steps=warmup,
                                         num_training_steps=cycles,
                                         scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        trainer.lr_scheduler = _Scheduler(self)
        trainer._created_lr_scheduler = True  # a later train() makes it again, as its own
        log.info(f"HiFT: {len(engine.groups)} groups, {cycle} steps a cycle; the LR schedule"
                 f" ({kind}) steps once per cycle: {cycles} cycles, {warmup} of warmup")
        return trainer.lr_scheduler

    def begin(self, step: int, max_steps: int) -> None:
        """Before the Trainer's step ``step`` (its first micro-batch)."""
        self.step, self.stop = step, max_steps
        self.group = self.engine.update.begin(step)

    def update(self) -> None:
        """The Trainer's optimizer.step(): HiFT's update of the step's group."""
        if self.group is None:  # a step() outside the Trainer's loop
            raise RuntimeError("HiFT: optimizer.step() before the Trainer began a step")
        self.last = self.engine.update.end(self.step, self.stop, self.group, None)
        self.moved += self.last.moved.h2d_bytes + self.last.moved.d2h_bytes
        self.group = None


class _Callback(TrainerCallback):
    """Begins each of the Trainer's steps with HiFT's, lands the copies in flight at the
    end of training."""

    def __init__(self, hift: HiFT):
        self.hift = hift

    def on_step_begin(self, args, state, control, **kwargs):
        self.hift.begin(state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        if self.hift.engine is not None:
            self.hift.engine.update.finish()


class _Optimizer(torch.optim.Optimizer):
    """The Trainer's optimizer: its step is HiFT's update; its state dict is HiFT's (every
    group's optimizer state and fp32 masters, the cycle-sized LR schedule). Before the
    first step or load it is empty, so that Accelerate's placement round trip at
    ``prepare()`` moves nothing."""

    def __init__(self, hift: HiFT):  # no Optimizer.__init__: the parameters are HiFT's
        self.hift = hift
        self.started = False

    @property
    def inner(self) -> torch.optim.Optimizer:
        return self.hift.engine.optimizer

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self):
        return self.inner.defaults

    def step(self, closure=None):
        if closure is not None:
            raise ConfigError("HiFT: optimizer.step(closure) is not supported")
        self.hift.update()
        self.started = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        if not self.started:
            return {}
        return {"hift": self.hift.engine.update.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if "hift" not in state_dict:
            raise ConfigError("HiFT: this checkpoint's optimizer.pt was not saved by a HiFT"
                              " run: resume from a checkpoint of one")
        self.hift.engine.update.load_state_dict(state_dict["hift"], "the checkpoint's"
                                                " optimizer.pt")
        self.started = True


class _Scheduler:
    """The Trainer's LR scheduler: its step moves HiFT's cycle-sized schedule at a cycle's
    end only (delayed LR update). HiFT's optimizer state dict holds the schedule."""

    def __init__(self, hift: HiFT):
        self.hift = hift

    def step(self) -> None:
        self.hift.engine.update.end_cycle(self.hift.step)

    def get_last_lr(self) -> list[float]:
        return self.hift.engine.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether the Trainer turned on activation checkpointing (transformers 5 names it so;
    4.x gradient checkpointing)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False
