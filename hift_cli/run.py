"""The task behind ``hift train``: find what to resume, set up, train, save, and write the
run's reports (config.yaml, plan.yaml, summary.json, loss.png, memory_report.json).

The training loop itself is :class:`hift_cli.engine.HiftTrainer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shutil
import resource
import signal
import threading
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from rich.console import Console

from hift_cli import distributed
from hift_cli.checkpoint import find_resume
from hift_cli.config import Config, ConfigError
from hift_cli.engine import HiftTrainer
from hift_cli.memory import estimate, render
from hift_cli.report import plot_loss
from hift_cli.update import Update

log = logging.getLogger(__name__)


def run_training(cfg: Config, output_dir: str | Path,
                 update: Callable[[HiftTrainer], Update] | None = None) -> dict[str, float]:
    """The task function behind ``hift train``: set up, train, save; returns final metrics.

    ``update``: builds another update rule than HiFT's from the set-up trainer (the
    benchmark's peers); such a run saves no checkpoints and resumes none.
    """
    output_dir = Path(output_dir)
    if update is not None and (cfg.resume or cfg.trainer.save_model or cfg.trainer.save_every):
        raise ConfigError("another update rule than HiFT's has no resumable state: no resume,"
                          " trainer.save_model=false, trainer.save_every=null")
    resume = find_resume(cfg.resume, output_dir.parent) if cfg.resume else None
    main = distributed.current().main  # data parallel: rank 0 alone writes files
    if resume is not None:
        stray, output_dir = output_dir, resume.parent.parent  # on in the run that wrote it
        if main and stray.resolve() != output_dir.resolve():
            _move_log(stray, output_dir)
        log.info(f"Resuming from {resume}")
    resolved = OmegaConf.structured(cfg)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(resolved, output_dir / "config.yaml", resolve=True)
    trainer = HiftTrainer(cfg, output_dir)
    trainer.setup()
    if main:  # what the settings come to (steps from epochs, cycles), beside config.yaml
        OmegaConf.save(OmegaConf.create(dataclasses.asdict(trainer.plan)),
                       output_dir / "plan.yaml")
    rule = update(trainer) if update is not None else None
    # Only now, so that a setup error (bad data, model) is the last thing on the screen.
    log.info(f"Config: {output_dir / 'config.yaml'} (print it with --cfg job)")
    if resume is not None:
        trainer.resume(resume)
        if main:
            _truncate_metrics(output_dir / "metrics.jsonl", trainer.global_step)
    with _stop_on_signals(trainer):
        # A resumed run was evaluated before its first step already.
        metrics = trainer.train(eval_before=False if resume is not None else None,
                                update=rule)
    saved = trainer.save()
    metrics.update({"data/train_samples": len(trainer.train_set), "groups": len(trainer.groups)})
    metrics.update(trainer.evaluator.info())  # e.g. the exact-match rule (a string)
    if trainer.dist.enabled:
        metrics["dist/world_size"] = trainer.dist.world
    if not main:
        return metrics
    with open(output_dir / "summary.json", "w") as f:
        json.dump(metrics, f, indent=2)
    # Reports after a successful training: one that fails costs a warning, not the run.
    for what, write in (
            ("loss.png", lambda: plot_loss(output_dir / "metrics.jsonl", output_dir / "loss.png",
                                           len(trainer.groups))),
            ("memory_report.json",
             lambda: write_memory_report(cfg, trainer, output_dir, estimated=rule is None))):
        try:
            write()
        except Exception as e:
            log.warning(f"warning: {what} not written ({type(e).__name__}:"
                        f" {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    for key in ("eval/loss", "eval/accuracy", "eval/exact_match"):
        if f"{key}_before" in metrics and key in metrics:
            log.info(f"{key.removeprefix('eval/').replace('_', ' ').capitalize()}"
                     f" {metrics[key + '_before']:.4f} -> {metrics[key]:.4f}")
    log.info(f"Output: {output_dir}" + (f" (model: {saved})" if saved else ""))
    return metrics


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint; the resumed run redoes them."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in rows))


def _move_log(stray: Path, run: Path) -> None:
    """A resumed run logs on in its own ``train.log`` (appended), and the folder Hydra
    made for this command goes: its ``.hydra/`` records move to ``<run>/.hydra/resumed-
    <name>/``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and \
                Path(handler.baseFilename).parent == stray.resolve():
            moved = logging.FileHandler(run / Path(handler.baseFilename).name, mode="a")
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
    records = stray / ".hydra"
    if records.is_dir():
        shutil.move(str(records), str(run / ".hydra" / f"resumed-{stray.name}"))
    if all(p.suffix == ".log" for p in stray.rglob("*") if p.is_file()):
        shutil.rmtree(stray, ignore_errors=True)


def write_memory_report(cfg: Config, trainer: HiftTrainer, output_dir: Path,
                        estimated: bool = True) -> None:
    """``memory_report.json``: the estimate for this run's settings (``estimated``: HiFT's
    update rule, which it estimates), and what was measured."""
    report = estimate(trainer.estimate_input()) if estimated else {}
    if trainer.device.type == "cuda":
        report["measured"] = {"cuda_peak_allocated": torch.cuda.max_memory_allocated()}
    else:  # ru_maxrss is in KiB on Linux
        report["measured"] = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(output_dir / "memory_report.json", "w") as f:
        json.dump(report, f, indent=2)
    if not estimated:
        return
    text = io.StringIO()
    Console(file=text, width=120).print(render(report))
    log.info("Memory (estimate at data.max_length):\n" + text.getvalue().rstrip())


@contextlib.contextmanager
def _stop_on_signals(trainer: HiftTrainer):
    """SIGINT / SIGTERM: finish the current step, checkpoint, stop (see the loop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        log.warning(f"{signal.Signals(signum).name}: finishing this step, then saving a"
                    " checkpoint (again to stop at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
