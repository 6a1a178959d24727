"""Crash-safe checkpoints that resume bit-exactly.

A checkpoint is ``<run>/checkpoints/step-<N>/`` holding the model (``save_pretrained``,
safetensors), its tokenizer, and ``training_state.pt``: the trainer's
:meth:`~hift_cli.engine.HiftTrainer.state_dict` (the optimizer state of every group and of
the always-active units, whose names it records, fp32 masters, scheduler, step counter,
batches consumed: the data order is a function of the seed and that count, skipped-step
counters and every RNG state). This module only writes and reads them; what goes in
them is the trainer's business. Checkpoints are taken between steps, so a
gradient-accumulation window is never cut in half.

With ``trainer.shard_weights`` each rank's part of the weights, optimizer state and
masters goes to ``shards/rank-<r>-of-<N>.pt`` beside them (staged by every rank, moved in
by rank 0), and the model files are the gathered full weights.

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
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError

from hift_cli.errors import HiftError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"
SHARDS = "shards"  # trainer.shard_weights: one file per rank


class CheckpointError(HiftError):
    """The checkpoint could not be written or read (reported in one line): a checkpoint
    that does not fit the run is the user's input, exit code 2."""

    exit_code = 2


class DiskSpaceError(CheckpointError):
    """Writing failed, or would: an I/O error's exit code, not bad input's."""

    exit_code = 74  # EX_IOERR (sysexits.h)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or would: its nearest existing
    parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_space(path: Path, need: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` if ``path``'s file system has less than ``need``
    bytes free (plus 1% and 256 KiB: tokenizer and config files, file system overhead)."""
    free = free_bytes(path)
    if free < need * 1.01 + 2**18:
        raise DiskSpaceError(f"{what} needs ~{_size(need)} and {path} has {_size(free)} free:"
                             " free some space or put the run elsewhere (hydra.run.dir=...)")


# What writing a model or a checkpoint raises when it fails (torch.save reports a full
# disk as a RuntimeError: "iostream error", "unexpected pos").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def write_failure(e: BaseException) -> str:
    """One line saying why a write failed."""
    text = str(e).strip()
    return getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


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


def set_rng_state(state: dict) -> None:
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


def _staging(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".shards-step-{step:08d}"


def _shard_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.pt"


def clear_staged_shards(run_dir: Path, step: int) -> None:
    """Before the ranks stage a step's shards: drop what a killed run left there."""
    shutil.rmtree(_staging(run_dir, step), ignore_errors=True)


def stage_shard(run_dir: Path, step: int, rank: int, world: int, shard: dict) -> Path:
    """Write one rank's part of a sharded checkpoint (fsynced) where
    :func:`save_checkpoint` will take it from; returns that folder.

    Raises:
        CheckpointError: it cannot be written.
    """
    staging = _staging(run_dir, step)
    path = staging / _shard_name(rank, world)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        torch.save(shard, path)
        _fsync_tree(path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint shard {path}: {e.strerror or e}"
                              ) from None
    return staging


def save_checkpoint(run_dir: Path, step: int, state: dict,
                    write_model: Callable[[Path], None], keep_last: int,
                    shards: Path | None = None, model_bytes: int = 0) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>`` atomically and rotate old ones.

    Args:
        state: the training state (saved as ``training_state.pt``).
        write_model: writes the model's files (a Hugging Face folder) into a directory.
        keep_last: how many complete checkpoints to keep, this one included.
        shards: the folder :func:`stage_shard` filled (sharded weights), moved in.
        model_bytes: what ``write_model`` writes (the free space is checked first).

    Raises:
        DiskSpaceError: not enough free space, or writing failed; no partial folder is
            left and earlier checkpoints are untouched.
    """
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    need = tensor_bytes(state) + model_bytes
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt's
    try:
        require_space(root, need, f"checkpoint {final}")
    except DiskSpaceError:
        if shards is not None:
            shutil.rmtree(shards, ignore_errors=True)
        raise
    try:
        tmp.mkdir(parents=True)
        write_model(tmp)
        torch.save(state, tmp / STATE_FILE)
        if shards is not None:
            os.replace(shards, tmp / SHARDS)
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(final / MARKER, "w") as f:
            json.dump({"step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_tree(root)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if shards is not None:
            shutil.rmtree(shards, ignore_errors=True)
        previous = complete_checkpoints(run_dir)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise DiskSpaceError(f"cannot write checkpoint {final}: {write_failure(e)} (it needs"
                             f" ~{_size(need)}, {_size(free_bytes(root))} free){kept}"
                             ) from None
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """The training state saved at ``path``, with the weights (on ``device``) under
    ``"model"``: what :meth:`~hift_cli.engine.HiftTrainer.load_state_dict` takes. A
    sharded checkpoint gives rank ``rank`` of ``world`` its own part of the weights,
    optimizer state and masters.

    Raises:
        CheckpointError: it cannot be read, or it was sharded over another number of
            processes.
    """
    from safetensors.torch import load_file

    shards = sorted((path / SHARDS).glob("rank-*.pt"))
    if shards and len(shards) != world:
        raise CheckpointError(f"checkpoint {path} was saved by {len(shards)} processes sharding"
                              f" the weights: resume it with {len(shards)} processes and"
                              " trainer.shard_weights=true")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if shards:
            part = torch.load(path / SHARDS / _shard_name(rank, world), map_location="cpu",
                              weights_only=True)
            state["optimizer"].update(part["optimizer"])
            weights = {k: v.to(device) for k, v in part["model"].items()}
            return {**state, "masters": part["masters"], "model": weights}
        weights = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(load_file(f, device=str(device)))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}"
                              ) from None
    return {**state, "model": weights}
