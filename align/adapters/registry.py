"""The adapter-method registry: a method is a config class plus a module class, registered under a PEFT type.

Adding a method means writing those two classes and calling ``register_method``; the core (``layer.py``,
``model.py``, ``peft_format.py``) never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import AdapterError


@dataclass(frozen=True)
class AdapterMethod:
    """peft_type: the name written to ``adapter_config.json``; config_cls: an ``AdapterConfig`` subclass;
    module_cls: an ``AdapterModule`` subclass built per wrapped layer by ``module_cls.build(config, base_layer,
    dtype, path)``, or a ``ModelAdapter`` subclass built once per adapter by ``module_cls.build(config, model,
    dtype)``."""

    peft_type: str
    config_cls: type
    module_cls: type


METHODS: dict[str, AdapterMethod] = {}


def register_method(peft_type: str, config_cls: type, module_cls: type) -> None:
    if peft_type in METHODS and METHODS[peft_type].config_cls is not config_cls:
        raise AdapterError(f"adapter method {peft_type!r} is already registered")
    METHODS[peft_type] = AdapterMethod(peft_type, config_cls, module_cls)
    config_cls.peft_type = peft_type


def get_method(peft_type: str) -> AdapterMethod:
    try:
        return METHODS[peft_type.upper()]
    except KeyError:
        raise AdapterError(
            f"unknown adapter method {peft_type!r}; registered methods: {sorted(METHODS)}"
        ) from None


def method_of(config) -> AdapterMethod:
    return get_method(type(config).peft_type)
