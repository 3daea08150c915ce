"""Detect a dataset's layout from its column names and normalise each row to an ``Example``.

Layouts (kind: required columns):
  sft         messages | prompt + completion | text
  preference  prompt + chosen + rejected | chosen + rejected (prompt = their shared prefix: message
              lists as in UltraFeedback-binarized, or raw Anthropic HH transcripts)
  prompt      prompt | messages
A preference file also serves SFT (prompt + chosen) and prompt-only use; an SFT file with a prompt
serves prompt-only use.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .errors import DataError
from .rows import (
    EMPTY_PROMPT,
    MISSING,
    NO_SHARED_PROMPT,
    NOT_ASSISTANT,
    PROMPT_ONLY,
    WRONG_TYPE,
    Example,
    Messages,
    RowProblem,
    Text,
)

KINDS = ("sft", "preference", "prompt")
LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {  # name: (kind, required columns), in detection order
    "preference": ("preference", ("prompt", "chosen", "rejected")),
    "preference_implicit": ("preference", ("chosen", "rejected")),
    "messages": ("sft", ("messages",)),
    "prompt_completion": ("sft", ("prompt", "completion")),
    "text": ("sft", ("text",)),
    "prompt": ("prompt", ("prompt",)),
    "prompt_messages": ("prompt", ("messages",)),
}
LAYOUT_COLUMNS = tuple(sorted({c for _, cols in LAYOUTS.values() for c in cols} | {"completion"}))
# Which file kinds each use accepts: SFT can train on preferred responses, prompts come from anything.
USES = {"sft": ("sft", "preference"), "preference": ("preference",), "prompt": ("prompt", "sft", "preference")}
HH_ASSISTANT = "\n\nAssistant:"


def detect_format(columns: list[str], fmt: str = "auto", use: str | None = None, source: str = "data") -> str:
    """The layout name for ``columns``. ``fmt`` ('auto' or a kind) restricts the search to that kind;
    ``use`` (the kind the caller needs) is checked against the file's kind."""
    kinds = KINDS if fmt == "auto" else (fmt,)
    found = [name for name, (kind, needs) in LAYOUTS.items() if kind in kinds and set(needs) <= set(columns)]
    if not found:
        wanted = "; ".join(f"{k}: " + " | ".join("+".join(n) for _, (kk, n) in LAYOUTS.items() if kk == k)
                           for k in kinds)
        raise DataError(f"{source}: cannot tell the data format from the columns {sorted(columns)}; expected "
                        f"{wanted}; rename the columns (see docs/data.md)"
                        + ("" if fmt == "auto" else " or set data.format=auto"))
    layout = found[0]
    if use == "prompt" and layout in ("messages", "text"):
        if layout == "text":
            raise DataError(f"{source}: plain 'text' rows have no prompt to generate from; use a file with "
                            f"a 'prompt' or 'messages' column for prompt-only (PPO/GRPO) data")
        layout = "prompt_messages"  # a conversation's prompt: everything before its final assistant turns
    if use is not None and LAYOUTS[layout][0] not in USES[use]:
        needed = "a 'completion' column" if use == "sft" else "'chosen' and 'rejected' columns"
        hint = (f"it has only prompts: use it for PPO/GRPO, or add {needed}" if LAYOUTS[layout][0] == "prompt"
                else f"add {needed}")
        raise DataError(f"{source}: {use} data needs {'/'.join(USES[use])} rows, but the columns "
                        f"{sorted(columns)} are {LAYOUTS[layout][0]} data ({layout}); {hint}")
    return layout


def normalise_row(row: dict, number: int, layout: str, use: str) -> Example | RowProblem:
    """Turn one raw row (1-based ``number``) of ``layout`` into an Example for ``use``, or say why not."""
    example = _NORMALISERS[layout](row, number)
    if isinstance(example, RowProblem):
        return example
    if use == "sft" and example.chosen is not None:
        return replace(example, completion=example.chosen, chosen=None, rejected=None)
    if use == "prompt":
        return replace(example, completion=None, chosen=None, rejected=None)
    return example


def _text(value: object, field: str, row: int) -> Text | RowProblem:
    if value is None:
        return RowProblem(row, field, MISSING, "missing value", "fill it in or remove the row")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, field, row)
    return RowProblem(row, field, WRONG_TYPE, f"expected a string or a list of {{role, content}} messages, "
                      f"got {type(value).__name__} {value!r:.60}", "fix the value or remove the row")


def _messages(value: list, field: str, row: int) -> Messages | RowProblem:
    out = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return RowProblem(row, field, WRONG_TYPE, f"message {i} is {message!r:.80}, expected "
                              f"{{'role': str, 'content': str}}", "fix the message or remove the row")
        out.append({"role": message["role"], "content": message["content"]})
    return tuple(out)


def _assistant(text: Text) -> Messages:
    return ({"role": "assistant", "content": text},) if isinstance(text, str) else text


def _check_assistant(messages: Messages, field: str, row: int) -> RowProblem | None:
    if not messages:
        return RowProblem(row, field, MISSING, "no response messages", "add the assistant's response or remove the row")
    for message in messages:
        if message["role"] != "assistant":
            return RowProblem(row, field, NOT_ASSISTANT, f"the response holds a {message['role']!r} turn; "
                              f"responses must be assistant turns", "fix the conversation or remove the row")
    return None


def _prompt_and_responses(row: int, prompt: Text, responses: dict[str, Text]) -> Example | RowProblem:
    """Pair a prompt with responses, wrapping string responses as assistant turns after a chat prompt."""
    if isinstance(prompt, tuple):
        responses = {name: _assistant(value) for name, value in responses.items()}
        for name, value in responses.items():
            if (problem := _check_assistant(value, name, row)) is not None:
                return problem
    else:
        for name, value in responses.items():
            if not isinstance(value, str):
                return RowProblem(row, name, WRONG_TYPE, "a message list after a plain-string prompt",
                                  "write both as strings or both as messages")
    return Example(row, prompt, **responses)


def _from_text(row: dict, number: int) -> Example | RowProblem:
    text = _text(row.get("text"), "text", number)
    if isinstance(text, tuple):
        return RowProblem(number, "text", WRONG_TYPE, "a message list in a 'text' column",
                          "use a 'messages' column for conversations")
    return text if isinstance(text, RowProblem) else Example(number, "", completion=text, raw=True)


def _from_prompt_completion(row: dict, number: int) -> Example | RowProblem:
    prompt = _text(row.get("prompt"), "prompt", number)
    completion = _text(row.get("completion"), "completion", number)
    for value in (prompt, completion):
        if isinstance(value, RowProblem):
            return value
    return _prompt_and_responses(number, prompt, {"completion": completion})


def _from_messages(row: dict, number: int) -> Example | RowProblem:
    messages = _text(row.get("messages"), "messages", number)
    if isinstance(messages, RowProblem):
        return messages
    if isinstance(messages, str):
        return RowProblem(number, "messages", WRONG_TYPE, "a string, expected a list of {role, content} messages",
                          "fix the value or remove the row")
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        return RowProblem(number, "messages", NOT_ASSISTANT, f"the last message must be the assistant's "
                          f"response, got {last!r}", "end the conversation with an assistant turn or remove the row")
    if len(messages) == 1:
        return RowProblem(number, "messages", EMPTY_PROMPT, "no message before the assistant's response")
    return Example(number, messages[:-1], completion=messages[-1:])


def _from_preference(row: dict, number: int, explicit: bool = True) -> Example | RowProblem:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None and rejected is None:
        return RowProblem(number, "chosen", PROMPT_ONLY, "a prompt-only row in a preference set (no 'chosen' "
                          "or 'rejected')", "add both responses, move the row to a prompt-only file, or remove it")
    values = {"chosen": _text(chosen, "chosen", number), "rejected": _text(rejected, "rejected", number)}
    for value in values.values():
        if isinstance(value, RowProblem):
            return value
    prompt = _text(row.get("prompt"), "prompt", number) if explicit else None
    if isinstance(prompt, RowProblem):
        return prompt
    if all(isinstance(v, tuple) for v in values.values()):
        if isinstance(prompt, tuple):  # explicit conversational prompt; responses may repeat it
            values = {k: v[len(prompt):] if v[:len(prompt)] == prompt else v for k, v in values.items()}
            return _prompt_and_responses(number, prompt, values)
        return _split_conversations(number, values["chosen"], values["rejected"], prompt)
    if prompt is None:
        if not all(isinstance(v, str) for v in values.values()):
            return RowProblem(number, "rejected", WRONG_TYPE, "one response is a string, the other messages",
                              "write both the same way")
        return _split_transcripts(number, values["chosen"], values["rejected"])
    return _prompt_and_responses(number, prompt, values)


def _split_conversations(number: int, chosen: Messages, rejected: Messages,
                         prompt: str | None = None) -> Example | RowProblem:
    """Prompt = the longest shared message prefix that ends before an assistant turn. A string
    ``prompt`` column is used (as a user turn) only when the conversations hold no prompt themselves."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if shared == 0 and prompt is not None and chosen[:1] and chosen[0]["role"] == "assistant":
        return _prompt_and_responses(number, ({"role": "user", "content": prompt},),
                                     {"chosen": chosen, "rejected": rejected})
    if shared == 0:
        return RowProblem(number, "chosen", NO_SHARED_PROMPT, "'chosen' and 'rejected' share no prompt messages",
                          "start both conversations with the same prompt or add a 'prompt' column")
    return _prompt_and_responses(number, chosen[:shared], {"chosen": chosen[shared:], "rejected": rejected[shared:]})


def _split_transcripts(number: int, chosen: str, rejected: str) -> Example | RowProblem:
    """Anthropic HH: prompt = the longest common prefix, cut after its last '\\n\\nAssistant:'."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        return RowProblem(number, "chosen", NO_SHARED_PROMPT, "no shared '\\n\\nAssistant:' turn: not an HH "
                          "transcript pair", "add a 'prompt' column or fix the transcripts")
    cut += len(HH_ASSISTANT)
    return Example(number, chosen[:cut], chosen=chosen[cut:], rejected=rejected[cut:], raw=True)


def _from_prompt(row: dict, number: int, column: str = "prompt") -> Example | RowProblem:
    prompt = _text(row.get(column), column, number)
    if isinstance(prompt, RowProblem):
        return prompt
    if isinstance(prompt, tuple):
        end = len(prompt)
        while end and prompt[end - 1]["role"] == "assistant":  # a finished conversation: prompt its last turn
            end -= 1
        prompt = prompt[:end]
    return Example(number, prompt)


_NORMALISERS = {
    "preference": _from_preference,
    "preference_implicit": lambda row, number: _from_preference(row, number, explicit=False),
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
    "prompt": _from_prompt,
    "prompt_messages": lambda row, number: _from_prompt(row, number, "messages"),
}
