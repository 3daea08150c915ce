"""Sources: each local file type and save_to_disk directories load; bad paths say what to do."""

import json

import datasets
import pytest

from align.data import DataError, load_source

ROWS = [{"prompt": "Hello", "completion": "Sure"}, {"prompt": "Tell me a joke.", "completion": "No"}]


def _write(path, rows):
    ds = datasets.Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        ds.to_json(path, lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        ds.to_csv(path, index=False)
    else:
        ds.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.csv", "rows.parquet"])
def test_each_file_type_loads(tmp_path, name):
    ds = load_source(str(_write(tmp_path / name, ROWS)), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2
    assert [ds[i] for i in range(2)] == ROWS


def test_save_to_disk_directories(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "plain"))
    assert load_source(str(tmp_path / "plain"))[1] == ROWS[1]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "one"))
    assert load_source(str(tmp_path / "one"))[0] == ROWS[0]  # a single split is unambiguous
    two = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": two, "test": two}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"holds the splits \['test', 'train'\]; point data.eval at one of them"):
        load_source(str(tmp_path / "two"), key="data.eval")
    assert load_source(str(tmp_path / "two" / "test"))[0] == ROWS[0]


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match=r"data.train='.*nope.jsonl': no such file or directory"):
        load_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "rows.txt").write_text("Hello\n")
    with pytest.raises(DataError, match=r"unknown file type '.txt'; expected one of \['.csv', '.json', '.jsonl'"):
        load_source(str(tmp_path / "rows.txt"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        load_source(str(tmp_path / "dir"))


def test_broken_jsonl_names_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": oops}\n')
    with pytest.raises(DataError, match=r"^bad.jsonl row 2: JSONDecodeError"):  # the blank line is not a row
        load_source(str(path), cache_dir=str(tmp_path / "cache"))


def test_lone_surrogate_escape_names_the_row(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d\\ud800"}\n')
    with pytest.raises(DataError, match=r"^surrogate.jsonl row 2: UnicodeEncodeError.*surrogates not allowed"):
        load_source(str(path), cache_dir=str(tmp_path / "cache"))


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\nNone,3\n"Hello, you",\n')
    ds = load_source(str(path), cache_dir=str(tmp_path / "cache"))
    assert ds[:] == {"prompt": ["None", "Hello, you"], "completion": ["3", ""]}
