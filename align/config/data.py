"""``data:`` config group: where the data lives, its format, length limits and the bad-row policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .errors import ConfigError

DataFormat = Literal["auto", "sft", "preference", "prompt"]
BadRowPolicy = Literal["error", "skip"]


def _check_int(key: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def _check_optional_str(key: str, value: object, allowed: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(key, value, allowed)


@dataclass(frozen=True)
class DataConfig:
    """Data for one stage.

    ``train``/``eval``: a local JSONL/JSON/parquet/CSV file, a ``datasets.save_to_disk`` directory, or
    (online only) a Hub dataset name. ``format`` names the file's kind when auto-detection from the
    column names is not wanted. Lengths are in tokens: a prompt keeps its last ``max_prompt_length``
    tokens, and prompt + response is cut to ``max_length``; with ``truncate=False`` a row over the
    limits is a bad row instead. Bad rows raise (``on_bad_rows='error'``) or are dropped and counted
    (``'skip'``). ``cache_dir`` enables the tokenized-dataset cache; ``lint_samples`` rows are linted
    at start-up (0 turns the linter off).
    """

    train: str | None = None
    eval: str | None = None
    format: DataFormat = "auto"
    max_length: int = 512
    max_prompt_length: int = 256
    truncate: bool = True
    on_bad_rows: BadRowPolicy = "error"
    packing: bool = False
    cache_dir: str | None = None
    lint_samples: int = 32

    def __post_init__(self) -> None:
        source = "a path to a JSONL/JSON/parquet/CSV file, a datasets directory, or null"
        _check_optional_str("data.train", self.train, source)
        _check_optional_str("data.eval", self.eval, source)
        if self.format not in get_args(DataFormat):
            raise ConfigError("data.format", self.format, f"one of {get_args(DataFormat)}")
        _check_int("data.max_length", self.max_length, 2)
        _check_int("data.max_prompt_length", self.max_prompt_length, 1)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                "data.max_prompt_length", self.max_prompt_length,
                f"less than data.max_length={self.max_length}, so every response keeps at least one token",
            )
        if not isinstance(self.truncate, bool):
            raise ConfigError("data.truncate", self.truncate, "true or false")
        if self.on_bad_rows not in get_args(BadRowPolicy):
            raise ConfigError("data.on_bad_rows", self.on_bad_rows, f"one of {get_args(BadRowPolicy)}")
        if not isinstance(self.packing, bool):
            raise ConfigError("data.packing", self.packing, "true or false")
        _check_optional_str("data.cache_dir", self.cache_dir, "a directory path or null")
        _check_int("data.lint_samples", self.lint_samples, 0)
