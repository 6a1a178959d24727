"""Crash-safe checkpoints that resume bit-exactly.

A checkpoint is ``<run>/checkpoints/step-<N>/`` holding the model (``save_pretrained``,
safetensors), its tokenizer, and ``training_state.pt``: the optimizer state of every group
(and of the always-active units, whose names it records), fp32 masters, scheduler, step
counter, batches consumed (the data order is a function of the seed and that count),
skipped-step counters and every RNG state. The group order needs nothing saved: step N's
group follows from the strategy, the seed and N. Checkpoints are taken between steps, so a
gradient-accumulation window is never cut in half.

Writes go to a hidden temporary folder, are fsynced, renamed into place, and only then
marked with a ``COMPLETE`` file; a folder without the marker is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from hift_cli.config import ConfigError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"


class CheckpointError(ConfigError):
    """The checkpoint could not be written or read (reported in one line)."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; incomplete ones are warned about."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("step-*")):
        if (path / MARKER).is_file():
            found.append(path)
        else:
            log.warning(f"Skipping incomplete checkpoint {path} (no {MARKER} marker)")
    return found


def find_resume(resume: str, outputs_root: Path) -> Path:
    """The checkpoint ``resume`` names: ``latest`` (newest run under ``outputs_root`` that
    has a complete checkpoint), a run dir, or a checkpoint dir."""
    if resume == "latest":
        runs = sorted((p for p in outputs_root.glob("*") if complete_checkpoints(p)),
                      key=lambda p: complete_checkpoints(p)[-1].stat().st_mtime)
        if not runs:
            raise CheckpointError(f"resume=latest: no complete checkpoint under {outputs_root}")
        return complete_checkpoints(runs[-1])[-1]
    path = Path(resume).expanduser()
    if (path / MARKER).is_file():
        return path
    run = path.parent if path.name == "checkpoints" else path
    if (run / "checkpoints").is_dir():
        found = complete_checkpoints(run)
        if found:
            return found[-1]
    if path.is_dir() and path.name.startswith("step-"):
        raise CheckpointError(f"resume={resume}: checkpoint is incomplete (no {MARKER} marker)")
    raise CheckpointError(f"resume={resume}: no complete checkpoint there")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's key array as a tensor: torch.load(weights_only=True) accepts it.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(trainer, keep_last: int, rng_ranks: list | None = None) -> Path:
    """Write a complete checkpoint of ``trainer`` atomically; rotate old ones.

    ``rng_ranks``: every rank's RNG state (data parallel; rank 0 writes for all).

    Raises:
        CheckpointError: the run dir cannot be written; earlier checkpoints are untouched.
    """
    root = checkpoints_dir(trainer.output_dir)
    final = root / f"step-{trainer.global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    for p in trainer.model.parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError("refusing to save a checkpoint: the weights are not finite")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer.write_model(tmp)
        with trainer.store.readable():  # offloaded state: its host copies have landed
            state = {
                "global_step": trainer.global_step,
                "batches_consumed": trainer.batches_consumed,
                "bad_steps": trainer.bad_steps,
                "skipped_steps": trainer.skipped_steps,
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "masters": [m.data for m in _masters(trainer)],
                "always_active": _always_active(trainer),
                "rng": rng_state(),
                "rng_ranks": rng_ranks or [],
            }
            torch.save(state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(final / MARKER, "w") as f:
            json.dump({"step": trainer.global_step}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_tree(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(trainer.output_dir)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}{kept}"
                              ) from None
    for old in complete_checkpoints(trainer.output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer, path: Path) -> None:
    """Restore weights, optimizer/scheduler/RNG state and counters into a set-up trainer."""
    from safetensors.torch import load_file

    try:
        weights = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(load_file(f, device=str(trainer.device)))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}"
                              ) from None
    missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
    # Tied weights are saved once; anything else missing is a different model.
    if unexpected or set(missing) - _tied_names(trainer.model):
        raise CheckpointError(f"checkpoint {path} does not match this model"
                              f" (missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})")
    # The optimizer's parameter order puts always-active units last: another choice of
    # them would hand saved state to the wrong parameters.
    saved_always = state.get("always_active", [])
    if saved_always != _always_active(trainer):
        raise CheckpointError(f"checkpoint {path} was saved with hift.always_active="
                              f"[{','.join(saved_always)}]: resume with the same setting")
    store = trainer.store
    store.reset()  # offloaded masters: written in place into their host buffers
    for m, saved in zip(_masters(trainer), state["masters"]):
        m.data.copy_(saved)
    # Always-active units' state lives on the device even while the store offloads.
    always = {id(p) for p in getattr(trainer, "always_opt", [])}
    _restore_optimizer(trainer.optimizer, state["optimizer"],
                       None if store.enabled else trainer.device, trainer.device, always)
    store.restore()  # straight from the loaded CPU copy into the host buffers
    if hasattr(trainer.optimizer, "initialized"):
        # bitsandbytes: its first step() would move every group's state to the GPU.
        trainer.optimizer.initialized = True
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.global_step = state["global_step"]
    trainer.batches_consumed = state["batches_consumed"]
    trainer.bad_steps = state["bad_steps"]
    trainer.skipped_steps = state["skipped_steps"]
    trainer.restart_batches()
    ranks = state.get("rng_ranks") or []
    rank, world = trainer.dist.rank, trainer.dist.world
    _set_rng_state(ranks[rank] if len(ranks) == world else state["rng"])


def _masters(trainer) -> list[torch.Tensor]:
    """Every fp32 master (bf16-mixed): the groups', then the always-active units'."""
    if not trainer.masters:
        return []
    return [m for ps in trainer.opt_params for m in ps] + list(getattr(trainer, "always_opt", []))


def _always_active(trainer) -> list[str]:
    return [u.name for u in getattr(trainer, "always", [])]


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict,
                       device: torch.device | None, compute_device: torch.device,
                       resident: set[int] = frozenset()) -> None:
    """Like ``Optimizer.load_state_dict``, without moving every group's state to the
    device at once (which offloading exists to avoid): state stays on the CPU for the
    store to take, or goes to ``device`` when nothing is offloaded; the state of the
    parameters in ``resident`` (ids: always-active units) goes to ``compute_device``
    either way. Scalar step counters
    go where ``load_state_dict`` puts them: with ``fused`` or ``capturable`` to the
    ``compute_device`` as float32, else they stay on the CPU."""
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    optimizer.state.clear()
    for index, entry in saved["state"].items():
        p, group = params[int(index)]
        on_device = bool(group.get("fused") or group.get("capturable"))
        state = {}
        to = compute_device if id(p) in resident else device
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0 and to is not None:
                v = v.to(to)
            elif k == "step" and torch.is_tensor(v) and on_device:
                v = v.to(dtype=torch.float32, device=compute_device)
            state[k] = v
        optimizer.state[p] = state
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _tied_names(model) -> set[str]:
    """Parameter names that share storage with an earlier name (tied weights)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied
