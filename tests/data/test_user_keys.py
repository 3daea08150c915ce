"""Data errors name the key the user set (data.sft, not data.train), empty files say so, bad prompts are refused
with their row, and exact duplicate rows are reported and never straddle a held-out split."""

import logging

import datasets
import pytest

from align.data import BadRowsError, DataError, load_prompts, prepare_preferences, prepare_sft, split_heldout

from .conftest import config, write_jsonl

SFT = [{"prompt": "Hello", "completion": " Sure"}, {"prompt": "Tell me a joke.", "completion": " No"},
       {"prompt": "What is the capital of France?", "completion": " Paris."}]


# ------------------------------------------------------------------------------------------------ the user's key
def test_bad_rows_name_the_users_key_and_path(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [*SFT, {"prompt": "Hello", "completion": ""}])
    with pytest.raises(BadRowsError) as info:
        prepare_sft(config(path), tokenizer, key="data.sft")
    assert str(info.value).startswith(f"data.sft={path} row 4, field 'completion': empty response")


def test_a_missing_file_names_the_users_key(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"^data.preferences='.*nope.jsonl': no such file"):
        prepare_preferences(config(tmp_path / "nope.jsonl"), tokenizer, key="data.preferences")


def test_without_a_key_messages_keep_the_file_name(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [*SFT, {"prompt": "Hello", "completion": ""}])
    with pytest.raises(BadRowsError, match=r"^sft.jsonl row 4, field 'completion'"):
        prepare_sft(config(path), tokenizer)


# ------------------------------------------------------------------------------------------------ empty files
@pytest.mark.parametrize(("name", "text"), [
    ("empty.jsonl", ""),  # was: "could not be read as json: ;"
    ("blank.jsonl", "\n\n  \n"),  # was: a raw `datasets` message ('Instruction "train" corresponds to no data!')
    ("header.csv", "prompt,completion\n"),  # was: "no usable rows (... kept 0 of 0 rows)"
])
def test_an_empty_file_says_it_is_empty(tmp_path, tokenizer, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        prepare_sft(config(path), tokenizer, key="data.sft")
    assert str(info.value).startswith(f"data.sft={str(path)!r} is empty: it holds no rows; point data.sft at a "
                                      "file with data")


def test_an_empty_prompts_file_names_its_key(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=r"^data.eval_prompts='.*eval.jsonl' is empty: it holds no rows"):
        load_prompts(str(path), "data.eval_prompts")


def test_an_empty_saved_dataset_says_it_is_empty(tmp_path, tokenizer):
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"^data.sft='.*saved' is empty: it holds no rows"):
        prepare_sft(config(tmp_path / "saved"), tokenizer, key="data.sft")


# ------------------------------------------------------------------------------------------------ eval prompts
@pytest.mark.parametrize(("bad", "detail"), [
    ({"prompt": None}, "missing value"),
    ({"prompt": ""}, "empty prompt"),
    ({"prompt": "   "}, "empty prompt"),
])
def test_null_or_empty_eval_prompts_are_refused_with_their_row(tmp_path, bad, detail):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Hello"}, {"prompt": "Hi"}, bad])
    with pytest.raises(BadRowsError) as info:
        load_prompts(str(path), "data.eval_prompts", limit=1)  # every row is checked, not only the first `limit`
    assert str(info.value).startswith(f"data.eval_prompts={path} row 3, field 'prompt': {detail}")


# ------------------------------------------------------------------------------------------------ duplicates
def test_exact_duplicates_are_reported_with_their_rows(tmp_path, tokenizer, caplog):
    rows = [SFT[0], SFT[1], SFT[0], SFT[2], SFT[1], SFT[0]]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="align.data"):
        ds = prepare_sft(config(path), tokenizer, key="data.sft")
    assert len(ds) == 6  # reported, not dropped
    (record,) = [r for r in caplog.records if r.name == "align.data"]
    assert record.levelno == logging.WARNING
    assert (f"data.sft={path}: kept 6 of 6 rows; 3 exact duplicate rows (row 3 repeats row 1, row 5 repeats "
            "row 2, row 6 repeats row 1): kept, each copy used again") in record.getMessage()


def test_the_same_report_warns_once_per_process(tmp_path, tokenizer, caplog):
    """Iterative DPO reads its prompts file again every round: the same warning is not repeated."""
    path = write_jsonl(tmp_path / "sft.jsonl", [SFT[0], SFT[1], SFT[0]])
    with caplog.at_level(logging.DEBUG, logger="align.data"):
        for _ in range(3):
            prepare_sft(config(path), tokenizer, key="data.sft")
    levels = [r.levelno for r in caplog.records if r.name == "align.data" and "duplicate" in r.getMessage()]
    assert levels[0] == logging.WARNING and set(levels[1:]) <= {logging.DEBUG} and len(levels) == 3


def test_a_file_without_duplicates_logs_no_warning(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="align.data"):
        prepare_sft(config(write_jsonl(tmp_path / "sft.jsonl", SFT)), tokenizer)
    (record,) = [r for r in caplog.records if r.name == "align.data"]
    assert record.levelno == logging.INFO and "duplicate" not in record.getMessage()


def _rows(*values: int) -> datasets.Dataset:
    """A prepared-looking dataset: user row numbers 1.. and one token column holding ``values``."""
    return datasets.Dataset.from_dict({"row": list(range(1, len(values) + 1)),
                                       "prompt_ids": [[v, v + 1] for v in values]})


def test_split_without_duplicates_is_the_tail_as_before():
    train, held = split_heldout(_rows(*range(10)), 3)
    assert (train["row"], held["row"]) == ([1, 2, 3, 4, 5, 6, 7], [8, 9, 10])
    train, held = split_heldout(_rows(*range(10)), 50)  # at most half
    assert (train["row"], held["row"]) == ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    train, held = split_heldout(_rows(*range(4)), 0)
    assert (train["row"], held["row"]) == ([1, 2, 3, 4], [])


def test_split_keeps_every_copy_of_a_row_on_one_side():
    """Row 10 repeats row 2: the tail split held out row 10 and trained on row 2, the same content."""
    values = [0, 1, 2, 3, 4, 5, 6, 7, 8, 1]
    train, held = split_heldout(_rows(*values), 3)
    assert held["row"] == [2, 9, 10]  # row 10's earlier copy goes with it
    assert train["row"] == [1, 3, 4, 5, 6, 7, 8]
    assert not set(map(tuple, train["prompt_ids"])) & set(map(tuple, held["prompt_ids"]))
    assert split_heldout(_rows(*values), 3)[1]["row"] == held["row"]  # deterministic


def test_split_never_holds_out_more_than_half_for_a_copied_row():
    """Row 6 has four copies: holding it out would take 4 of 6 rows, so it stays in training (all copies) and
    the next distinct rows are held out instead."""
    train, held = split_heldout(_rows(9, 9, 1, 2, 9, 9), 2)
    assert held["row"] == [3, 4] and train["row"] == [1, 2, 5, 6]
