"""The base class of every adapter method's config, and its PEFT ``adapter_config.json`` round trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import AdapterError

Targets = tuple[str, ...] | str | None


def _normalise_targets(value: Any, key: str) -> Targets:
    """A list of module names (matched as path suffixes), a regex string (full match on the path) or
    'all-linear'. Lists become tuples so configs stay immutable."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    raise AdapterError(f"{key} must be a list of module names, a regex string or 'all-linear'; got {value!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """Fields shared by every method. ``peft_type`` is set by ``register_method``."""

    peft_type: ClassVar[str] = ""
    # PEFT-format keys that we read but that carry no meaning for us (written by PEFT, derived by us, ...).
    ignored_peft_keys: ClassVar[frozenset[str]] = frozenset()

    target_modules: Targets = "all-linear"
    exclude_modules: Targets = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules, "target_modules"))
        object.__setattr__(self, "exclude_modules", _normalise_targets(self.exclude_modules, "exclude_modules"))
        if self.target_modules is None or self.target_modules == ():
            raise AdapterError("target_modules is empty: name the layers to adapt, a regex, or 'all-linear'")

    def to_peft_dict(self) -> dict[str, Any]:
        """The fields as PEFT writes them in ``adapter_config.json``."""
        out: dict[str, Any] = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM"}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
        """Build from a PEFT ``adapter_config.json`` dict. Keys PEFT writes that we do not model are ignored only
        when they hold their neutral value; a non-neutral unknown setting is refused (it would change the math)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, value in data.items():
            if key in names or key in cls.ignored_peft_keys or key in _PEFT_BOOKKEEPING:
                continue
            if value not in (None, False, {}, [], "", 0):
                raise AdapterError(
                    f"{source}: setting {key}={value!r} is not supported by align's {cls.peft_type} adapters; "
                    "remove it or retrain without it"
                )
        return cls(**kwargs)


# Keys of adapter_config.json that describe the file rather than the math.
_PEFT_BOOKKEEPING = frozenset(
    {
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
        "peft_version", "fan_in_fan_out", "megatron_core", "qalora_group_size", "align",
    }
)
