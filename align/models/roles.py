"""The four roles of RLHF on one frozen base: policy, reference, reward and value.

A role is an adapter name (None: the bare base), the head it reads out with ('lm' for token log-probs, 'score' for
one scalar per sequence, 'value' for one scalar per token) and whether it trains. Roles are fixed at setup;
switching to a role only makes its adapter the active one (``use_role``), it never copies or reloads the base and
never changes ``requires_grad``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

from align.adapters import AdapterModel

POLICY, REFERENCE, REWARD, VALUE = "policy", "reference", "reward", "value"
ROLE_NAMES = (POLICY, REFERENCE, REWARD, VALUE)
HeadKind = Literal["lm", "score", "value"]


@dataclass(frozen=True)
class Role:
    """``name`` one of ``ROLE_NAMES``; ``adapter`` the adapter that plays it (None: the bare base); ``head`` what
    reads it out; ``trainable`` whether its adapter (and head) receive updates."""

    name: str
    adapter: str | None
    head: HeadKind
    trainable: bool

    def __post_init__(self) -> None:
        if self.name not in ROLE_NAMES:
            raise ValueError(f"role {self.name!r}: expected one of {ROLE_NAMES}")
        if self.head not in ("lm", "score", "value"):
            raise ValueError(f"role {self.name!r}: head {self.head!r} is not one of 'lm', 'score', 'value'")
        if self.trainable and self.adapter is None:
            raise ValueError(f"role {self.name!r} trains but has no adapter: the base never trains")


def use_role(model: AdapterModel, role: Role) -> AbstractContextManager[AdapterModel]:
    """Run the block with ``role``'s adapter active (the bare base when it has none)."""
    return model.use(role.adapter)


def check_roles(model: AdapterModel, roles: dict[str, Role]) -> None:
    """Each role's adapter exists and its parameters' ``requires_grad`` matches ``trainable``; two trainable roles
    never share an adapter (their updates would mix)."""
    for role in roles.values():
        if role.adapter is None:
            continue
        if role.adapter not in model.adapter_names:
            raise ValueError(f"role {role.name!r} wants adapter {role.adapter!r}, which the model lacks "
                             f"(adapters: {model.adapter_names})")
        flags = {p.requires_grad for p in model.adapter_parameters(role.adapter)}
        if flags != {role.trainable}:
            state = "trainable" if role.trainable else "frozen"
            raise ValueError(f"role {role.name!r} is {state} but adapter {role.adapter!r} is not; "
                             f"{'unfreeze' if role.trainable else 'freeze'} it at setup")
    trained = [r.adapter for r in roles.values() if r.trainable]
    if len(trained) != len(set(trained)):
        raise ValueError(f"two trainable roles share an adapter: {trained}")
