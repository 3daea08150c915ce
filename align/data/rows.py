"""The normalised row every format becomes, and the problem record validation reports per bad row."""

from __future__ import annotations

from dataclasses import dataclass

Message = dict[str, str]  # {"role": ..., "content": ...}
Messages = tuple[Message, ...]
Text = str | Messages  # plain text, or a conversation rendered by the tokenizer's chat template

# Reasons a row is bad: the keys of the skip report's counts.
MISSING = "missing field"
WRONG_TYPE = "wrong type"
PROMPT_ONLY = "prompt-only row"
NO_SHARED_PROMPT = "no shared prompt"
NOT_ASSISTANT = "response is not an assistant turn"
EMPTY_PROMPT = "empty prompt"
EMPTY_RESPONSE = "empty response"
IDENTICAL = "chosen == rejected"
INVALID_UTF8 = "invalid UTF-8"
TOO_LONG = "too long"
IDENTICAL_AFTER_TRUNCATION = "chosen == rejected after truncation"

REMOVE = "remove the row"


@dataclass(frozen=True)
class Example:
    """One validated row. ``row`` is the user's 1-based row number.

    SFT sets ``completion``; preferences set ``chosen`` and ``rejected``; prompt-only sets neither.
    A conversational example has a message-tuple ``prompt`` and message-tuple responses (assistant
    turns); a plain one has strings throughout (an SFT ``text`` row has ``prompt=""``). ``raw`` marks
    text that is already formatted (``text`` rows, HH transcripts) and never goes through a chat template.
    """

    row: int
    prompt: Text
    completion: Text | None = None
    chosen: Text | None = None
    rejected: Text | None = None
    raw: bool = False

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, tuple)

    def responses(self) -> dict[str, Text]:
        """The responses by field name, in a fixed order: completion, or chosen then rejected."""
        fields = {"completion": self.completion, "chosen": self.chosen, "rejected": self.rejected}
        return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class RowProblem:
    """Why one row is bad. ``reason`` is one of the constants above; ``detail`` and ``fix`` are prose."""

    row: int
    field: str
    reason: str
    detail: str
    fix: str = REMOVE

    def brief(self, source: str) -> str:
        """``prefs.jsonl row 7, field 'rejected': empty response``."""
        return f"{source} row {self.row}, field '{self.field}': {self.detail}"

    def message(self, source: str) -> str:
        """``prefs.jsonl row 7, field 'rejected': empty response; remove the row or set data.on_bad_rows=skip``."""
        joint = ", or" if " or " in self.fix else " or"
        return f"{self.brief(source)}; {self.fix}{joint} set data.on_bad_rows=skip"
