"""The tokenization linter: run on a sample at start-up, it fails fast on bugs that silently corrupt
SFT/DPO (trl#4481, axolotl#1616), showing the offending example:

- a doubled BOS: the sequence starts with two BOS tokens (BOS in the data or the template, and again
  from the tokenizer);
- a doubled EOS at the end of a response (EOS in the data or the template, and again appended);
- a response that lost its EOS: the last non-whitespace token of an untruncated response is not EOS.
  A response cut by ``max_length`` is allowed to lack it (it did not end there, so the model must not
  learn to stop there);
- a moved boundary: the prompt's tokens are not a prefix of the tokens of prompt + response tokenized
  together, so training sees a different split than generation (e.g. a prompt ending in a space).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import LintError
from .rows import Example
from .tokenize import encode_texts, render, special_ids, tokenize_examples, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SHOW = 12  # tokens shown on each side of a problem


def lint_sample(examples: list[Example], n: int) -> list[Example]:
    """``n`` examples spread evenly over the dataset (all of them when there are fewer)."""
    if n <= 0 or not examples:
        return []
    step = max(1, len(examples) // n)
    return examples[::step][:n]


def lint_tokenization(examples: list[Example], tokenizer: PreTrainedTokenizerBase, *,
                      max_length: int | None = None, max_prompt_length: int | None = None,
                      source: str = "data") -> None:
    """Raise ``LintError`` on the first example with a tokenization bug (see the module docstring).

    With ``max_length``/``max_prompt_length`` the checks see the truncated ids, as training will.
    """
    bos, eos = special_ids(tokenizer)
    for example, tokenized in zip(examples, tokenize_examples(examples, tokenizer, source)):
        rendered = render(example, tokenizer, source)
        shown = _Shower(tokenizer, source, example)
        if max_length is not None and max_prompt_length is not None:
            cut = truncate(tokenized, max_length, max_prompt_length, bos)
        else:
            cut = tokenized
        first = next(iter(cut.responses.values()), ())
        start = (list(cut.prompt_ids) + list(first))[:2]
        if bos is not None and start == [bos, bos]:
            shown.fail("prompt", "doubled BOS: the sequence starts with two BOS tokens", start,
                       "remove the BOS from the data or the chat template: it is added once already")
        for name, ids in cut.responses.items():
            content = _strip_whitespace(list(ids), tokenizer)
            if content[-2:] == [eos, eos]:
                shown.fail(name, "doubled EOS at the end of the response", content[-SHOW:],
                           "remove the EOS from the data or the chat template: it is added once already")
            if name not in cut.truncated and content[-1:] != [eos]:
                shown.fail(name, f"the response lost its EOS ({tokenizer.eos_token!r}): it would never learn "
                           f"to stop", content[-SHOW:], "make the chat template end assistant turns with "
                           "tokenizer.eos_token, or set eos_token to the template's end-of-turn token")
        for name, text in rendered.responses.items():
            _check_boundary(tokenized.prompt_ids, rendered, name, text, tokenizer, shown)


def _strip_whitespace(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Drop trailing tokens that decode to whitespace (a template's newline after end-of-turn)."""
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] not in special and not tokenizer.decode([ids[-1]]).strip():
        ids = ids[:-1]
    return ids


def _check_boundary(prompt_ids, rendered, name, text, tokenizer, shown) -> None:
    joint = encode_texts([rendered.prompt + text], tokenizer)[0]
    if not rendered.chat and tokenizer.bos_token_id is not None:
        joint = [tokenizer.bos_token_id] + joint
    if tuple(joint[:len(prompt_ids)]) != tuple(prompt_ids):
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, joint)) if a != b), len(joint))
        shown.fail(name, "the prompt/response boundary moved: the prompt's tokens are not a prefix of the "
                   f"tokens of prompt + response (they differ at token {at}: prompt alone "
                   f"{tokenizer.convert_ids_to_tokens(list(prompt_ids[max(0, at - 3):at + 3]))}, together "
                   f"{tokenizer.convert_ids_to_tokens(joint[max(0, at - 3):at + 3])})",
                   list(prompt_ids[-SHOW:]), "move whitespace from the end of the prompt to the start of the "
                   "response, or fix the chat template so the prompt renders the same with a response after it")


class _Shower:
    """Formats a lint failure with the offending example."""

    def __init__(self, tokenizer, source: str, example: Example) -> None:
        self.tokenizer, self.source, self.example = tokenizer, source, example

    def fail(self, field: str, problem: str, ids: list[int], fix: str) -> None:
        shown = {"prompt": self.example.prompt}
        if field != "prompt":
            shown[field] = self.example.responses()[field]
        lines = "".join(f"  {name}: {str(value)[:300]!r}\n" for name, value in shown.items())
        raise LintError(
            f"{self.source} row {self.example.row}, field '{field}': {problem}.\n{lines}"
            f"  tokens: {self.tokenizer.convert_ids_to_tokens(list(ids))}\n"
            f"Fix: {fix}. (The tokenization linter checks data.lint_samples rows at start-up.)")
