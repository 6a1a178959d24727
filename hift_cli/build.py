"""The trainer's parts, each built from its config section and returned.

:meth:`HiftTrainer.setup <hift_cli.engine.HiftTrainer.setup>` calls these in order (each
needs what the ones before it built): the data (data.py, evaluate.py), the model and its
fp32 masters, the grouping (units, always-active units, groups, the schedule), the run
plan, the optimizer, the offload store and the LR schedule.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from hydra.utils import instantiate
from transformers import get_scheduler

from hift_cli import data as data_lib
from hift_cli import distributed
from hift_cli.config import Config, TrainerConfig
from hift_cli.evaluate import build_evaluator
from hift_cli.grouping import (Group, GroupSchedule, Piece, Unit, block_stack, find_units,
                               plan_units, row_gradients)
from hift_cli.loss import ChunkedLoss, chunk_tokens, chunkable
from hift_cli.memory import EstimateInput, build_groups
from hift_cli.models import enable_checkpointing, load_model
from hift_cli.offload import Delays, GroupStateStore, offload_enabled
from hift_cli.runplan import RunPlan
from hift_cli.update import Masters

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
    train_set: object  # the tokenized training split (a datasets.Dataset)
    labels: data_lib.Labels  # classification: the label names (else none)
    evaluator: object  # evaluate.Evaluator: the eval split and its metrics


def build_data(cfg: Config, tokenizer, device: torch.device) -> Data:
    """The tokenized training set, the label names and the evaluator."""
    dcfg = cfg.data
    splits = data_lib.load_splits(dcfg)
    labels = (data_lib.label_map(splits.train, dcfg, splits.eval)
              if dcfg.format == "classification" else data_lib.Labels())
    train_set = data_lib.tokenize(splits.train, tokenizer, dcfg, dcfg.max_samples, "train",
                                  labels)
    evaluator = build_evaluator(cfg, tokenizer, splits, labels, device)
    log.info(f"Data ({dcfg.format}): {len(train_set)} train / {len(evaluator.ds)}"
             f" eval samples from {dcfg.path}"
             + (f"; labels: {', '.join(labels.names)}" if labels.names else ""))
    return Data(train_set, labels, evaluator)


def build_model(cfg: Config, model_path: str, tokenizer, labels: data_lib.Labels,
                device: torch.device, dist, sharded: bool) -> tuple[torch.nn.Module, Masters]:
    """The model on ``device``, ready to train, and its fp32 masters (bf16-mixed)."""
    mcfg = cfg.model
    if labels.names:
        mcfg = dataclasses.replace(mcfg, num_labels=len(labels.names))
    mixed = cfg.trainer.precision == "bf16-mixed"
    # bf16-mixed: load fp32 weights, keep them as the fp32 masters the optimizer
    # updates, and train a bf16 copy (no precision lost to a bf16 round trip).
    dtype = "float32" if mixed else cfg.weights_dtype()
    # Sharded: rank 0 alone reads the weights; the others build the model empty.
    model = load_model(mcfg, model_path, tokenizer.pad_token_id, dtype,
                       empty=sharded and not dist.main)
    if labels.names:  # saved with the model, so its predictions have names
        model.config.id2label = dict(enumerate(labels.names))
        model.config.label2id = {n: i for i, n in enumerate(labels.names)}
    if mcfg.gradient_checkpointing:
        enable_checkpointing(model)
    if sharded:
        shard(model, device, dist)
    masters = build_masters(model, mixed)
    model.to(device)
    model.train()
    n = sum(p.numel() for p in model.parameters())
    log.info(f"Model: {type(model).__name__}, {n / 1e6:.1f}M parameters on {device}")
    return model, masters


def build_masters(model: torch.nn.Module, mixed: bool) -> Masters:
    """What the optimizer updates: bf16-mixed (``mixed``) keeps the fp32 weights as masters
    and turns the model's into bf16; otherwise the model's own weights."""
    masters = Masters(model, mixed)
    if mixed:
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        model.to(torch.bfloat16)  # new bf16 storage; masters keep the fp32 one
        masters.rekey(names, model)
    return masters


def shard(model: torch.nn.Module, device: torch.device, dist) -> None:
    """FSDP2 over the processes, each rank's shards sent by rank 0
    (:func:`distributed.shard_model`)."""
    distributed.shard_model(model, block_stack(model)[1], device)
    local = sum(distributed.local(p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    log.info(f"Sharded weights (FSDP2): {local / 1e6:.2f}M of {total / 1e6:.2f}M"
             f" parameters on this rank ({dist.world} processes)")


def build_loss(cfg: Config, model: torch.nn.Module) -> ChunkedLoss | None:
    """model.loss_chunk_tokens: the causal-LM loss a chunk of tokens at a time, for the
    models whose loss allows it."""
    chunk = (chunk_tokens(cfg.model.loss_chunk_tokens, model.config.vocab_size)
             if cfg.model.task == "causal_lm" else None)
    if chunk is None:
        return None
    if not chunkable(model):
        log.info("model.loss_chunk_tokens: this model changes its logits before the loss;"
                 " it keeps its own loss")
        return None
    return ChunkedLoss(model, chunk)


@dataclasses.dataclass
class Grouping:
    """Which parameters train when."""

    units: list[Unit]  # every unit: the always-active ones first
    always: list[Unit]  # hift.always_active: trained at every step, in no group
    groups: list[Group]
    schedule: GroupSchedule  # which group trains at which step
    # Sub-units' parameters whose gradient the model can give for their rows only.
    row_grads: dict
    grad_sync: distributed.GradSync | None  # data parallel: the active group's gradients

    @property
    def always_params(self) -> list[torch.nn.Parameter]:
        return [p for u in self.always for p in u.params.values()]

    @property
    def always_pieces(self) -> list[Piece]:
        return [piece for u in self.always for piece in u.pieces]


def build_grouping(cfg: Config, model: torch.nn.Module, loss: ChunkedLoss | None, dist,
                   sharded: bool, estimate_input: Callable[[], EstimateInput]) -> Grouping:
    """Units found structurally, cut into sub-units, always-active ones set apart, the rest
    in groups (``estimate_input()``: what k=auto's estimate sees); every parameter
    frozen but the always-active units'."""
    hcfg = cfg.hift
    units = find_units(model)  # sharded: a forward pass on every rank
    if sharded:
        distributed.reshard(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        for unit in units:  # the root's units were found gathered
            unit.params = {n: params[n] for n in unit.params}
    # hift.always_active: trained at every step besides the active group, in no group.
    # fpft already trains every unit at every step: the setting is ignored there.
    # Units over hift.max_unit_params: cut into sub-units of matrix rows.
    always, rest = plan_units(units, hcfg, sharded)
    # Sub-units' parameters whose gradient the model can give for their rows only
    # (embeddings: sparse; the chunked loss's head). Data parallel all-reduces dense ones.
    row_grads = {} if dist.enabled else row_gradients(
        model, loss.head if loss is not None else None)
    # hift.k=auto: the fewest balanced groups that fit hift.memory_budget (memory/search.py).
    groups = build_groups(estimate_input(), rest)
    schedule = GroupSchedule(hcfg.strategy, len(groups), cfg.trainer.seed,
                             1 if hcfg.strategy == "fpft" else hcfg.steps_per_group)
    # Data parallel: only the active group's (and always-active units') gradients
    # cross the wire (sharded: FSDP reduce-scatters them instead).
    grouping = Grouping([*always, *rest], always, groups, schedule, row_grads,
                        distributed.GradSync() if dist.enabled and not sharded else None)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in grouping.always_params:
        p.requires_grad_(True)  # for the whole run
    per = schedule.steps_per_group
    log.info(f"HiFT: {len(grouping.units)} units in {len(groups)} groups, strategy "
             f"{hcfg.strategy}" + (f", {per} steps per group" if per > 1 else "") + ": "
             + ", ".join(f"{g.name} ({g.numel / 1e6:.2f}M)" for g in groups)
             + "".join(f"; always active: {u.name} ({u.numel / 1e6:.2f}M)" for u in always))
    if hcfg.always_active and hcfg.strategy == "fpft":
        log.info("hift.always_active is ignored: fpft trains every unit at every step")
    return grouping


def build_plan(tcfg: TrainerConfig, train_samples: int, world: int,
               schedule: GroupSchedule) -> RunPlan:
    """The run plan: the steps (``trainer.epochs`` in whole cycles), the epochs' length,
    the LR schedule's cycles, said in the log."""
    plan = RunPlan.of(tcfg, train_samples, world, schedule.cycle_steps)
    if tcfg.epochs is not None:
        steps, k = plan.steps_from_epochs, plan.cycle_steps
        log.info(f"trainer.epochs={tcfg.epochs}: {tcfg.epochs} x {plan.epoch_batches}"
                 " batches" + (f" / grad_accum {tcfg.grad_accum}" if tcfg.grad_accum > 1
                               else "") + f" = {steps} steps"
                 + (f", rounded up to {plan.max_steps}" if plan.max_steps != steps else "")
                 + f" ({plan.max_steps // k} cycles of {schedule.num_groups} groups"
                 + (f" x {schedule.steps_per_group} steps"
                    if schedule.steps_per_group > 1 else "") + ")")
    if "epoch" in (tcfg.eval_every, tcfg.save_every):
        log.info(f"Epoch ends ({plan.epoch_batches} batches each): steps"
                 f" {', '.join(str(plan.epoch_end(e)) for e in (1, 2, 3))}, ...")
    return plan


@dataclasses.dataclass
class Optimizer:
    optimizer: torch.optim.Optimizer  # one for every parameter, grouped or always active
    factory: object  # optimizer class with the config's settings: optimizer(params)
    group_params: list[list[torch.Tensor]]  # what it updates, per group
    always_params: list[torch.Tensor]  # what it updates of the always-active units


def build_optimizer(ocfg: dict, grouping: Grouping, masters: Masters) -> Optimizer:
    """One optimizer over every group's parameters (their fp32 masters in bf16-mixed, else
    the model's own) and the always-active units', which it updates at every step."""
    ocfg = dict(ocfg)
    group_params = [masters.of(g.pieces) for g in grouping.groups]
    # Always-active units: updated every step; their state and masters stay on the
    # device (the store moves only the groups').
    always = masters.of(grouping.always_pieces)
    masters.settle({id(piece.param) for g in grouping.groups for piece in g.pieces
                    if piece.whole} | {id(p) for p in grouping.always_params})
    decay, no_decay = [], []
    for params in [*group_params, always]:
        for p in params:
            # Norm weights and biases are vectors: no weight decay on them.
            (decay if p.ndim >= 2 else no_decay).append(p)
    param_groups = [
        {"params": decay, "weight_decay": ocfg.get("weight_decay", 0.0)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    log.info(f"Instantiating {ocfg['_target_']}")
    # The store also builds throw-away instances to learn the state layout.
    factory = instantiate({**ocfg, "_partial_": True})
    return Optimizer(factory(param_groups), factory, group_params, always)


def build_store(cfg: Config, opt: Optimizer, masters: Masters, schedule: GroupSchedule,
                device: torch.device, sharded: bool,
                delays: Delays | None = None) -> GroupStateStore:
    """Inactive groups' optimizer state (and masters) in host memory, if enabled."""
    enabled, why = offload_enabled(cfg, device.type, len(opt.group_params))
    # fp32 masters start in host memory (the store moves them) or on the device.
    store = GroupStateStore(opt.optimizer, opt.group_params, device, enabled,
                            masters=bool(masters), factory=opt.factory,
                            pairs=schedule.pairs(), delays=delays)
    if masters and not sharded:  # sharded ones are made on the device
        on_device = opt.always_params + ([] if enabled else
                                         [m for params in opt.group_params for m in params])
        for m in on_device:
            m.data = m.data.to(device)
    log.info(f"Optimizer state offload: {'on' if enabled else f'off ({why})'}"
             + (" (fp32 masters too)" if masters and enabled else ""))
    return store


def build_scheduler(tcfg: TrainerConfig, optimizer: torch.optim.Optimizer, plan: RunPlan):
    """The LR schedule, sized in cycles (delayed LR update)."""
    if tcfg.warmup_ratio is not None:
        log.info(f"trainer.warmup_ratio={tcfg.warmup_ratio}: {plan.warmup_cycles} of"
                 f" {plan.num_cycles} cycles")
    return get_scheduler(tcfg.lr_scheduler, optimizer,
                         num_warmup_steps=plan.warmup_cycles,
                         num_training_steps=plan.num_cycles)
