"""The step meter: each step's metrics row, the non-finite steps, the run's totals.

A row (metrics.jsonl, the trackers, the progress line) says what a step did: its loss and
LR, the group it trained, its speed, the state the offload store moved and the gradient
bytes data parallelism sent. The totals add the rows up for the run's summary.
"""

from __future__ import annotations

import collections

from hift_cli.errors import TrainingStopped
from hift_cli.offload import TransferStats
from hift_cli.progress import RunLog
from hift_cli.update import StepResult

# Per-step transfer counters the summary adds up.
SUMMED = ("offload/stall_seconds", "offload/h2d_bytes", "offload/d2h_bytes",
          "dist/allreduce_bytes", "dist/reduce_scatter_bytes")


class StepMeter:
    """Rows and totals of the steps of one run (``dist``: the processes; ``sharded``:
    FSDP2, whose gradients are reduce-scattered rather than all-reduced)."""

    def __init__(self, max_bad_steps: int, dist, sharded: bool):
        self.max_bad_steps, self.dist, self.sharded = max_bad_steps, dist, sharded
        self.bad_steps = 0  # non-finite steps in a row
        self.skipped_steps = 0
        self.totals: collections.Counter = collections.Counter()

    @property
    def sync_key(self) -> str:
        """The metrics key of the gradient bytes that crossed the wire in a step."""
        return "dist/reduce_scatter_bytes" if self.sharded else "dist/allreduce_bytes"

    def start(self) -> None:
        """A ``train()`` call begins: its totals start from zero."""
        self.totals = collections.Counter()

    def row(self, step: int, epoch: float, cycle: int, done: StepResult, tokens: int,
            seconds: float) -> dict:
        """Step ``step`` (1-based) is done: count it, add it to the totals and return its
        metrics row."""
        if done.finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
        row = {"step": step, "epoch": epoch, "cycle": cycle,
               **({"group": done.group.index} if done.group is not None else {}),
               "train/loss": done.loss, "lr": done.lr,
               "tokens_per_second": tokens / seconds,
               "step_seconds": seconds, "train/skipped": int(not done.finite),
               "offload/stall_seconds": done.moved.stall_seconds,
               "offload/h2d_bytes": done.moved.h2d_bytes,
               "offload/d2h_bytes": done.moved.d2h_bytes}
        if self.dist.enabled:
            row[self.sync_key] = done.synced
        self.totals.update({k: v for k, v in row.items() if k in SUMMED},
                           tokens=tokens, updated=done.updated)
        return row

    def note_bad_step(self, out: RunLog, step: int) -> None:
        """A non-finite step: said; too many in a row stop the run."""
        out.note(f"step {step}: non-finite loss or gradient;"
                 f" update skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingStopped(
                f"stopping: {self.bad_steps} steps in a row with a non-finite loss"
                f" or gradient (trainer.max_bad_steps={self.max_bad_steps}) at step"
                f" {step}; lower optimizer.lr or check the data", 1)

    def summary(self, last: TransferStats, elapsed: float, steps: int, out: RunLog,
                offloaded: bool, weight_bytes: int) -> dict[str, float]:
        """The summary of this call's ``steps`` (``last``: transfers in no step's row, e.g.
        the last step's write-back) and the transfer notes at its end (``offloaded``: the
        store's; ``weight_bytes``: all parameters' gradients, beside what was synced)."""
        totals = self.totals
        totals.update({"offload/d2h_bytes": last.d2h_bytes, "offload/h2d_bytes": last.h2d_bytes,
                       "offload/stall_seconds": last.stall_seconds})
        moved = {k: totals[k] for k in SUMMED if not k.startswith("dist/")
                 or (self.dist.enabled and k == self.sync_key)}
        moved["offload/stall_seconds"] = float(moved["offload/stall_seconds"])
        summary = {"train/skipped_steps": self.skipped_steps,
                   "train/params_updated_per_step": totals["updated"] / max(steps, 1),
                   "tokens_per_second": totals["tokens"] / max(elapsed, 1e-9),
                   "train/seconds": elapsed, **moved,
                   "offload/stall_fraction": moved["offload/stall_seconds"] / max(elapsed, 1e-9)}
        if offloaded:
            out.note(
                f"offload: waited {moved['offload/stall_seconds']:.2f} s for state"
                f" ({100 * summary['offload/stall_fraction']:.1f}% of training), moved"
                f" {moved['offload/h2d_bytes'] / 2**30:.2f} GiB to and"
                f" {moved['offload/d2h_bytes'] / 2**30:.2f} GiB from the device")
        if self.dist.enabled:
            mib = moved[self.sync_key] / 2**20
            out.note(("sharded weights: reduce-scattered" if self.sharded
                      else "data parallel: all-reduced") + f" {mib:.1f} MiB of gradients,"
                     f" {mib / max(steps, 1):.2f} MiB per step (all parameters' gradients:"
                     f" {weight_bytes / 2**20:.2f} MiB)")
        return summary

    def state_dict(self) -> dict:
        return {"bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.bad_steps, self.skipped_steps = state["bad_steps"], state["skipped_steps"]
