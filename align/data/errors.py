"""Errors raised by the data layer. Each message names the file (and row, field) and says what to do."""


class DataError(ValueError):
    """The data cannot be used as given: a missing file, an unknown format, bad rows."""


class BadRowsError(DataError):
    """Rows failed validation under ``data.on_bad_rows=error``. The message starts with the first one."""


class LintError(DataError):
    """The tokenization linter found a systematic bug (doubled BOS/EOS, lost EOS, moved boundary)."""
