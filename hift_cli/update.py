"""The update rule: what a training step does with its micro-batches.

:meth:`HiftTrainer.train <hift_cli.engine.HiftTrainer.train>` owns the loop: the batch
stream, metrics rows, evaluation, checkpoints, the stop policy. Once per step it hands an
:class:`Update` the step's :class:`Window` and records the :class:`StepResult`.
:class:`HiftUpdate` is HiFT's rule (full fine-tuning is its one-group case,
``hift.strategy=fpft``); the benchmark's LoRA, BAdam, GaLore and LOMO are other rules
(``bench/peers.py``) run by the same loop, so the update is the only difference.
:class:`Masters` is what HiFT's optimizer updates for each piece of a parameter (the fp32
masters of bf16-mixed, or the parameter itself).
"""

from __future__ import annotations

import dataclasses

import torch

from hift_cli import distributed
from hift_cli.checkpoint import CheckpointError
from hift_cli.grouping import Group
from hift_cli.models import autocast
from hift_cli.offload import TransferStats


@dataclasses.dataclass
class Window:
    """One step's micro-batches on the device. ``weights``: each one's share of the loss
    items (label tokens for a causal LM, samples for classification) of the step's global
    batch, over all ranks; scaling each micro-batch's mean loss by it gives the gradient
    of the mean over the global batch. ``tokens``: the global batch's tokens."""

    batches: list[dict[str, torch.Tensor]]
    weights: list[float]
    tokens: int


@dataclasses.dataclass
class StepResult:
    """What one step's update did."""

    loss: float  # the global batch's loss
    lr: float  # the learning rate the step used
    finite: bool  # False: non-finite loss or gradient, update skipped
    updated: int  # parameters updated
    group: Group | None = None  # HiFT: the group trained
    moved: TransferStats = dataclasses.field(default_factory=TransferStats)  # state store
    synced: int = 0  # gradient bytes all-reduced (data parallel) or reduce-scattered


class Update:
    """An update rule. :meth:`step` takes one step (forward, backward, update) and says
    what it did; :meth:`finish` ends a ``train()`` call (copies still in flight land) and
    returns transfers no step reported; :meth:`summary` adds to the run's summary.

    A rule other than the trainer's own has no resumable state: runs with it save no
    checkpoints (``trainer.save_model=false trainer.save_every=null``).
    """

    def step(self, step: int, stop: int, window: Window) -> StepResult:
        """Step ``step`` (0-based) of a ``train()`` call that stops at ``stop``."""
        raise NotImplementedError

    def finish(self) -> TransferStats:
        return TransferStats()

    def summary(self) -> dict:
        return {}


class HiftUpdate(Update):
    """HiFT's step, top to bottom: pick the group -> activate it -> fetch its state if it
    is not on the device yet -> forward/backward (the window's micro-batches) -> send the
    previous group's state back, prefetch the next group's -> wait for this group's state
    -> clip -> optimizer step -> (end of cycle: LR step); its own state goes back during
    the next step. Reads the trainer's parts (groups, schedule, store, masters, optimizer,
    scheduler) as set up by :meth:`HiftTrainer.setup <hift_cli.engine.HiftTrainer.setup>`.
    """

    def __init__(self, trainer):
        self.trainer = trainer  # a set-up HiftTrainer (engine.py imports this module)
        self.active: Group | None = None

    def step(self, step: int, stop: int, window: Window) -> StepResult:
        group = self.begin(step)
        loss, synced = self._forward_backward(window)
        result = self.end(step, stop, group, loss, synced)
        self.end_cycle(step)
        return result

    # The step's phases. A loop that runs the forward and backward passes itself (the
    # Hugging Face Trainer: hift_cli/integrations) calls begin() before them, end() after
    # them and end_cycle() after its LR scheduler's turn.
    def begin(self, step: int) -> Group:
        """Before step ``step``'s forward pass: its group made the active one, its state
        on the way to the device. Returns the group."""
        t = self.trainer
        group = t.groups[t.schedule.group_at(step)]
        if group is not self.active:
            self.activate(group)
        # This group's state is normally already on its way (the previous step fetched
        # it; not at the first step of a run or after a resume). The window's inputs were
        # copied before: they must not queue behind a large prefetch.
        t.store.prefetch(group.index)
        return group

    def end(self, step: int, stop: int, group: Group, loss: torch.Tensor | None,
            synced: int = 0) -> StepResult:
        """After step ``step``'s backward pass (of a ``train()`` call that stops at
        ``stop``): the update of ``group``. ``loss``: the global batch's (None: the caller
        has it; only the gradient's norm then decides whether the step is finite)."""
        t = self.trainer
        next_index = t.schedule.group_at(step + 1) if step + 1 < stop else None
        # The forward pass's host reads are behind us and the backward pass is queued:
        # now the previous group's write-back goes out and the next group's state comes
        # in, on the two copy streams while the backward pass computes. (Issued earlier,
        # a host read queued behind them on the copy engine: offload.py, offload.)
        t.store.flush()
        if next_index is not None:
            t.store.prefetch(next_index)

        # The group's parameters and the always-active ones, and what updates them.
        trained = [*group.pieces, *t.always_pieces]
        params = t.opt_params[group.index] + t.always_opt
        t.store.wait(group.index)  # its state and masters must have arrived
        t.masters.take_grads(trained, params)
        max_norm = t.cfg.trainer.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in params if p.grad is not None],
            max_norm if max_norm is not None else float("inf"))
        if distributed.is_sharded(grad_norm):  # of sharded gradients: reduced on use
            grad_norm = grad_norm.full_tensor()
        lr = t.optimizer.param_groups[0]["lr"]
        finite = self._finite(loss, grad_norm)
        if finite:
            with t.store.updating(group.index):  # the write-back waits for all of it
                t.optimizer.step()
                for hook in t.after_update:
                    hook(t, group)
                t.masters.write_back(trained, params)
        # Not finite: no update; weights and optimizer state stay as they were.
        t.optimizer.zero_grad(set_to_none=True)  # free the group's grads now
        t.store.release(group.index)  # kept on the device if the next step trains it
        # .item() is a CPU-GPU sync point; one per step is noise next to a step.
        return StepResult(loss.item() if loss is not None else float("nan"), lr, finite,
                          group.numel + t.always_numel if finite else 0, group,
                          t.store.take_stats(), synced)

    def end_cycle(self, step: int) -> None:
        """After step ``step``: at a cycle's end, the LR step (delayed LR update: once per
        full cycle)."""
        t = self.trainer
        if t.schedule.ends_cycle(step):
            t.scheduler.step()

    def finish(self) -> TransferStats:
        # The last write-back goes out now (each goes out during the step after its
        # update) and may still be landing in the buffers the optimizer's state points
        # at: let it finish before anyone reads them. Its bytes are in no step's row.
        self.trainer.store.synchronize()
        return self.trainer.store.take_stats()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Every group's optimizer state and fp32 masters and the LR schedule, with what
        they are only valid under (the settings, the pieces, the always-active units, the
        processes sharding the weights). Tensors are the live ones (offloaded state: the
        store's host buffers). (The group order needs nothing: step N's group follows from
        the strategy, the seed and N.)"""
        t = self.trainer
        with t.store.readable():  # offloaded state: its host copies have landed
            optimizer = t.optimizer.state_dict()
            # Its per-parameter dicts are the optimizer's own, which the store rebinds
            # when a group moves: hold on to the tensors they point at now (sharded ones:
            # this rank's part, listed under "sharded").
            live = optimizer["state"]
            optimizer["sharded"] = [[i, k] for i, s in live.items() for k, v in s.items()
                                    if distributed.is_sharded(v)]
            optimizer["state"] = {i: {k: distributed.local(v) for k, v in s.items()}
                                  for i, s in live.items()}
            return {
                "optimizer": optimizer,
                "scheduler": t.scheduler.state_dict(),
                "masters": [distributed.local(m) if t.sharded else m.data
                            for m in self.all_masters()],
                "sharded_over": t.dist.world if t.sharded else 1,
                "always_active": [u.name for u in t.always],
                "pieces": self.pieces(),
                "settings": self.resume_settings(),
            }

    def load_state_dict(self, state: dict, source: str) -> None:
        """Restore :meth:`state_dict` (``source`` names it in errors).

        Raises:
            CheckpointError: the state was saved under other settings.
        """
        t = self.trainer
        # The optimizer's parameter order puts always-active units last: another choice
        # of them would hand saved state to the wrong parameters.
        saved_always = state.get("always_active", [])
        if saved_always != [u.name for u in t.always]:
            raise CheckpointError(f"{source} was saved with hift.always_active="
                                  f"[{','.join(saved_always)}]: resume with the same setting")
        # What the saved state and counters mean (older checkpoints: not recorded).
        settings = self.resume_settings()
        for key, saved in state.get("settings", {}).items():
            now = settings.get(key)
            if saved != now:
                raise CheckpointError(f"{source} was saved with {_setting(key, saved)}, this run"
                                      f" has {_setting(key, now)}: resume with the same"
                                      f" {RESUME_KEYS.get(key, key)}")
        # Sub-units: the optimizer's tensors are rows of parameters, as hift.k / hift.m and
        # hift.max_unit_params cut them (older checkpoints: every parameter whole).
        same = (state["pieces"] == self.pieces() if "pieces" in state
                else all(pc.whole for pcs in self.all_pieces() for pc in pcs))
        if not same:
            raise CheckpointError(f"{source} was saved with other sub-units: resume with the"
                                  " same hift.k / hift.m, hift.max_unit_params and model")
        # Offloaded groups' state and masters go straight into their host buffers; the
        # always-active units' live on the device even while the store offloads.
        t.store.load(state["optimizer"], list(zip(self.all_masters(), state["masters"])),
                     {id(p) for p in t.always_opt})
        if hasattr(t.optimizer, "initialized"):
            # bitsandbytes: its first step() would move every group's state to the GPU.
            t.optimizer.initialized = True
        t.scheduler.load_state_dict(state["scheduler"])

    def resume_settings(self) -> dict:
        """The settings a checkpoint's state is only valid under: which units train
        together (the optimizer's groups, the steps per cycle the LR schedule counts), in
        which order, at which precision (masters), by which optimizer."""
        t = self.trainer
        return {"groups": [[u.name for u in g.units] for g in t.groups],
                "hift.strategy": t.cfg.hift.strategy,
                "hift.steps_per_group": t.schedule.steps_per_group,
                "trainer.precision": t.cfg.trainer.precision,
                "optimizer._target_": t.cfg.optimizer.get("_target_")}

    def all_pieces(self) -> list[list]:
        """Every group's pieces, then the always-active units': the optimizer's order."""
        t = self.trainer
        return [*(g.pieces for g in t.groups), t.always_pieces]

    def pieces(self) -> list[list]:
        """``[parameter name, first row, end row]`` of every tensor the optimizer updates,
        in its order (checkpoints record it)."""
        return [[pc.name, pc.start, pc.stop] for pcs in self.all_pieces() for pc in pcs]

    def all_masters(self) -> list[torch.Tensor]:
        """Every fp32 master (bf16-mixed): the groups', then the always-active units'."""
        t = self.trainer
        if not t.masters:
            return []
        return [m for ps in t.opt_params for m in ps] + t.always_opt

    @staticmethod
    def _finite(loss: torch.Tensor | None, grad_norm: torch.Tensor) -> bool:
        """Whether the step may update: a CPU-GPU sync point."""
        if loss is None:
            return bool(torch.isfinite(grad_norm))
        return bool(torch.isfinite(loss) & torch.isfinite(grad_norm))

    def _forward_backward(self, window: Window) -> tuple[torch.Tensor, int]:
        """Forward and backward over the window's micro-batches, with the same group
        active for all of them, each mean loss scaled by its weight. Returns the global
        batch's loss (on every rank) and the gradient bytes all-reduced."""
        t = self.trainer
        loss_sum = torch.zeros((), device=t.device)
        last = len(window.batches) - 1
        for i, (batch, weight) in enumerate(zip(window.batches, window.weights)):
            if t.grad_sync is not None:  # sum across ranks on the last one only
                t.grad_sync.arm(i == last)
            if t.sharded:  # reduce-scatter on the last one only
                t.model.set_requires_gradient_sync(i == last)
            with autocast(t.cfg.trainer.precision, t.device), t.chunked():
                loss = t.model(**batch).loss * weight
            loss.backward()
            loss_sum += loss.detach()
        synced = t.grad_sync.finish() if t.grad_sync is not None else 0
        if t.sharded:  # FSDP reduce-scattered the full gradients of what trained
            trained = {id(p): p for p in [*self.active.params.values(), *t.always_params]}
            synced = sum(p.numel() * p.element_size() for p in trained.values()
                         if p.grad is not None)
        distributed.all_reduce_(loss_sum)
        return loss_sum, synced

    def activate(self, group: Group) -> None:
        """Make ``group`` the one that trains: only its parameters (and the always-active
        units') require grad."""
        t = self.trainer
        if self.active is not None:
            for p in self.active.params.values():
                p.requires_grad_(False)
        for p in group.params.values():
            p.requires_grad_(True)
        # A sub-unit's parameter: only its rows' gradient where the model allows it.
        partial = {id(pc.param): pc for pc in group.pieces if not pc.whole}
        for pid, embeddings in t.row_grads.items():
            for module in embeddings:
                module.sparse = pid in partial
        if t.loss is not None:  # the head's rows, from the chunked loss
            head = id(t.loss.head.weight)
            t.loss.rows = ({head: [(partial[head].start, partial[head].stop)]}
                           if head in partial and head in t.row_grads else {})
        if t.sharded:  # gathered units keep the requires_grad they were gathered with
            distributed.reshard(t.model)
        if t.grad_sync is not None:
            t.grad_sync.attach(list(group.params.values()) + t.always_params)
        self.active = group


class Masters:
    """What the optimizer updates for each :class:`~hift_cli.grouping.Piece` of a model
    parameter, the one place that knows: bf16-mixed's fp32 master weights (the model
    computes in bf16), else the parameter itself; for a sub-unit's rows, a view of those
    rows of either. :meth:`take_grads` brings the gradients in, :meth:`write_back` the
    updated weights out. ``bool(masters)``: bf16-mixed."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.enabled = enabled
        # Made before the model goes to bf16: the masters keep the fp32 storage (sharded
        # weights: a copy of this rank's fp32 part, sharded like its parameter).
        self.by_id: dict[int, torch.nn.Parameter] = (
            {id(p): torch.nn.Parameter(
                distributed.wrap_like(distributed.local(p).detach().clone(), p)
                if distributed.is_sharded(p) else p.data, requires_grad=False)
             for p in model.parameters()} if enabled else {})
        self.rows: dict[tuple[int, int, int], torch.nn.Parameter] = {}  # sub-units' views

    def __bool__(self) -> bool:
        return self.enabled

    def of(self, pieces) -> list[torch.Tensor]:
        """What the optimizer updates for ``pieces`` (the same objects at every call)."""
        out = []
        for piece in pieces:
            full = self.by_id.get(id(piece.param), piece.param)
            if piece.whole:
                out.append(full)
                continue
            key = (id(piece.param), piece.start, piece.stop)
            if key not in self.rows:  # shares the full tensor's storage
                self.rows[key] = torch.nn.Parameter(piece.of(full.data), requires_grad=False)
            out.append(self.rows[key])
        return out

    def settle(self, whole: set[int]) -> None:
        """After every piece has its tensor: drop the full fp32 master of a parameter that
        trains only in parts (``whole``: ids of those trained whole), so that moving its
        pieces' storage (offload) frees it."""
        for pid in [pid for pid in self.by_id if pid not in whole]:
            if any(key[0] == pid for key in self.rows):
                del self.by_id[pid]

    def take_grads(self, pieces, updated: list) -> None:
        """The model's gradients -> what the optimizer updates: fp32 gradients on the
        masters (bf16-mixed, freeing the bf16 ones), a sub-unit's rows (a dense view, or
        the rows of a sparse gradient made dense)."""
        for piece, target in zip(pieces, updated):
            p = piece.param
            if target is p:  # updated in place with its own gradient
                continue
            grad = p.grad
            if grad is not None:
                target.grad = _rows_of(grad, piece, target.dtype)
            p.grad = None

    def write_back(self, pieces, updated: list) -> None:
        """Updated fp32 masters -> the bf16 weights the model computes with (other
        precisions update the weights, or views of their rows, in place)."""
        if self:
            for piece, master in zip(pieces, updated):
                piece.of(piece.param.data).copy_(master.data)

    def rekey(self, names: dict[int, str], model: torch.nn.Module) -> None:
        """The model's parameters were replaced (sharded ones converted to bf16 are new
        objects): find each master's parameter again by name (``names``: old id -> name)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        self.by_id = {id(params[names[i]]): m for i, m in self.by_id.items()}


def _rows_of(grad: torch.Tensor, piece, dtype: torch.dtype) -> torch.Tensor:
    """``piece``'s rows of a parameter's gradient, dense, in ``dtype``: a view where they
    already are (dense, same dtype)."""
    if not grad.is_sparse:
        return piece.of(grad).to(dtype)
    grad = grad.coalesce()  # an embedding's (a row per token) or a chunked head's rows
    index, values = grad.indices()[0], grad.values()
    keep = (index >= piece.start) & (index < piece.stop)
    out = torch.zeros(piece.shape, dtype=dtype, device=values.device)
    # Coalesced: each row once, so a plain (deterministic) indexed write.
    return out.index_put_((index[keep] - piece.start,), values[keep].to(dtype))


# What to keep the same for each setting a checkpoint records (HiftUpdate.resume_settings).
RESUME_KEYS = {"groups": "hift.k / hift.m, hift.grouping, hift.max_unit_params and model"}


def _setting(key: str, value) -> str:
    if key == "groups":
        return f"{len(value)} group(s) ({'; '.join(','.join(g) for g in value)})"[:160]
    return f"{key}={value}"
