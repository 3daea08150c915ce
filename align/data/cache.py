"""On-disk cache of tokenized datasets, keyed by (data content hash, tokenizer fingerprint, settings).

An entry is ``<cache_dir>/tokenized/<key>/`` with ``dataset/`` (``Dataset.save_to_disk``) and
``report.json`` (the ``DataReport``, logged again on a hit so dropped rows are never silent). Entries
are written to a temporary directory and renamed into place, so a crash never leaves half an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from .validate import DataReport

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 1  # bump when the tokenized output of the same inputs changes


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that changes token ids: the tokenizer model, normaliser, pre/post-processors
    and added tokens (the backend's JSON, or the vocabulary), special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "model": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return _digest(parts)


def cache_key(data_hash: str, tokenizer_hash: str, settings: dict[str, Any]) -> str:
    """The entry name for one (data, tokenizer, settings) triple."""
    return _digest({"data": data_hash, "tokenizer": tokenizer_hash, "settings": settings,
                    "version": CACHE_VERSION})[:32]


def load_cached(cache_dir: str, key: str) -> tuple[datasets.Dataset, DataReport] | None:
    """The cached dataset and its report, or None on a miss."""
    entry = Path(cache_dir) / "tokenized" / key
    if not (entry / "report.json").is_file():
        return None
    report = DataReport(**json.loads((entry / "report.json").read_text()))
    return datasets.load_from_disk(str(entry / "dataset")), report


def save_cached(cache_dir: str, key: str, ds: datasets.Dataset, report: DataReport) -> None:
    """Write an entry atomically (a concurrent writer of the same key wins harmlessly)."""
    entry = Path(cache_dir) / "tokenized" / key
    tmp = entry.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per cache write is noise; the report is logged instead
    try:
        ds.save_to_disk(str(tmp / "dataset"))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    (tmp / "report.json").write_text(json.dumps(dataclasses.asdict(report), indent=1))
    try:
        os.replace(tmp, entry)
    except OSError:  # the entry appeared meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
