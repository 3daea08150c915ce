"""Small pieces the method files share: batched evaluation over a dataset, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any


def batches(dataset: Sequence[dict], batch_size: int, collate: Callable[[list[dict]], Any]) -> Iterator[Any]:
    """The dataset in order, ``batch_size`` rows at a time (the last batch may be smaller). Batches stay on the
    CPU: the loss and forward functions move them to the model's device."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
