"""Validate every row before training, and apply the ``data.on_bad_rows`` policy.

Problems name the file, the 1-based row, the field and what to do. Under ``error`` the first problem is
raised (with a count of the rest); under ``skip`` bad rows are dropped and a ``DataReport`` counts them
per reason, which the caller logs: nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import datasets

from .errors import BadRowsError, DataError
from .formats import normalise_row
from .rows import (
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL,
    IDENTICAL_AFTER_TRUNCATION,
    INVALID_UTF8,
    TOO_LONG,
    Example,
    RowProblem,
    Text,
)
from .tokenize import Tokenized

_BAD_CHAR = re.compile("[\ud800-\udfff\ufffd]")  # lone surrogates, and U+FFFD left by a lossy decode
BATCH = 1024


@dataclass(frozen=True)
class DataReport:
    """What happened to a source's rows: ``dropped`` and ``truncated`` count rows per reason/field;
    ``first`` holds the message of the first dropped row per reason. ``duplicates`` counts rows that repeat an
    earlier row exactly (they are kept); ``duplicate_rows`` lists the first few as [row, the row it repeats]."""

    source: str
    total: int
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    duplicate_rows: list[list[int]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())

    def summary(self) -> str:
        text = f"{self.source}: kept {self.kept} of {self.total} rows"
        if self.dropped:
            text += "; dropped " + ", ".join(f"{n} ({reason})" for reason, n in sorted(self.dropped.items()))
            text += "; first: " + " | ".join(self.first[r] for r in sorted(self.first))
        if self.truncated:
            text += "; truncated " + ", ".join(f"{n} {name}" for name, n in sorted(self.truncated.items()))
        if self.duplicates:
            pairs = ", ".join(f"row {row} repeats row {first}" for row, first in self.duplicate_rows)
            more = ", ..." if self.duplicates > len(self.duplicate_rows) else ""
            text += (f"; {self.duplicates} exact duplicate rows ({pairs}{more}): kept, each copy used again (a "
                     "held-out split keeps all copies on one side); remove them if they are a mistake")
        return text


def iter_rows(ds: datasets.Dataset) -> Iterator[tuple[int, dict | RowProblem]]:
    """Yield (1-based row, row dict), or (row, problem) for a row whose bytes are not valid UTF-8."""
    for start in range(0, len(ds), BATCH):
        stop = min(start + BATCH, len(ds))
        try:
            batch = ds[start:stop]
        except UnicodeDecodeError:  # Arrow keeps undecodable JSON bytes; find the rows and fields
            yield from _decode_rows(ds, start, stop)
            continue
        for offset in range(stop - start):
            yield start + offset + 1, {name: values[offset] for name, values in batch.items()}


def _decode_rows(ds: datasets.Dataset, start: int, stop: int) -> Iterator[tuple[int, dict | RowProblem]]:
    arrow = ds.with_format("arrow")
    for i in range(start, stop):
        try:
            yield i + 1, ds[i]
        except UnicodeDecodeError as exc:
            table = arrow[i:i + 1]
            bad = next(name for name in table.column_names if not _decodes(table.column(name)))
            yield i + 1, RowProblem(i + 1, bad, INVALID_UTF8, f"bytes that are not UTF-8 ({exc.reason} at "
                                    f"byte {exc.start})", "re-encode the file as UTF-8 or remove the row")


def _decodes(column) -> bool:
    try:
        column.to_pylist()
        return True
    except UnicodeDecodeError:
        return False


def _texts(value: Text) -> list[str]:
    return [value] if isinstance(value, str) else [message["content"] for message in value]


def _blank(value: Text) -> bool:
    return all(not text.strip() for text in _texts(value))


def check_example(example: Example, use: str) -> list[RowProblem]:
    """Content problems of a normalised row: invalid UTF-8, empty responses, chosen == rejected."""
    problems = []
    responses = example.responses()
    for name, value in {"prompt": example.prompt, **responses}.items():
        for text in _texts(value):
            if (match := _BAD_CHAR.search(text)) is not None:
                what = "a replacement character U+FFFD" if match.group() == "\ufffd" else "a lone surrogate"
                problems.append(RowProblem(example.row, name, INVALID_UTF8, f"{what} at character "
                                           f"{match.start()}: the text was not valid UTF-8",
                                           "re-encode the source text as UTF-8 or remove the row"))
                break
    for name, value in responses.items():
        if _blank(value):
            problems.append(RowProblem(example.row, name, EMPTY_RESPONSE, "empty response"))
    if use == "prompt" and _blank(example.prompt):
        problems.append(RowProblem(example.row, "prompt", EMPTY_PROMPT, "empty prompt"))
    if example.chosen is not None and example.chosen == example.rejected:
        problems.append(RowProblem(example.row, "rejected", IDENTICAL, "the same response as 'chosen', which "
                                   "carries no preference", "remove the row or fix one response"))
    return problems


def validate_rows(ds: datasets.Dataset, layout: str, use: str) -> tuple[list[Example], list[RowProblem]]:
    """Normalise and check every row of ``ds``. Returns the good examples and one problem per bad row."""
    examples, problems = [], []
    for number, row in iter_rows(ds):
        example = row if isinstance(row, RowProblem) else normalise_row(row, number, layout, use)
        found = [example] if isinstance(example, RowProblem) else check_example(example, use)
        if found:
            problems.append(found[0])
        else:
            examples.append(example)
    return examples, problems


def check_length(full: Tokenized, cut: Tokenized, max_length: int, max_prompt_length: int,
                 truncate: bool) -> RowProblem | None:
    """Length problems of one row, given its untruncated and truncated ids: over the limits when
    ``truncate`` is off, or chosen and rejected made identical by truncation."""
    if not truncate and cut.truncated:
        fix = "raise the limit, set data.truncate=true, or remove the row"
        if "prompt" in cut.truncated:
            return RowProblem(full.row, "prompt", TOO_LONG, f"{len(full.prompt_ids)} tokens, over "
                              f"data.max_prompt_length={max_prompt_length}", fix)
        name = min(cut.truncated)
        return RowProblem(full.row, name, TOO_LONG, f"prompt + {name} is "
                          f"{len(full.prompt_ids) + len(full.responses[name])} tokens, over "
                          f"data.max_length={max_length}", fix)
    chosen, rejected = cut.responses.get("chosen"), cut.responses.get("rejected")
    if chosen is not None and chosen == rejected:
        return RowProblem(full.row, "rejected", IDENTICAL_AFTER_TRUNCATION, f"identical to 'chosen' in the "
                          f"{len(chosen)} tokens that fit in data.max_length={max_length}, so the pair carries "
                          f"no preference", "raise data.max_length or remove the row")
    return None


def enforce(problems: list[RowProblem], policy: str, source: str, total: int) -> DataReport:
    """Raise ``BadRowsError`` on any problem under ``error``; under ``skip`` count them in a report."""
    counts = Counter(problem.reason for problem in problems)
    if problems and policy == "error":
        rest = f" ({len(problems)} bad rows in all: {dict(counts)})" if len(problems) > 1 else ""
        raise BadRowsError(problems[0].message(source) + rest)
    first: dict[str, str] = {}
    for problem in problems:
        first.setdefault(problem.reason, problem.brief(source))
    return DataReport(source, total, dict(counts), first=first)


def require_rows(report: DataReport) -> DataReport:
    """Fail when nothing is left to train on (an empty file, or every row dropped)."""
    if report.kept == 0:
        raise DataError(f"{report.source}: no usable rows ({report.summary()}); fix the data or the path")
    return report


def merge_reports(first: DataReport, second: DataReport) -> DataReport:
    """Combine two passes over the same source (content checks, then length checks)."""
    dropped = Counter(first.dropped) + Counter(second.dropped)
    truncated = Counter(first.truncated) + Counter(second.truncated)
    return DataReport(first.source, first.total, dict(dropped), dict(truncated), {**second.first, **first.first},
                      first.duplicates, first.duplicate_rows)


def find_duplicates(examples: list[Example]) -> list[tuple[int, int]]:
    """(row, the earlier row it repeats) for every example whose content equals an earlier one's."""
    seen: dict[str, int] = {}
    found = []
    for example in examples:
        content = json.dumps([example.prompt, example.completion, example.chosen, example.rejected, example.raw],
                             sort_keys=True)
        if content in seen:
            found.append((example.row, seen[content]))
        else:
            seen[content] = example.row
    return found


def with_duplicates(report: DataReport, examples: list[Example], shown: int = 3) -> DataReport:
    """``report`` with the exact duplicates among ``examples`` counted (the first ``shown`` listed)."""
    found = find_duplicates(examples)
    return replace(report, duplicates=len(found), duplicate_rows=[list(pair) for pair in found[:shown]])
