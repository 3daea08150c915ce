"""load -> detect -> validate -> lint -> tokenize -> truncate -> Dataset, cached on disk.

Output columns (``row`` = the user's 1-based row number, kept for error messages downstream):
  SFT          row, input_ids (T,), response_mask (T,) bool; packed: row is a list, + position_ids (T,)
  preferences  row, prompt_ids (P,), chosen_ids (Rc,), rejected_ids (Rr,)
  prompts      row, prompt_ids (P,)
Feed them to ``SFTCollator``, ``PreferenceCollator`` and ``PromptCollator`` respectively.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from align.config import ConfigError, DataConfig

from .cache import cache_key, load_cached, save_cached, tokenizer_fingerprint
from .collate import pack_sft
from .formats import LAYOUT_COLUMNS, USES, detect_format
from .lint import lint_sample, lint_tokenization
from .sources import load_source, source_fingerprint, source_name
from .tokenize import Tokenized, sequence, tokenize_examples, truncate
from .validate import (
    DataReport,
    check_length,
    enforce,
    merge_reports,
    require_rows,
    validate_rows,
    with_duplicates,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("align.data")
IDS = datasets.List(datasets.Value("int32"))
FEATURES = {
    "sft": datasets.Features({"row": datasets.Value("int64"), "input_ids": IDS,
                              "response_mask": datasets.List(datasets.Value("bool"))}),
    "preference": datasets.Features({"row": datasets.Value("int64"), "prompt_ids": IDS, "chosen_ids": IDS,
                                     "rejected_ids": IDS}),
    "prompt": datasets.Features({"row": datasets.Value("int64"), "prompt_ids": IDS}),
}


def prepare_sft(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str = "train",
                key: str | None = None) -> datasets.Dataset:
    """SFT rows from ``cfg.train`` (or ``cfg.eval``): prompt/completion, messages, text, or a preference
    file's prompt + chosen. Packed into ``max_length`` rows when ``cfg.packing``. ``key``: the config key the
    user set the file with (``data.sft``), named in every error; default ``data.<split>`` and the file's name."""
    return _prepare(cfg, tokenizer, "sft", split, key)


def prepare_preferences(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str = "train",
                        key: str | None = None) -> datasets.Dataset:
    """Preference pairs for DPO and reward models: prompt/chosen/rejected, UltraFeedback-style
    conversations, or Anthropic HH transcripts."""
    return _prepare(cfg, tokenizer, "preference", split, key)


def prepare_prompts(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str = "train",
                    key: str | None = None) -> datasets.Dataset:
    """Prompts for PPO/GRPO rollouts, from a prompt-only file or the prompts of an SFT/preference file."""
    return _prepare(cfg, tokenizer, "prompt", split, key)


def label(source: str, key: str | None) -> str:
    """How messages name a source: ``data.sft=/data/sft.jsonl`` given the user's key, else the file's name."""
    return f"{key}={source}" if key else source_name(source)


def load_prompts(source: str, key: str, limit: int | None = None, on_bad_rows: str = "error",
                 with_rows: bool = False):
    """The prompts of a file as written (a string, or a conversation as a tuple of messages), validated like
    every other use of the file (row-numbered errors naming ``key``): what sampling for evaluation and
    on-policy pairs starts from. ``limit``: the first ``limit`` prompts. ``with_rows``: also each prompt's 1-based
    row number and its row's other columns (e.g. a reference ``answer``), as ``(prompts, rows, columns)``."""
    raw = load_source(source, key)
    name = label(source, key)
    layout = detect_format(raw.column_names, "auto", "prompt", name)
    examples, problems = validate_rows(raw, layout, "prompt")
    _log(with_duplicates(require_rows(enforce(problems, on_bad_rows, name, len(raw))), examples), cached=False)
    examples = examples[:limit] if limit else examples
    prompts = [e.prompt for e in examples]
    if not with_rows:
        return prompts
    own = set(LAYOUT_COLUMNS) & set(raw.column_names)
    extra = [c for c in raw.column_names if c not in own]
    table = raw.select_columns(extra).to_list() if extra else [{} for _ in range(len(raw))]
    return prompts, [e.row for e in examples], [table[e.row - 1] for e in examples]


def _prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, use: str, split: str,
             user_key: str | None) -> datasets.Dataset:
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    key, source = user_key or f"data.{split}", getattr(cfg, split)
    if source is None:
        raise ConfigError(key, None, "a path to a JSONL/JSON/parquet/CSV file or a datasets directory; set it")
    if cfg.format != "auto" and cfg.format not in USES[use]:
        raise ConfigError("data.format", cfg.format, f"one of {('auto', *USES[use])} for {use} data")
    raw, data_hash = None, source_fingerprint(source)
    sources_cache = str(Path(cfg.cache_dir) / "sources") if cfg.cache_dir else None
    if data_hash is None:  # a Hub dataset: use the fingerprint `datasets` gives it
        raw = load_source(source, key, sources_cache, "train" if split == "train" else "test")
        data_hash = raw._fingerprint
    entry = None
    if cfg.cache_dir:
        settings = {"use": use, "format": cfg.format, "max_length": cfg.max_length, "on_bad_rows": cfg.on_bad_rows,
                    "max_prompt_length": cfg.max_prompt_length, "truncate": cfg.truncate,
                    "packing": cfg.packing and use == "sft", "name": source_name(source)}
        entry = cache_key(data_hash, tokenizer_fingerprint(tokenizer), settings)
        if (hit := load_cached(cfg.cache_dir, entry)) is not None:
            _log(hit[1], cached=True)
            return hit[0]
    if raw is None:
        raw = load_source(source, key, sources_cache)
    ds, report = build_dataset(raw, tokenizer, cfg, use, label(source, user_key))
    if entry is not None:
        save_cached(cfg.cache_dir, entry, ds, report)
    _log(report, cached=False)
    return ds


def build_dataset(raw: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, use: str,
                  source: str = "data") -> tuple[datasets.Dataset, DataReport]:
    """The uncached pipeline on an already loaded dataset; returns the tokenized dataset and its report."""
    layout = detect_format(raw.column_names, cfg.format, use, source)
    examples, problems = validate_rows(raw, layout, use)
    report = with_duplicates(require_rows(enforce(problems, cfg.on_bad_rows, source, len(raw))), examples)
    lint_tokenization(lint_sample(examples, cfg.lint_samples), tokenizer, max_length=cfg.max_length,
                      max_prompt_length=cfg.max_prompt_length, source=source)
    kept, problems = [], []
    for full in tokenize_examples(examples, tokenizer, source):
        cut = truncate(full, cfg.max_length, cfg.max_prompt_length, tokenizer.bos_token_id)
        problem = check_length(full, cut, cfg.max_length, cfg.max_prompt_length, cfg.truncate)
        if problem is None:
            kept.append(cut)
        else:
            problems.append(problem)
    lengths = enforce(problems, cfg.on_bad_rows, source, len(raw))
    truncated = Counter(part for t in kept for part in t.truncated)
    report = require_rows(merge_reports(report, DataReport(source, len(raw), lengths.dropped, dict(truncated),
                                                           lengths.first)))
    ds = datasets.Dataset.from_dict(_columns(kept, use), features=FEATURES[use])
    if use == "sft" and cfg.packing:
        ds = pack_sft(ds, cfg.max_length)
    return ds, report


def _columns(rows: list[Tokenized], use: str) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in FEATURES[use]}
    for t in rows:
        columns["row"].append(t.row)
        if use == "sft":
            ids, mask = sequence(t.prompt_ids, t.responses["completion"])
            columns["input_ids"].append(ids)
            columns["response_mask"].append(mask)
        else:
            columns["prompt_ids"].append(list(t.prompt_ids))
        if use == "preference":
            columns["chosen_ids"].append(list(t.responses["chosen"]))
            columns["rejected_ids"].append(list(t.responses["rejected"]))
    return columns


_WARNED: set[str] = set()  # summaries already warned about in this process


def _log(report: DataReport, cached: bool) -> None:
    """The data report: a warning when rows were dropped, truncated or repeated; once per process for the same
    report (iterative DPO reads the prompts file again every round), later copies at debug level."""
    level = logging.WARNING if report.dropped or report.truncated or report.duplicates else logging.INFO
    text = report.summary() + (" (from the tokenized-data cache)" if cached else "")
    if level == logging.WARNING and text in _WARNED:
        level = logging.DEBUG
    _WARNED.add(text)
    log.log(level, "%s", text)
