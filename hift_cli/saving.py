"""Writing a run out: resumable checkpoints (every rank's part under torchrun, rank 0
the rest) and the final ``model/`` folder, with the disk-space checks before them.

The trainer hands over what to write: its model and tokenizer, and its resumable state as
a callable (``HiftTrainer.state_dict``); ``checkpoint.py`` does the atomic file work. Like
it, this module knows nothing of the trainer: what the state means is the trainer's.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from hift_cli import distributed
from hift_cli.checkpoint import (
    MARKER,
    SHARDS,
    STATE_FILE,
    WRITE_ERRORS,
    CheckpointError,
    DiskSpaceError,
    checkpoints_dir,
    clear_staged_shards,
    require_space,
    save_checkpoint,
    stage_shard,
    tensor_bytes,
    write_failure,
)
from hift_cli.config import TrainerConfig
from hift_cli.offload import state_shapes

log = logging.getLogger(__name__)


class Saver:
    """Checkpoints and the final model of one run in ``output_dir``.

    Args:
        model, tokenizer: what ``model/`` and each checkpoint's model files hold.
        state: the resumable state at the current step (collective under torchrun).
        step: the current step (names the checkpoint).
        tcfg: ``keep_last``, ``save_model``, ``save_final_state``.
        dist, sharded: the processes, and whether the weights are sharded over them
            (FSDP2: every rank writes its part, rank 0 the gathered model).
    """

    def __init__(self, output_dir: Path, model: torch.nn.Module, tokenizer,
                 state: Callable[[], dict], step: Callable[[], int], tcfg: TrainerConfig,
                 dist, sharded: bool):
        self.output_dir, self.model, self.tokenizer = output_dir, model, tokenizer
        self.state, self.step, self.tcfg = state, step, tcfg
        self.dist, self.sharded = dist, sharded

    def write_model(self, path: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The model (safetensors) and tokenizer, loadable with plain ``from_pretrained``;
        ``weights``: the full weights to write (sharded: gathered by :meth:`checkpoint`)."""
        self.model.config.use_cache = True  # for whoever generates with it
        try:
            self.model.save_pretrained(path, state_dict=weights)
        finally:
            self.model.config.use_cache = False
        self.tokenizer.save_pretrained(path)
        # Some writers create private (0600) files: every file as the umask says, like
        # the rest of the run (shared clusters read each other's models).
        mode = 0o666 & ~_UMASK
        for f in Path(path).iterdir():
            if f.is_file():
                os.chmod(f, mode)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def checkpoint(self, keep_last: int | None = None) -> Path:
        """A resumable checkpoint of this step (the newest ``keep_last``, default
        ``trainer.keep_last``, are kept), written by rank 0 while the others wait.
        Sharded weights: every rank also writes its part of the weights, optimizer state
        and masters (``shards/``), and rank 0 the gathered model. A failure on any rank
        stops every rank with its message."""
        if self.sharded:
            distributed.reshard(self.model)  # the parts below are the shards, not a gathered root
        state, step = self.state(), self.step()
        # Sharded: gathered on rank 0 (collective), and every rank checks its part.
        weights = distributed.full_state_dict(self.model) if self.sharded else None
        if weights:  # gathered copies share no storage: drop tied duplicates by name
            weights = {k: v for k, v in weights.items() if k not in tied_names(self.model)}
        self._on_every_rank(self._check_finite, here=self.dist.main or self.sharded)
        staged = None
        if self.sharded:
            if self.dist.main:
                clear_staged_shards(self.output_dir, step)
            distributed.barrier()
            optimizer = state["optimizer"]
            shard = {"model": {n: distributed.local(p) for n, p in self.model.named_parameters()},
                     "optimizer": {"state": optimizer.pop("state"),
                                   "sharded": optimizer.pop("sharded")},
                     "masters": state.pop("masters")}
            staged = self._on_every_rank(lambda: stage_shard(
                self.output_dir, step, self.dist.rank, self.dist.world, shard))
        model_bytes = tensor_bytes(weights) if weights else self.weight_bytes()
        path = self._on_every_rank(lambda: save_checkpoint(
            self.output_dir, step, state, functools.partial(self.write_model, weights=weights),
            keep_last or self.tcfg.keep_last, shards=staged, model_bytes=model_bytes),
            here=self.dist.main)
        return distributed.broadcast_object(path)

    def _check_finite(self) -> None:
        if not all(bool(torch.isfinite(distributed.local(p)).all())
                   for p in self.model.parameters()):
            raise CheckpointError("refusing to save a checkpoint: the weights are not finite")

    def _on_every_rank(self, fn, here: bool = True):
        """``fn()`` on this rank if ``here``; a CheckpointError on any rank is raised on
        every rank (under torchrun, no rank is left waiting for one that failed)."""
        result, error = None, None
        if here:
            try:
                result = fn()
            except CheckpointError as e:
                error = e
        errors = [e for e in distributed.gather_objects(str(error) if error else None) if e]
        if error is not None:
            raise error  # its own kind (and exit code)
        if errors:
            raise CheckpointError(errors[0])
        return result

    def save(self) -> Path | None:
        """A last resumable checkpoint, and its model as ``<output_dir>/model``
        (``trainer.save_final_state=false``: the model alone, and no checkpoints)."""
        if not self.tcfg.save_model:
            return None
        if not self.tcfg.save_final_state and not self.sharded:
            return self._save_model_only()
        checkpoint = self.checkpoint()
        if not self.dist.main:
            return self.output_dir / "model"
        path = self.output_dir / "model"
        try:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            for f in checkpoint.iterdir():
                if f.name not in (MARKER, STATE_FILE, SHARDS):
                    try:
                        os.link(f, path / f.name)  # same bytes, no second copy on disk
                    except OSError:
                        shutil.copy2(f, path / f.name)
        except OSError as e:
            raise CheckpointError(f"cannot write the model to {path}: {e.strerror or e}"
                                  ) from None
        if not self.tcfg.save_final_state:  # sharded: gathered through the checkpoint
            self._drop_checkpoints(path)
        return path

    def _save_model_only(self) -> Path:
        """``<output_dir>/model`` written on its own (atomically), the checkpoints dropped."""
        path = self.output_dir / "model"
        if not self.dist.main:
            return path
        self._check_finite()
        require_space(self.output_dir, self.weight_bytes(), f"the model {path}")
        tmp = self.output_dir / ".tmp-model"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            self.write_model(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        except WRITE_ERRORS as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskSpaceError(f"cannot write the model to {path}: {write_failure(e)}"
                                 ) from None
        self._drop_checkpoints(path)
        return path

    def _drop_checkpoints(self, model: Path) -> None:
        shutil.rmtree(checkpoints_dir(self.output_dir), ignore_errors=True)
        log.info(f"trainer.save_final_state=false: kept {model} only (no optimizer state, no"
                 " checkpoints: this run cannot be resumed)")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str,
                 sharded: bool) -> None:
    """Saved weights into ``model`` (sharded: this rank's part of every weight, as
    :meth:`Saver.checkpoint` saved it).

    Raises:
        CheckpointError: they are another model's (``source`` names them).
    """
    if sharded:
        distributed.reshard(model)  # write into the shards, not into a gathered root
        params = dict(model.named_parameters())
        if params.keys() != weights.keys():
            raise CheckpointError(f"{source} does not match this model (its shards hold"
                                  f" {len(weights)} weights, the model has {len(params)})")
        with torch.no_grad():
            for name, p in params.items():
                distributed.local(p).copy_(weights[name])
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights are saved once; anything else missing is a different model.
    if unexpected or set(missing) - tied_names(model):
        raise CheckpointError(f"{source} does not match this model (missing"
                              f" {sorted(missing)[:3]}, unexpected {unexpected[:3]})")


def state_bytes(params: list[torch.Tensor], factory: Callable) -> int:
    """About what the optimizer state of ``params`` takes in a checkpoint (its layout
    learnt as the offload store learns it, by stepping a fresh ``factory`` optimizer on
    meta tensors of each shape)."""
    shapes: dict = {}
    total = 0
    for p in params:
        key = (tuple(distributed.local(p).shape), p.dtype)
        if key not in shapes:
            try:
                shapes[key] = state_shapes(factory, *key)
            except RuntimeError:  # no telling in advance: the weights' size again
                shapes[key] = {"guess": (torch.Size(key[0]), key[1])}
        total += sum(s.numel() * dt.itemsize for s, dt in shapes[key].values())
    return total


def tied_names(model) -> set[str]:
    """Parameter names that share storage with an earlier name (tied weights)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


_UMASK = os.umask(0o022)  # read once, at import (os.umask can only read by setting)
os.umask(_UMASK)
