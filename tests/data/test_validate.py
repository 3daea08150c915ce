"""Every bad input gets its own error naming the file, 1-based row and field; skip reports counts."""

import logging

import pytest

from align.data import BadRowsError, DataError, Example, prepare_preferences, prepare_prompts, prepare_sft
from align.data.validate import check_example

from .conftest import config, write_jsonl

GOOD = {"prompt": "Hello", "chosen": " Sure", "rejected": " No"}
FFFD = "\ufffd"


def _prefs(tmp_path, bad, at=2, total=3, name="prefs.jsonl"):
    rows = [dict(GOOD) for _ in range(total)]
    rows[at - 1] = bad
    return write_jsonl(tmp_path / name, rows)


@pytest.mark.parametrize("bad, field, detail", [
    ({"prompt": "Hello", "chosen": " Sure"}, "rejected", "missing value; fill it in or remove the row"),
    ({"prompt": None, "chosen": " Sure", "rejected": " No"}, "prompt", "missing value"),
    ({"prompt": "Hello", "chosen": 5, "rejected": " No"}, "chosen", "expected a string or a list of {role, content} messages, got int 5"),
    ({"prompt": [{"role": "user"}], "chosen": " Sure", "rejected": " No"}, "prompt", "message 0 is {'role': 'user'}"),
    ({"prompt": "Hello", "chosen": " Sure", "rejected": ""}, "rejected", "empty response; remove the row"),
    ({"prompt": "Hello", "chosen": " \n\t", "rejected": " No"}, "chosen", "empty response"),
    ({"prompt": "Hello", "chosen": " Sure", "rejected": " Sure"}, "rejected", "the same response as 'chosen'"),
    ({"prompt": "Hello"}, "chosen", "a prompt-only row in a preference set"),
    ({"prompt": "Hello", "chosen": f" Su{FFFD}re", "rejected": " No"}, "chosen",
     "a replacement character U+FFFD at character 3: the text was not valid UTF-8"),
])
def test_each_bad_row_names_file_row_and_field(tmp_path, tokenizer, bad, field, detail):
    path = _prefs(tmp_path, bad, at=2)
    with pytest.raises(BadRowsError) as info:
        prepare_preferences(config(path), tokenizer)
    message = str(info.value)
    assert message.startswith(f"prefs.jsonl row 2, field '{field}': ")
    assert detail in message
    assert message.endswith("or set data.on_bad_rows=skip")


def test_message_reads_as_documented(tmp_path, tokenizer):
    path = _prefs(tmp_path, {"prompt": "Hello", "chosen": " Sure", "rejected": "   "}, at=7, total=8)
    with pytest.raises(BadRowsError) as info:
        prepare_preferences(config(path), tokenizer)
    assert str(info.value) == "prefs.jsonl row 7, field 'rejected': empty response; remove the row or set data.on_bad_rows=skip"


def test_undecodable_bytes_name_row_and_field(tmp_path, tokenizer):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "Hello", "chosen": " Sure", "rejected": " No"}\n'
                     b'{"prompt": "Hello", "chosen": " Su\xffre", "rejected": " No"}\n')
    with pytest.raises(BadRowsError, match=r"^bytes.jsonl row 2, field 'chosen': bytes that are not UTF-8 "
                                           r"\(invalid start byte at byte 3\); re-encode the file as UTF-8"):
        prepare_preferences(config(path, tmp_path), tokenizer)


def test_undecodable_csv_cell_becomes_a_row_error(tmp_path, tokenizer):
    path = tmp_path / "prefs.csv"
    path.write_bytes(b'prompt,chosen,rejected\nHello, Sure, No\nHello, Su\xffre, No\n')
    with pytest.raises(BadRowsError, match=r"^prefs.csv row 2, field 'chosen': a replacement character U\+FFFD"):
        prepare_preferences(config(path, tmp_path), tokenizer)


def test_lone_surrogate_is_invalid_utf8():
    (problem,) = check_example(Example(9, "Hi\ud800", completion=" ok"), "sft")
    assert (problem.row, problem.field, problem.reason) == (9, "prompt", "invalid UTF-8")
    assert "a lone surrogate at character 2" in problem.detail


def test_empty_prompt_in_a_prompt_set(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello"}, {"prompt": "  "}])
    with pytest.raises(BadRowsError, match=r"^prompts.jsonl row 2, field 'prompt': empty prompt"):
        prepare_prompts(config(path), tokenizer)


def test_rows_over_the_limits_without_truncation(tmp_path, plain):
    long_prompt = "The capital of France is Paris."  # <s> + 7 tokens
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hello", "completion": " Sure"},
                                                {"prompt": long_prompt, "completion": " Sure"}])
    with pytest.raises(BadRowsError, match=r"^sft.jsonl row 2, field 'prompt': 8 tokens, over "
                                           r"data.max_prompt_length=6; raise the limit, set data.truncate=true"):
        prepare_sft(config(path, max_length=10, max_prompt_length=6, truncate=False), plain)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hello", "completion": " " + long_prompt}])
    with pytest.raises(BadRowsError, match=r"^sft.jsonl row 1, field 'completion': prompt \+ completion is 11 "
                                           r"tokens, over data.max_length=10"):
        prepare_sft(config(path, max_length=10, max_prompt_length=6, truncate=False), plain)


def test_truncation_that_makes_chosen_equal_rejected_is_a_bad_row(tmp_path, plain):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Hello", "chosen": " The capital of France is Paris.", "rejected": " The capital of France is"},
    ])
    # <s> Hello = 2 prompt tokens; max_length 5 leaves 3 response tokens: "The capital of" in both.
    with pytest.raises(BadRowsError, match=r"^prefs.jsonl row 1, field 'rejected': identical to 'chosen' in the "
                                           r"3 tokens that fit in data.max_length=5"):
        prepare_preferences(config(path, max_length=5, max_prompt_length=4), plain)


def test_error_policy_counts_the_other_bad_rows(tmp_path, tokenizer):
    rows = [GOOD, {"prompt": "Hello", "chosen": "", "rejected": " No"}, {"prompt": "Hello"}, {"prompt": "Hello"}]
    with pytest.raises(BadRowsError, match=r"\(3 bad rows in all: \{'empty response': 1, 'prompt-only row': 2\}\)"):
        prepare_preferences(config(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer)


def test_skip_policy_drops_and_reports_counts(tmp_path, tokenizer, caplog):
    rows = [GOOD, {"prompt": "Hello", "chosen": "", "rejected": " No"}, {"prompt": "Hello"},
            {"prompt": "Hello", "chosen": " No", "rejected": " No"}, {**GOOD, "chosen": " Sure thing"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="align.data"):
        ds = prepare_preferences(config(path, on_bad_rows="skip"), tokenizer)
    assert ds["row"] == [1, 5]
    (record,) = [r for r in caplog.records if r.name == "align.data"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("prefs.jsonl: kept 2 of 5 rows; dropped 1 (chosen == rejected), "
                                          "1 (empty response), 1 (prompt-only row); first: prefs.jsonl row 4")


def test_skip_policy_with_every_row_bad_fails(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Hello", "chosen": "", "rejected": " No"},
                                                  {"prompt": "Hi", "chosen": " x", "rejected": " x"}])
    with pytest.raises(DataError, match=r"^prefs.jsonl: no usable rows \(prefs.jsonl: kept 0 of 2 rows; dropped 1"):
        prepare_preferences(config(path, on_bad_rows="skip"), tokenizer)
