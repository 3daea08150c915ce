"""Rule rewards: scores computed from the response text (and, for verifiable tasks, a reference column).

Each is a small class whose constructor takes the rule's parameters (the keys a config mapping may set next to
``name`` and ``weight``) and whose call takes ``(prompts, responses, **columns)`` and returns one float per response.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


class LengthReward:
    """``-penalty * |words - target|``: 0 at ``target`` words (whitespace-separated), lower the further away."""

    name = "length"
    columns = ()

    def __init__(self, target: int = 50, penalty: float = 0.01) -> None:
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            raise ValueError(f"target={target!r}: expected an integer >= 0 (words)")
        if not isinstance(penalty, (int, float)) or not 0 <= penalty < float("inf"):
            raise ValueError(f"penalty={penalty!r}: expected a finite number >= 0")
        self.target, self.penalty = target, float(penalty)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [-self.penalty * abs(len(r.split()) - self.target) for r in responses]


class RegexReward:
    """1.0 when ``pattern`` matches the response (anywhere, or the whole stripped response with ``full``), else 0.0."""

    name = "regex"
    columns = ()

    def __init__(self, pattern: str, full: bool = False) -> None:
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except (re.error, TypeError) as exc:
            raise ValueError(f"pattern={pattern!r} is not a regular expression: {exc}") from None
        self.full = bool(full)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        match = self.pattern.fullmatch if self.full else self.pattern.search
        return [1.0 if match(r.strip() if self.full else r) else 0.0 for r in responses]


class ExactMatchReward:
    """1.0 when the response equals the prompt row's reference ``column`` (``normalize``: compared stripped,
    lower-cased, with runs of whitespace as one space), else 0.0. The column comes from the prompts file."""

    name = "exact_match"

    def __init__(self, column: str = "answer", normalize: bool = True) -> None:
        self.column, self.normalize = column, bool(normalize)
        self.columns = (column,)  # what the prompts file must provide

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns) -> list[float]:
        if self.column not in columns:
            raise ValueError(f"exact_match needs the column {self.column!r} in the prompts file (got "
                             f"{sorted(columns) or 'no extra columns'})")
        norm = _normalise if self.normalize else (lambda s: s)
        return [1.0 if norm(str(r)) == norm(str(ref)) else 0.0 for r, ref in zip(responses, columns[self.column])]
