"""The tokenization linter catches planted doubled BOS/EOS, a lost EOS and a moved boundary."""

import pytest

from align.data import Example, LintError, lint_tokenization, prepare_sft
from align.data.lint import lint_sample

from .conftest import CHAT_TEMPLATE, config, make_tokenizer, write_jsonl

HELLO = ({"role": "user", "content": "Hello"},)
SURE = ({"role": "assistant", "content": "Sure"},)


def test_clean_examples_pass(tokenizer):
    lint_tokenization([
        Example(1, "Hello", completion=" Sure"),
        Example(2, HELLO, chosen=SURE, rejected=({"role": "assistant", "content": "No"},)),
        Example(3, "\n\nHuman: Hello\n\nAssistant:", chosen=" Sure", rejected=" No"),
        Example(4, "", completion="Good bye and good night."),
        Example(5, HELLO),
    ], tokenizer)


def test_doubled_bos_from_the_data(plain):
    with pytest.raises(LintError) as info:
        lint_tokenization([Example(1, "Hello", completion=" Sure"), Example(2, "<s>Hello", completion=" Sure")],
                          plain, source="sft.jsonl")
    message = str(info.value)
    assert message.startswith("sft.jsonl row 2, field 'prompt': doubled BOS: the sequence starts with two BOS tokens.")
    assert "prompt: '<s>Hello'" in message and "tokens: ['<s>', '<s>']" in message


def test_doubled_bos_from_the_template():
    tokenizer = make_tokenizer(chat_template="{{ bos_token }}" + CHAT_TEMPLATE)
    with pytest.raises(LintError, match=r"row 1, field 'prompt': doubled BOS"):
        lint_tokenization([Example(1, HELLO, completion=SURE)], tokenizer)


def test_doubled_eos_from_the_data(plain):
    with pytest.raises(LintError) as info:
        lint_tokenization([Example(7, "Hello", chosen=" Sure</s>", rejected=" No")], plain)
    assert str(info.value).startswith("data row 7, field 'chosen': doubled EOS at the end of the response.")
    assert "tokens: ['ĠSure', '</s>', '</s>']" in str(info.value)


def test_doubled_eos_from_the_template():
    tokenizer = make_tokenizer(chat_template=CHAT_TEMPLATE.replace("{{ eos_token }}", "{{ eos_token }}{{ eos_token }}"))
    with pytest.raises(LintError, match=r"row 1, field 'completion': doubled EOS"):
        lint_tokenization([Example(1, HELLO, completion=SURE)], tokenizer)


def test_a_template_without_eos_loses_it():
    tokenizer = make_tokenizer(chat_template=CHAT_TEMPLATE.replace("{{ eos_token }}", ""))
    with pytest.raises(LintError, match=r"row 1, field 'completion': the response lost its EOS \('</s>'\)"):
        lint_tokenization([Example(1, HELLO, completion=SURE)], tokenizer)


def test_a_truncated_response_may_lack_eos(tokenizer):
    example = Example(1, "Hello", completion=" The capital of France is Paris.")
    lint_tokenization([example], tokenizer, max_length=4, max_prompt_length=2)  # cut after 2 tokens: fine
    with pytest.raises(LintError, match="doubled EOS"):  # but truncation does not hide a doubled EOS
        lint_tokenization([Example(1, "Hello", completion=" Sure</s>")], tokenizer, max_length=5, max_prompt_length=2)


def test_moved_boundary_from_a_trailing_space(plain):
    """' Sure' is one token; split after the space it becomes 'Ġ' + 'Sure', so the prompt's last token
    ('Ġ') is not the start of prompt + response tokenized together ('ĠSure')."""
    with pytest.raises(LintError) as info:
        lint_tokenization([Example(4, "Question: hi\nAnswer: ", completion="Sure")], plain)
    message = str(info.value)
    assert message.startswith("data row 4, field 'completion': the prompt/response boundary moved")
    assert "differ at token 9: prompt alone ['ns', 'wer', ':', 'Ġ'], together ['ns', 'wer', ':', 'ĠSure']" in message
    assert "  prompt: 'Question: hi\\nAnswer: '\n  completion: 'Sure'\n" in message
    assert "move whitespace from the end of the prompt to the start of the response" in message
    lint_tokenization([Example(4, "Question: hi\nAnswer:", completion=" Sure")], plain)  # the fix


def test_moved_boundary_under_the_template():
    # The generation prompt ends "<|assistant|>\n", but an assistant turn renders "<|assistant|>" + content.
    template = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>",
                                     "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}")
    with pytest.raises(LintError, match=r"row 1, field 'completion': the prompt/response boundary moved under "
                                        r"the chat template"):
        lint_tokenization([Example(1, HELLO, completion=SURE)], make_tokenizer(chat_template=template))


def test_prepare_lints_a_sample_at_start_up(tmp_path, tokenizer):
    rows = [{"prompt": "Hello", "completion": " Sure"}] * 3 + [{"prompt": "Hello", "completion": " Sure</s>"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(LintError, match=r"^sft.jsonl row 4, field 'completion': doubled EOS"):
        prepare_sft(config(path), tokenizer)
    assert len(prepare_sft(config(path, lint_samples=0), tokenizer)) == 4  # the linter can be turned off


def test_lint_sample_spreads_over_the_data():
    examples = [Example(i, "p") for i in range(1, 11)]
    assert [e.row for e in lint_sample(examples, 3)] == [1, 4, 7]
    assert [e.row for e in lint_sample(examples, 32)] == list(range(1, 11))
    assert lint_sample(examples, 0) == []
