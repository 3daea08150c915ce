"""Data: load user files or `datasets` dirs, detect formats, validate rows, tokenize with explicit
truncation, lint the tokenization, collate, pack, and cache. See docs/data.md."""

from .collate import PreferenceCollator, PromptCollator, SFTCollator, pack_sft
from .errors import BadRowsError, DataError, LintError
from .formats import detect_format
from .lint import lint_tokenization
from .prepare import build_dataset, prepare_preferences, prepare_prompts, prepare_sft
from .rows import Example, RowProblem
from .sources import load_source
from .tokenize import tokenize_examples, truncate
from .validate import DataReport

__all__ = [
    "BadRowsError", "DataError", "DataReport", "Example", "LintError", "PreferenceCollator", "PromptCollator",
    "RowProblem", "SFTCollator", "build_dataset", "detect_format", "lint_tokenization", "load_source",
    "pack_sft", "prepare_preferences", "prepare_prompts", "prepare_sft", "tokenize_examples", "truncate",
]
