"""Typed, frozen config schemas (one dataclass per YAML group). Imports only the standard library."""

from .data import DataConfig
from .errors import ConfigError

__all__ = ["ConfigError", "DataConfig"]
