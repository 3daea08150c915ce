"""Load user data into a ``datasets.Dataset``: local JSONL/JSON/parquet/CSV files, ``save_to_disk``
directories, or (with ``data.allow_hub=true``, online) a Hub dataset name. The user's files are only read, never
written.

A name that is not a local path but looks like a Hub dataset (``my_sft_data``, ``org/name``) is refused at once
while Hub datasets are off, which is the default of every align entry point (``align.offline``): no download is
attempted, and the error names the config key and the way to opt in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import datasets

from align.offline import OFFLINE_VARS, hub_allowed

from .errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def source_name(source: str) -> str:
    """The short name used in messages: the file or directory name (``prefs.jsonl``)."""
    return Path(source).name or source


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _is_hub_name(source: str) -> bool:
    return _HUB_NAME.match(source) is not None and _builder(Path(source)) is None


def check_hub_name(source: str, key: str, allow_hub: bool | None = None) -> None:
    """Raise ``DataError`` (naming ``key``) when ``source`` is not a local path but a Hub-looking name and Hub
    datasets are off: ``allow_hub`` False, or None and the environment says offline (``align.offline``)."""
    if Path(source).expanduser().exists() or not _is_hub_name(source):
        return
    if allow_hub or (allow_hub is None and hub_allowed()):
        return
    offline = [f"{var}={os.environ[var]}" for var in OFFLINE_VARS if var in os.environ]
    why = f" ({', '.join(offline)})" if allow_hub is None and offline else ""
    raise DataError(f"{key}={source!r} is not a local file or directory (nothing at "
                    f"{Path(source).expanduser().resolve()}), and Hugging Face Hub datasets are off{why}: point "
                    f"{key} at a JSONL/JSON/parquet/CSV file or a datasets save_to_disk directory, or set "
                    "data.allow_hub=true to load it from the Hub (that needs network)")


def load_source(source: str, key: str = "data.train", cache_dir: str | None = None,
                split: str = "train", allow_hub: bool | None = None) -> datasets.Dataset:
    """Read ``source`` (the value of config key ``key``) into a Dataset, one row per record.

    Row ``i`` (0-based) is the user's row ``i + 1``: for JSONL the (i+1)-th non-blank line, for CSV the
    (i+1)-th record after the header. CSV cells are read as strings (``"None"`` stays text, an empty
    cell is ``""``); undecodable bytes in CSV become U+FFFD, which validation reports per row.
    ``split`` is only used for a Hub name. ``cache_dir`` holds the ``datasets`` Arrow cache.
    ``allow_hub``: whether a Hub name may be downloaded (None: unless the environment says offline, see
    ``check_hub_name``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_saved(path, key)
    if path.exists():
        return _load_file(path, key, cache_dir)
    if _is_hub_name(source):
        check_hub_name(source, key, allow_hub)
        return _load_hub(source, key, cache_dir, split)
    hint = f"one of {sorted(BUILDERS)}" if _builder(path) is None else "an existing file"
    raise DataError(f"{key}={source!r}: no such file or directory; expected {hint}, a datasets "
                    f"save_to_disk directory or a Hub dataset name; check the path")


def _load_file(path: Path, key: str, cache_dir: str | None) -> datasets.Dataset:
    builder = _builder(path)
    if builder is None:
        raise DataError(f"{key}={str(path)!r}: unknown file type {path.suffix!r}; expected one of "
                        f"{sorted(BUILDERS)} (optionally compressed), or convert the file")
    if _blank_file(path):
        raise _empty(key, path)
    try:
        loaded = _read(builder, path, cache_dir)
    except Exception as exc:  # re-raised with the file and the line that broke it
        where = _first_bad_json_line(path) if builder == "json" else None
        cause = exc.__cause__ or exc
        raise DataError(f"{path.name}{where or ''}: could not be read as {builder}: {cause}; fix the file "
                        f"(every record must be a JSON object / a well-formed row, text valid UTF-8)") from exc
    if loaded is None or len(loaded) == 0:  # a CSV header, or a parquet file, without rows
        raise _empty(key, path)
    return loaded


def _read(builder: str, path: Path, cache_dir: str | None) -> datasets.Dataset | None:
    """The file through its `datasets` builder; None for a CSV file with a header and no rows."""
    kwargs: dict = {}
    if builder == "csv":  # every column as text: "3" and "None" are responses, not a number and a null
        import pandas as pd  # a dependency of datasets

        head = pd.read_csv(path, nrows=1, encoding_errors="replace", keep_default_na=False, dtype=str)
        if head.empty:
            return None
        kwargs = {"features": datasets.Features({name: datasets.Value("string") for name in head.columns}),
                  "keep_default_na": False, "encoding_errors": "replace"}
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)


def _blank_file(path: Path) -> bool:
    """Nothing but whitespace in an uncompressed file (read up to its first other byte)."""
    if path.suffix.lower() in COMPRESSIONS:
        return False
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def _empty(key: str, path: Path) -> DataError:
    return DataError(f"{key}={str(path)!r} is empty: it holds no rows; point {key} at a file with data (one "
                     "record per line for JSONL, rows under a header for CSV) or a datasets directory with rows")


def _saved_without_rows(path: Path) -> bool:
    """A save_to_disk directory written from a dataset of no rows (``datasets`` cannot load one back)."""
    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _first_bad_json_line(path: Path) -> str | None:
    """Diagnostics only, after the loader failed: the first JSONL line that is not valid JSON or UTF-8."""
    if path.suffix.lower() != ".jsonl":
        return None
    row = 0
    with path.open("rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            row += 1
            try:
                json.dumps(json.loads(line.decode("utf-8")), ensure_ascii=False).encode("utf-8")
            except (ValueError, UnicodeError) as exc:
                return f" row {row}: {type(exc).__name__}: {exc}"
    return None


def _load_saved(path: Path, key: str) -> datasets.Dataset:
    if not any((path / marker).exists() for marker in _SAVED_MARKERS):
        raise DataError(f"{key}={str(path)!r} is a directory but not a datasets save_to_disk directory; "
                        f"point {key} at a data file or at a directory written by Dataset.save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # an IndexError deep in `datasets` for a dataset saved without rows
        if _saved_without_rows(path):
            raise _empty(key, path) from None
        raise DataError(f"{key}={str(path)!r} could not be read as a datasets directory ({type(exc).__name__}: "
                        f"{exc}); write it again with Dataset.save_to_disk") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise DataError(f"{key}={str(path)!r} holds the splits {sorted(loaded)}; point {key} at one "
                            f"of them, e.g. {str(path / sorted(loaded)[0])!r}")
        loaded = next(iter(loaded.values()))
    if len(loaded) == 0:
        raise _empty(key, path)
    return loaded


def _load_hub(name: str, key: str, cache_dir: str | None, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as exc:  # offline, unknown name, missing split ...
        raise DataError(f"{key}={name!r}: not a local path, and loading it from the Hugging Face Hub failed "
                        f"({exc}); check the path, or download the data and point {key} at it") from exc


def source_fingerprint(source: str) -> str | None:
    """SHA-256 of the source's bytes (a file, or every file of a directory, by relative path).

    ``None`` for a Hub name: the caller uses the loaded dataset's own fingerprint.
    """
    path = Path(source).expanduser()
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
