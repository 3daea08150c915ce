"""Errors raised by the adapter engine. Each message says what was wrong and what to do."""


class AdapterError(ValueError):
    """A bad request to the adapter engine (unknown adapter, no matching module, bad config...)."""


class BaseMismatchError(AdapterError):
    """An adapter was loaded onto a base model other than the one it was trained on."""
