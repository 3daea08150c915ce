"""Render and tokenize examples with an exact prompt/response boundary, then truncate explicitly.

Rendering: when the tokenizer has a chat template, a conversational example, or a string prompt and
responses (wrapped as one user turn and assistant turns), go through ``tokenizer.apply_chat_template``:
the prompt with ``add_generation_prompt=True``; the response text is what the whole conversation adds
after it, so it carries the template's end-of-turn tokens. Otherwise, and always for already formatted
text (``text`` rows, HH transcripts), plain concatenation: BOS (if the tokenizer has one) + prompt, and
response + EOS.

Tokenization: the prompt text is tokenized once and each response text separately, always with
``add_special_tokens=False`` (BOS/EOS come only from the rendering above, never twice). So the
boundary is exact by construction; the linter checks that it matches joint tokenization.

Truncation (the same for chosen and rejected): a prompt over ``max_prompt_length`` keeps its last
tokens (and its leading BOS); then every response is cut to ``max_length - len(prompt)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import DataError, LintError
from .rows import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ENCODE_BATCH = 1000


@dataclass(frozen=True)
class Rendered:
    """The texts of one example before tokenization; ``chat`` says whether the template made them."""

    row: int
    prompt: str
    responses: dict[str, str]
    chat: bool


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one example. ``prompt_ids`` (P,) and each response (R,) concatenate to the model's
    input; ``truncated`` names the parts ('prompt', 'chosen', ...) that truncation cut."""

    row: int
    prompt_ids: tuple[int, ...]
    responses: dict[str, tuple[int, ...]]
    truncated: frozenset[str] = frozenset()


def render(example: Example, tokenizer: PreTrainedTokenizerBase, source: str = "data") -> Rendered:
    """The prompt and response texts of ``example`` (see the module docstring). Raises ``LintError``
    when the template renders the prompt differently once a response follows it."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not example.chat and (example.raw or not has_template):
        return Rendered(example.row, example.prompt, dict(example.responses()), chat=False)
    if not example.chat:
        example = _as_conversation(example)
    if not has_template:
        raise DataError(f"{source} row {example.row} is a conversation but the tokenizer has no chat template; set "
                        f"tokenizer.chat_template, or write the data as plain prompt/response strings")
    prompt = list(example.prompt)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    responses = {}
    for name, messages in example.responses().items():
        full = tokenizer.apply_chat_template(prompt + list(messages), tokenize=False)
        if not full.startswith(prompt_text):
            raise LintError(
                f"{source} row {example.row}, field '{name}': the prompt/response boundary moved under the chat "
                f"template: the prompt rendered alone is not a prefix of prompt + response.\n"
                f"  prompt alone:      {prompt_text!r}\n  prompt + response: {full!r}\n"
                f"Fix the chat template so that the generation prompt renders exactly as the start of the "
                f"assistant turn (add_generation_prompt=True must be a prefix of the full conversation)")
        responses[name] = full[len(prompt_text):]
    return Rendered(example.row, prompt_text, responses, chat=True)


def _as_conversation(example: Example) -> Example:
    """A string prompt as one user turn, string responses as assistant turns."""
    fields = {name: ({"role": "assistant", "content": text},) for name, text in example.responses().items()}
    return replace(example, prompt=({"role": "user", "content": example.prompt},), **fields)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int]:
    """(bos_token_id or None, eos_token_id); a tokenizer without EOS cannot end a response."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; set tokenizer.eos_token to the token that ends a "
                        "response (for chat models, the template's end-of-turn token)")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each text, without special tokens added by the tokenizer's post-processor."""
    out: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_BATCH):
        chunk = texts[start:start + ENCODE_BATCH]
        out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else [])
    return out


def tokenize_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase,
                      source: str = "data") -> list[Tokenized]:
    """Render and tokenize (untruncated) every example; texts are encoded in batches."""
    bos, eos = special_ids(tokenizer)
    rendered = [render(example, tokenizer, source) for example in examples]
    texts = [text for r in rendered for text in (r.prompt, *r.responses.values())]
    ids = iter(encode_texts(texts, tokenizer))
    out = []
    for r in rendered:
        prompt = next(ids)
        responses = {name: next(ids) for name in r.responses}
        if not r.chat:  # plain data: BOS + prompt, response + EOS
            prompt = ([bos] if bos is not None else []) + prompt
            responses = {name: value + [eos] for name, value in responses.items()}
        out.append(Tokenized(r.row, tuple(prompt), {k: tuple(v) for k, v in responses.items()}))
    return out


def truncate(example: Tokenized, max_length: int, max_prompt_length: int, bos_id: int | None) -> Tokenized:
    """Keep the prompt's last ``max_prompt_length`` tokens (and its leading BOS), then cut each response
    to fit ``max_length``. The same budget applies to chosen and rejected."""
    prompt, cut = example.prompt_ids, set()
    if len(prompt) > max_prompt_length:
        keep_bos = bos_id is not None and prompt[0] == bos_id
        prompt = prompt[:1] * keep_bos + prompt[len(prompt) - (max_prompt_length - keep_bos):]
        cut.add("prompt")
    budget = max_length - len(prompt)
    responses = {}
    for name, ids in example.responses.items():
        responses[name] = ids[:budget]
        if len(ids) > budget:
            cut.add(name)
    return replace(example, prompt_ids=prompt, responses=responses, truncated=frozenset(cut))


def sequence(prompt_ids: tuple[int, ...] | list[int], response_ids: tuple[int, ...] | list[int]
             ) -> tuple[list[int], list[bool]]:
    """``input_ids`` (P+R,) and ``response_mask`` (P+R,): True on the response tokens, the ones that
    count in a completion-only loss (labels are the input ids there and -100 elsewhere)."""
    return list(prompt_ids) + list(response_ids), [False] * len(prompt_ids) + [True] * len(response_ids)
