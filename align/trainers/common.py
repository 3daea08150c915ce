"""Small pieces the method files share: batched evaluation over a dataset, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from align.models.device import to_device


def batches(dataset: Sequence[dict], batch_size: int, collate: Callable[[list[dict]], Any],
            device: torch.device | None = None) -> Iterator[Any]:
    """The dataset in order, ``batch_size`` rows at a time (the last batch may be smaller), on ``device``."""
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        yield to_device(batch, device) if device is not None else batch
