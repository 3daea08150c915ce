"""Dynamic-padding collators (pad to the longest row of the batch) and SFT packing.

Masks are named by what True means: ``attention_mask`` 1 = a real token, ``response_mask`` True = the
token counts in a completion-only loss. ``labels`` are the input ids where ``response_mask`` is True and
-100 elsewhere (Hugging Face convention: the model shifts them).

Packing concatenates whole SFT examples into rows of at most ``max_length`` tokens (best-fit
decreasing), with ``position_ids`` restarting at 0 for each example and the first token of each example
out of the loss. Attention kernels that read packed ``position_ids`` (flash-attention-2 without an
attention mask) keep attention inside each example; with sdpa/eager it crosses examples within a row,
the standard trade-off of packing (cheap, rarely harmful for short SFT examples).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100


def pad(rows: Sequence[Sequence[int]], value: int, left: bool = False, dtype=torch.long) -> torch.Tensor:
    """Stack rows of different lengths into (B, T), T = the longest, padding with ``value``."""
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            start = width - len(row) if left else 0
            out[i, start:start + len(row)] = torch.as_tensor(list(row), dtype=dtype)
    return out


def _check_pad(pad_token_id: object) -> None:
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id={pad_token_id!r}: expected an int; the tokenizer has no pad token? "
                         f"set tokenizer.pad_token (e.g. to its eos_token) and pass tokenizer.pad_token_id")


def _lengths_mask(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    return pad([[1] * len(row) for row in rows], 0, left=left)


@dataclass(frozen=True)
class SFTCollator:
    """Rows ``{input_ids, response_mask[, position_ids]}`` -> ``input_ids``, ``attention_mask``,
    ``labels`` (B, T) long, ``response_mask`` (B, T) bool, and ``position_ids`` (B, T) for packed rows.
    Right-padded."""

    pad_token_id: int

    def __post_init__(self) -> None:
        _check_pad(self.pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [row["input_ids"] for row in rows]
        input_ids = pad(ids, self.pad_token_id)
        response_mask = pad([row["response_mask"] for row in rows], 0, dtype=torch.bool)
        batch = {"input_ids": input_ids, "attention_mask": _lengths_mask(ids), "response_mask": response_mask,
                 "labels": input_ids.masked_fill(~response_mask, IGNORE_INDEX)}
        if "position_ids" in rows[0]:
            batch["position_ids"] = pad([row["position_ids"] for row in rows], 0)
        return batch


@dataclass(frozen=True)
class PreferenceCollator:
    """Rows ``{prompt_ids, chosen_ids, rejected_ids}`` -> one batch of 2B sequences, the B chosen first
    then the B rejected (so ``logps.chunk(2)`` splits them): ``input_ids`` (2B, T), ``attention_mask``
    (2B, T), ``response_mask`` (2B, T) bool = the chosen/rejected tokens. Right-padded."""

    pad_token_id: int

    def __post_init__(self) -> None:
        _check_pad(self.pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, masks = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for row in rows:
                seq = list(row["prompt_ids"]) + list(row[side])
                ids.append(seq)
                masks.append([False] * len(row["prompt_ids"]) + [True] * len(row[side]))
        return {"input_ids": pad(ids, self.pad_token_id), "attention_mask": _lengths_mask(ids),
                "response_mask": pad(masks, 0, dtype=torch.bool)}


@dataclass(frozen=True)
class PromptCollator:
    """Rows ``{prompt_ids}`` -> ``input_ids`` (B, T) and ``attention_mask`` (B, T), LEFT-padded so that
    generation continues every prompt from the last column."""

    pad_token_id: int

    def __post_init__(self) -> None:
        _check_pad(self.pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [row["prompt_ids"] for row in rows]
        return {"input_ids": pad(ids, self.pad_token_id, left=True), "attention_mask": _lengths_mask(ids, left=True)}


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= ``max_length`` (best-fit decreasing, deterministic).
    Every length must be <= ``max_length``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        slot = bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            room, b = free.pop(slot)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        insort(free, (room - lengths[i], b))
    return bins


def pack_sft(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Pack an SFT dataset (``input_ids``, ``response_mask``) into rows of at most ``max_length`` tokens
    with ``position_ids`` restarting per example (see the module docstring). ``rows`` lists the source
    rows of each packed row."""
    import datasets  # here, not at import: the collators above serve processes that never load data

    ids, masks, rows = ds["input_ids"], ds["response_mask"], ds["row"]
    packed: dict[str, list] = {"row": [], "input_ids": [], "response_mask": [], "position_ids": []}
    for members in pack_bins([len(x) for x in ids], max_length):
        members.sort()
        packed["row"].append([rows[i] for i in members])
        packed["input_ids"].append([t for i in members for t in ids[i]])
        packed["response_mask"].append([m and k > 0 for i in members for k, m in enumerate(masks[i])])
        packed["position_ids"].append([k for i in members for k in range(len(ids[i]))])
    return datasets.Dataset.from_dict(packed)
