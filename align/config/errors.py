"""Errors raised while validating configs. Each names the dotted key, the bad value and what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is invalid: ``data.on_bad_rows='drop': expected one of ('error', 'skip')``."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: expected {allowed}")

    def __reduce__(self):  # keep the three-argument constructor picklable (Ray ships exceptions)
        return (type(self), (self.key, self.value, self.allowed))
