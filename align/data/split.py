"""Hold rows of a prepared (tokenized) dataset out for evaluation, keeping every copy of a row on one side."""

from __future__ import annotations

import hashlib
from collections import Counter

import datasets


def content_keys(rows: datasets.Dataset) -> list[bytes]:
    """One digest per row of its token columns (everything but the user's ``row`` number): equal for copies."""
    names = [name for name in rows.column_names if name != "row"]
    keys = []
    for batch in rows.select_columns(names).iter(batch_size=1024):  # a batch at a time: bounded memory
        for values in zip(*(batch[name] for name in names)):
            keys.append(hashlib.blake2b(repr(values).encode(), digest_size=16).digest())
    return keys


def split_heldout(rows: datasets.Dataset, n: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held): about the last ``n`` rows held out, never more than half of them, and with them every
    earlier copy of a held-out row, so that no row is both trained on and evaluated. Rows are taken from the end
    one content at a time (a content brings all its copies) until ``n`` are held; a content whose copies would
    take the held-out part past half of the rows is left in training. Without duplicates this is exactly the
    last ``min(n, len // 2)`` rows."""
    limit = min(n, len(rows) // 2)
    keys = content_keys(rows) if limit else []
    copies = Counter(keys)
    held_keys: set[bytes] = set()
    held = 0
    for key in reversed(keys):
        if held >= limit:
            break
        if key in held_keys or held + copies[key] > len(rows) // 2:
            continue
        held_keys.add(key)
        held += copies[key]
    train_index = [i for i, key in enumerate(keys) if key not in held_keys] if keys else range(len(rows))
    held_index = [i for i, key in enumerate(keys) if key in held_keys]
    return rows.select(train_index), rows.select(held_index)
