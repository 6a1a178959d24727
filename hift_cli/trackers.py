"""Experiment trackers: every metrics row also goes to TensorBoard, W&B and/or MLflow.

``trainer.loggers`` picks them; ``metrics.jsonl`` (``jsonl``) is always written by the
engine. Each library is imported only when its tracker is asked for, and each is an
optional extra (``pip install 'hift-cli[tensorboard]'``, ``[wandb]``, ``[mlflow]``);
:func:`hift_cli.config.check_installed` refuses a missing one at config validation, before any model
loads.

Where they write, by default all inside the run dir:

* ``tensorboard``: event files in the run dir itself, so ``tensorboard --logdir outputs``
  (or a sweep's ``multirun/...`` folder) shows one run per run dir.
* ``wandb``: ``<run dir>/wandb/``; ``WANDB_MODE=offline`` logs without an account or
  network (``wandb sync`` uploads later). ``WANDB_PROJECT`` (default ``hift``) and
  wandb's other environment variables apply.
* ``mlflow``: a file store ``<run dir>/mlruns`` (``mlflow ui --backend-store-uri
  <run dir>/mlruns``), or the server/store in ``MLFLOW_TRACKING_URI`` when set.
  Experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``hift``).

Each run dir is one tracker run (a sweep: one per job), named after the run dir and
closed at the end of the job, also when training stops with an error. A resumed run
continues in its run dir: TensorBoard drops the events after the checkpoint, W&B and
MLflow append to the run whose ids ``trackers.json`` in the run dir keeps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hift_cli.config import ConfigError, check_installed
from hift_cli.errors import TrainingStopped

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"  # the W&B / MLflow run ids, for resume


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A (dataclass) config as one level of dotted keys: ``{"hift.k": 4, ...}``."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, dict):  # an empty mapping (data.task_options): nothing set
            out[name] = None
        else:
            out[name] = value
    return out


def _scalars(row: dict) -> tuple[int, dict[str, float]]:
    """The row's step and its numeric values (bools as 0/1), step left out."""
    values = {k: float(v) for k, v in row.items()
              if k != "step" and isinstance(v, (int, float))}
    return int(row["step"]), values


class Trackers:
    """The trackers named in ``names`` for one run; a context manager that closes them.

    ``hparams``: the resolved config (a :class:`~hift_cli.config.Config` or a flat dict),
    logged once as hyperparameters. ``enabled=False`` (ranks other than 0) makes every
    call a no-op. ``start_step``: the step a resumed run continues from (0: a new run).
    """

    def __init__(self, names, run_dir: str | Path, hparams: Any, enabled: bool = True,
                 start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.start_step = start_step
        self._open: list[tuple[str, Any]] = []
        names = list(dict.fromkeys(n for n in names if n != "jsonl"))
        if not enabled or not names:
            return
        check_installed(names)
        self.hparams = hparams if isinstance(hparams, dict) else flatten(hparams)
        ids = self._stored_ids() if start_step > 0 else {}
        for name in names:
            try:
                self._open.append((name, getattr(self, f"_open_{name}")(ids.get(name))))
            except BaseException as e:
                self.close(failed=True)
                if not isinstance(e, Exception):
                    raise
                # e.g. W&B online without `wandb login`, an MLflow server out of reach
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ConfigError(f"trainer.loggers: {name} could not start a run:"
                                  f" {type(e).__name__}: {reason}") from e
        stored = {name: handle.run_id for name, handle in self._open
                  if getattr(handle, "run_id", None)}
        if stored:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / IDS_FILE).write_text(json.dumps(stored, indent=2) + "\n")

    # ------------------------------------------------------------------ the interface
    def log(self, row: dict) -> None:
        """One metrics row (``step`` plus named values) to every open tracker."""
        if not self._open:
            return
        step, values = _scalars(row)
        if not values:
            return
        for entry in list(self._open):
            name, handle = entry
            try:
                handle.log(step, values)
            except Exception as e:  # the run goes on; metrics.jsonl still has every row
                log.warning(f"warning: {name} tracker failed ({type(e).__name__}: {e});"
                            " it logs nothing more in this run")
                self._open.remove(entry)
                self._close_one(name, handle, "FAILED")

    def close(self, failed: bool = False, interrupted: bool = False) -> None:
        """Finish every tracker run (marked failed / killed when training did not end)."""
        status = "KILLED" if interrupted else "FAILED" if failed else "FINISHED"
        while self._open:
            self._close_one(*self._open.pop(), status)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Ctrl-C, or a stop on SIGINT/SIGTERM (TrainingStopped, exit code 128 + signal):
        # killed; any other exception (non-finite steps, out of memory, a bug): failed.
        killed = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, TrainingStopped) and exc.exit_code >= 128)
        self.close(failed=exc is not None and not killed, interrupted=killed)

    @staticmethod
    def _close_one(name: str, handle: Any, status: str) -> None:
        try:
            handle.close(status)
        except Exception as e:  # never hide the error that ended training
            log.warning(f"warning: closing the {name} tracker failed ({type(e).__name__}: {e})")

    def _stored_ids(self) -> dict[str, str]:
        try:
            return json.loads((self.run_dir / IDS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------ the trackers
    def _open_tensorboard(self, _run_id) -> "_TensorBoard":
        return _TensorBoard(self.run_dir, self.hparams, self.start_step)

    def _open_wandb(self, run_id) -> "_Wandb":
        return _Wandb(self.run_dir, self.hparams, run_id)

    def _open_mlflow(self, run_id) -> "_Mlflow":
        return _Mlflow(self.run_dir, self.hparams, run_id)


class _TensorBoard:
    run_id = None

    def __init__(self, run_dir: Path, hparams: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # A resumed run redoes the steps after its checkpoint: drop those events.
        self.writer = SummaryWriter(log_dir=str(run_dir),
                                    purge_step=start_step + 1 if start_step else None)
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                  for k, v in hparams.items()}
        for summary in hparams_summary(values, {"train/loss": 0.0, "eval/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + "\n".join(
            f"{k}: {v}" for k, v in hparams.items()) + "\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, hparams: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "hift"), name=run_dir.name,
            dir=str(run_dir), config=hparams, id=run_id,
            resume="allow" if run_id else None)
        self.run_id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class _Mlflow:
    # Recent MLflow (3.x) refuses a file store unless this opts in.
    FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"

    def __init__(self, run_dir: Path, hparams: dict, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.resolve() / "mlruns").as_uri()
        os.environ.setdefault(self.FILE_STORE_OPT_IN, "true")  # only file stores read it
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._resumed(run_id)
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hift")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None \
                else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name
                                                 ).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in hparams.items()]
            for i in range(0, len(params), 100):  # log_batch takes 100 params at most
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _resumed(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:  # not in this store (e.g. another MLFLOW_TRACKING_URI): a new run
            return None
        return run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key, value, now, step) for key, value in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
