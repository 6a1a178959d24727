"""What every suite of ``make bench`` reads back from a training run: one reader of the
files ``hift train`` writes (``metrics.jsonl``, ``summary.json``, ``memory_report.json``,
``config.yaml``), for HiFT's runs and the peers' alike (both run hift's loop).
"""

from __future__ import annotations

import json
from pathlib import Path


def collect(run_dir: Path, metric: str = "eval/loss", higher_is_better: bool = False, *,
            also: str | None = None, peak_rss: int | None = None) -> dict:
    """One run: its speed, memory and evaluations.

    - ``steps``, ``groups``, ``cycles``, ``updates_per_group``, ``epochs_trained``,
      ``params_updated_per_step``;
    - ``train_seconds`` (steps only, evaluation excluded), ``tokens``,
      ``mean_step_seconds``, ``tokens_per_second``, ``train_loss`` ([step, loss] pairs);
    - ``peak_rss_gib``: ``peak_rss`` (bytes, e.g. the process's own from ``wait4``), else
      what the run measured itself (``memory_report.json``);
    - ``curve``: every evaluation of ``metric`` (the one before training at step 0
      included) with its step, epoch, and the training seconds and tokens spent until
      then; ``evals``: those after training began; ``before``, ``best`` (by
      ``higher_is_better``), ``final``;
    - ``also``: a loss beside the metric (lower is better): its best and final.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in rows if "step_seconds" in r]
    seconds = tokens = 0.0
    at_step = {0: (0.0, 0.0)}  # step -> training seconds and tokens at its end
    cycles = 0
    for r in steps:
        seconds += r["step_seconds"]
        tokens += r["tokens_per_second"] * r["step_seconds"]
        at_step[r["step"]] = (seconds, tokens)
        cycles = max(cycles, r.get("cycle", 0) + 1)
    curve = [{"step": r["step"], "epoch": r.get("epoch"), "value": r[metric],
              "seconds": at_step.get(r["step"], (seconds, tokens))[0],
              "tokens": at_step.get(r["step"], (seconds, tokens))[1]}
             for r in rows if metric in r]
    evals = [c for c in curve if c["step"] > 0]
    pick = max if higher_is_better else min
    if peak_rss is None:
        memory = run_dir / "memory_report.json"
        peak_rss = (json.loads(memory.read_text())["measured"].get("peak_rss", 0)
                    if memory.exists() else 0)
    out = {
        "steps": len(steps), "groups": summary.get("groups"), "cycles": cycles,
        "updates_per_group": len(steps) / (summary.get("groups") or 1),
        "epochs_trained": len(steps) * _batch(run_dir) / summary["data/train_samples"],
        "params_updated_per_step": summary["train/params_updated_per_step"],
        "train_seconds": seconds, "tokens": tokens,
        "mean_step_seconds": seconds / len(steps), "tokens_per_second": tokens / seconds,
        "train_loss": [(r["step"], r["train/loss"]) for r in steps],
        "peak_rss_gib": peak_rss / 2**30,
        "curve": curve, "evals": evals,
        "before": curve[0]["value"] if curve and curve[0]["step"] == 0 else None,
        "best": pick(evals, key=lambda c: c["value"]) if evals else None,
        "final": evals[-1] if evals else None,
    }
    if also:
        losses = [r[also] for r in rows if also in r and r["step"] > 0]
        out["also"] = {"best": min(losses), "final": losses[-1]}
    for key in ("eval/accuracy", "eval/accuracy_before"):
        if key in summary:
            out[key.replace("eval/", "eval_")] = summary[key]
    return out


def _batch(run_dir: Path) -> int:
    """Samples per step of the run (its config.yaml)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    return int(cfg.trainer.batch_size) * int(cfg.trainer.grad_accum)


def point(c: dict) -> dict:
    """An evaluation as the suites' results keep it (step, epoch, value, training seconds)."""
    return {k: c[k] for k in ("step", "epoch", "value", "seconds")}
