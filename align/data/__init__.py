"""Data: load user files or `datasets` dirs, detect formats, validate rows, tokenize with explicit
truncation, lint the tokenization, collate, pack, and cache. See docs/data.md."""

import importlib

from .collate import PreferenceCollator, PromptCollator, SFTCollator, pack_sft
from .errors import BadRowsError, DataError, LintError
from .rows import Example, RowProblem

# Loading and preparing data needs `datasets` (with pandas and pyarrow: about 85 MiB resident); the collators the
# trainers use do not, so those names are imported on first use and a training process that is handed its rows
# never pays for them.
_LAZY = {
    "detect_format": ".formats", "lint_tokenization": ".lint", "build_dataset": ".prepare",
    "prepare_preferences": ".prepare", "prepare_prompts": ".prepare", "prepare_sft": ".prepare",
    "load_prompts": ".prepare", "load_source": ".sources", "tokenize_examples": ".tokenize", "truncate": ".tokenize", "DataReport": ".validate",
    "split_heldout": ".split",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "BadRowsError", "DataError", "DataReport", "Example", "LintError", "PreferenceCollator", "PromptCollator",
    "RowProblem", "SFTCollator", "build_dataset", "detect_format", "lint_tokenization", "load_prompts", "load_source",
    "pack_sft", "prepare_preferences", "prepare_prompts", "prepare_sft", "split_heldout", "tokenize_examples",
    "truncate",
]
