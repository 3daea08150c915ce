"""A deterministic, resumable stream of micro-batches over a dataset.

Epoch ``e`` visits the rows in the order of ``randperm(n, seed + e)``; the stream's whole state is the number of
micro-batches it has handed out, so a resumed run continues exactly where the interrupted one stopped. With several
ranks (``shard``) every global micro-batch of ``batch_size * world_size`` rows is split between the ranks, so they
see together what one process with ``world_size`` times larger micro-batches sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class BatchStream:
    """Micro-batches of ``batch_size`` rows (the last partial batch of an epoch is dropped unless the dataset is
    smaller than one batch), collated by ``collate``."""

    def __init__(self, dataset: Sequence[dict], batch_size: int, collate: Callable[[list[dict]], Any],
                 seed: int = 0, shuffle: bool = True) -> None:
        if len(dataset) == 0:
            raise ValueError("the training set is empty: nothing to train on")
        self.dataset, self.collate, self.seed, self.shuffle = dataset, collate, seed, shuffle
        self.batch_size = min(batch_size, len(dataset))
        self.batches_per_epoch = len(dataset) // self.batch_size
        self.position = 0  # micro-batches handed out so far
        self.rank, self.world_size = 0, 1
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
                     if self.shuffle else list(range(n)))
            self._order = (epoch, order)
        return self._order[1]

    def shard(self, rank: int, world_size: int) -> None:
        """Make this stream rank ``rank``'s share of a ``world_size``-rank run (before the first ``next``)."""
        if world_size > 1 and len(self.dataset) < self.batch_size * world_size:
            raise ValueError(f"the training set has {len(self.dataset)} rows, fewer than one micro-batch per rank "
                             f"({self.batch_size} x {world_size} ranks)")
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(self.dataset) // (self.batch_size * world_size)

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def next(self) -> Any:
        epoch, index = divmod(self.position, self.batches_per_epoch)
        order = self._epoch_order(epoch)
        start = (index * self.world_size + self.rank) * self.batch_size
        rows = [self.dataset[i] for i in order[start:start + self.batch_size]]
        self.position += 1
        return self.collate(rows)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
