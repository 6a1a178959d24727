"""The batch stream: the training set's batches in the seeded order, each step's window.

The order is fixed by the seed and the number of batches consumed, so a resumed run goes
on with the batch it would have trained next (``state_dict`` is that count). Under
torchrun each rank draws its share of every global batch (:func:`data.train_batches`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hift_cli import data as data_lib
from hift_cli import distributed
from hift_cli.update import Window


class BatchStream:
    """Micro-batches of ``train_set`` on ``device``: :meth:`window` gives a step's."""

    def __init__(self, train_set, batch_size: int, pad_id: int, seed: int,
                 group_by_length: bool, device: torch.device, rank: int = 0, world: int = 1):
        self.train_set, self.device = train_set, device
        self._order = dict(batch_size=batch_size, pad_id=pad_id, seed=seed,
                           group_by_length=group_by_length, rank=rank, world=world)
        self.consumed = 0  # with the seed, this fixes the data order on resume
        self.restart()

    def restart(self) -> None:
        """(Re)start the stream after ``consumed`` batches."""
        self.batches = data_lib.train_batches(self.train_set, start=self.consumed,
                                              **self._order)

    def use(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Train on these micro-batches (dicts of CPU tensors) from now on, e.g. fixed
        shapes for a memory measurement."""
        self.batches = iter(batches)

    def next(self) -> tuple[dict[str, torch.Tensor], int, int]:
        """The next micro-batch on the device, its loss items and its tokens."""
        self.consumed += 1
        batch = next(self.batches)
        labels = batch["labels"]
        # What the model's loss averages over: (shifted) label tokens for a causal LM,
        # samples for classification.
        items = int((labels[:, 1:] != -100).sum()) if labels.dim() > 1 else len(labels)
        tokens = int(batch["attention_mask"].sum())
        if self.device.type == "cuda":  # from pinned memory, so the copy is truly async
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return ({k: v.to(self.device, non_blocking=True) for k, v in batch.items()},
                items, tokens)

    def window(self, grad_accum: int) -> Window:
        """A step's ``grad_accum`` micro-batches on the device, each weighted by its share
        of the global batch's loss items (one all-reduce of the counts)."""
        micro = [self.next() for _ in range(grad_accum)]
        counts = distributed.all_reduce_(torch.tensor(
            [sum(m[1] for m in micro), sum(m[2] for m in micro)], dtype=torch.float64))
        total_items = max(float(counts[0]), 1.0)
        return Window([m[0] for m in micro], [m[1] / total_items for m in micro],
                      int(counts[1]))

    def state_dict(self) -> dict:
        return {"batches_consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["batches_consumed"]
        self.restart()
