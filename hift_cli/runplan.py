"""The run plan: what a run's settings come to once its data and groups are known.

``trainer.epochs`` becomes a number of steps (whole cycles), the LR schedule gets its
cycles and warmup, and the plan says what is due after a step (``eval_every`` /
``save_every``: every N steps, or ``epoch``). The validated config is never edited: these
derived numbers live here, and ``hift train`` writes them to ``plan.yaml`` beside the
run's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math

from hift_cli.config import ConfigError, TrainerConfig
from hift_cli.data import batches_per_epoch


@dataclasses.dataclass(frozen=True)
class RunPlan:
    max_steps: int  # steps of the whole run (trainer.max_steps, or epochs in whole cycles)
    steps_from_epochs: int | None  # trainer.epochs' steps before rounding up to a cycle
    epoch_batches: int  # micro-batches per epoch on each rank
    grad_accum: int  # micro-batches per step
    cycle_steps: int  # steps per cycle: groups x steps per group
    num_cycles: int  # the LR schedule's length (delayed LR update: a step per cycle)
    warmup_cycles: int

    @classmethod
    def of(cls, tcfg: TrainerConfig, train_samples: int, world: int,
           cycle_steps: int) -> RunPlan:
        """The plan of a run with these trainer settings on ``train_samples`` samples
        shared by ``world`` processes, ``cycle_steps`` steps a cycle.

        Raises:
            ConfigError: the samples cannot make one batch on every process.
        """
        epoch_batches = batches_per_epoch(train_samples, tcfg.batch_size, world)
        if epoch_batches == 0:  # what the first batch would say
            raise ConfigError(f"data: {train_samples} training samples cannot be shared by"
                              f" {world} processes")
        steps = None
        max_steps = tcfg.max_steps
        if tcfg.epochs is not None:
            steps = math.ceil(tcfg.epochs * epoch_batches / tcfg.grad_accum)
            max_steps = math.ceil(steps / cycle_steps) * cycle_steps
        num_cycles = math.ceil(max_steps / cycle_steps)
        return cls(max_steps, steps, epoch_batches, tcfg.grad_accum, cycle_steps,
                   num_cycles, tcfg.warmup(num_cycles))

    def due(self, every, steps_done: int, batches_consumed: int) -> bool:
        """Whether the step just taken is on an ``eval_every`` / ``save_every`` schedule:
        every N steps, or ``epoch``: the step that consumed an epoch's last batch."""
        if every == "epoch":
            b = self.epoch_batches
            return batches_consumed // b > (batches_consumed - self.grad_accum) // b
        return bool(every) and steps_done % every == 0

    def epoch(self, batches_consumed: int) -> float:
        """Epochs completed (batches consumed / batches per epoch), for metrics rows."""
        return round(batches_consumed / self.epoch_batches, 4)

    def epoch_end(self, epoch: int) -> int:
        """The step that ends epoch ``epoch`` (1-based)."""
        return math.ceil(epoch * self.epoch_batches / self.grad_accum)
