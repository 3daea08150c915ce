"""Reward functions: anything that scores (prompt, response) text pairs.

Trainers accept any ``RewardFn`` (a callable from lists of prompts and responses to a (B,) float tensor) and do
not care whether it is a learned reward model, a rule, a user's function or the embedded task's hidden scorer.

A reward *spec* in the config (``trainer.<rl stage>.reward``, ``trainer.dpo.pair_reward``, ``eval.reward``) is

    a name          a built-in: ground_truth, length, regex, exact_match, classifier (defaults for its parameters)
    module:function a Python callable: ``package.module:function`` or ``path/to/file.py:function``
    a mapping       {name: <built-in or callable>, weight: 1.0, <the built-in's parameters>}
    a list          of mappings: the weighted sum of their rewards

``build_reward(spec, key, columns)`` turns a spec into one ``RewardFn``; ``check_reward_spec`` validates it at
start-up (unknown names and parameters, import errors, missing functions). At call time every component's output
is checked: one finite number per response, or a ValueError naming the function and the first bad item.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from align.data.synthetic import score as ground_truth_score

from .rules import ExactMatchReward, LengthReward, RegexReward
from .user import accepted_columns, is_callable_spec, load_callable


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards, shape (B,), float32, one per (prompt, response) pair."""
        ...


class GroundTruthReward:
    """The embedded review world's hidden scorer (see ``align.data.synthetic.scorer``). Prompts are ignored: the
    score is a property of the continuation."""

    name = "ground_truth"
    columns = ()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return torch.tensor([ground_truth_score(r) for r in responses], dtype=torch.float32)


def _classifier(**params):
    from .classifier import ClassifierReward

    return ClassifierReward(**params)


# built-in name -> the factory taking the rule's parameters
REWARD_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "ground_truth": GroundTruthReward, "length": LengthReward, "regex": RegexReward,
    "exact_match": ExactMatchReward, "classifier": _classifier,
}
_PARAMS = {"classifier": ("path", "label", "batch_size", "max_length", "device")}  # _classifier takes **params
SPEC_KEYS = ("name", "weight")


def get_reward_function(name: str) -> RewardFn:
    """A built-in by name, with default parameters."""
    if name not in REWARD_FUNCTIONS:
        raise ValueError(f"unknown reward function {name!r}; available: {sorted(REWARD_FUNCTIONS)}")
    return REWARD_FUNCTIONS[name]()


# ------------------------------------------------------------------------------------------------ specs
def components(spec: Any, key: str) -> list[dict]:
    """The spec as a list of {name, weight, **params} mappings. Raises ValueError naming ``key``."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError(f"{key}: an empty list of rewards")
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(spec, (list, tuple)) else key
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ValueError(f"{where}={item!r}: expected a reward name, 'module:function', or a mapping with a "
                             "'name' key (and 'weight' and the reward's parameters)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{where}.weight={weight!r}: expected a finite number")
        out.append({**item, "weight": float(weight), "key": where})
    return out


def spec_names(spec: Any) -> list[str]:
    """The names in a spec (``model``, built-ins, callables), without validating anything else."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    return [item if isinstance(item, str) else str(item.get("name")) if isinstance(item, Mapping) else str(item)
            for item in items]


def _params_of(name: str) -> tuple[str, ...]:
    if name in _PARAMS:
        return _PARAMS[name]
    sig = inspect.signature(REWARD_FUNCTIONS[name])
    return tuple(p for p in sig.parameters if p != "self")


def _instantiate(item: dict) -> tuple[str, Callable]:
    name, where = item["name"], item["key"]
    params = {k: v for k, v in item.items() if k not in (*SPEC_KEYS, "key")}
    if name in REWARD_FUNCTIONS:
        allowed = _params_of(name)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: {name} has no parameter {unknown[0]!r} (its parameters: "
                             f"{', '.join(allowed) or 'none'}; besides name and weight)")
        try:
            return name, REWARD_FUNCTIONS[name](**params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} ({name}): {exc}") from None
    if is_callable_spec(name):
        if params:
            raise ValueError(f"{where}: a function reward takes only name and weight (got {sorted(params)}); "
                             "give your function its settings in its own file")
        try:
            return name, load_callable(name)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    from align.config.build import suggest

    raise ValueError(f"{where}={name!r}: not a reward: expected 'model', a built-in ({', '.join(REWARD_FUNCTIONS)})"
                     f"{suggest(name, list(REWARD_FUNCTIONS))} or a Python function as package.module:function or "
                     "path/to/file.py:function")


def check_reward_spec(spec: Any, key: str) -> None:
    """Validate ``spec`` at start-up (imports user modules, instantiates built-ins without loading models).
    ``model`` (the learned reward model) is checked by the run config, and cannot be combined here."""
    items = components(spec, key)
    for item in items:
        if item["name"] == "model":
            if len(items) > 1:
                raise ValueError(f"{item['key']}: 'model' (the reward model) cannot be summed with other rewards "
                                 "yet; use it alone")
            continue
        _instantiate(item)


# ------------------------------------------------------------------------------------------------ columns
class PromptColumns:
    """Extra columns of a prompts file, found by the prompt text a trainer passes.

    Trainers pass the prompt as text: the decoded prompt tokens (chat template included) in RL and evaluation, the
    user's own words for on-policy pairs. ``entries`` maps every such text to (the user's prompt words, that row's
    extra columns); a reward function is always called with the user's words."""

    def __init__(self, entries: dict[str, tuple[str, dict]], source: str) -> None:
        self.entries, self.source = entries, source

    @classmethod
    def build(cls, keys: Sequence[Sequence[str]], words: Sequence[str], columns: Sequence[dict], rows: Sequence[int],
              source: str) -> PromptColumns:
        """``keys[i]``: the texts row ``rows[i]`` is known by; ``words[i]``: its prompt; ``columns[i]``: its columns."""
        entries: dict[str, tuple[str, dict]] = {}
        first_row: dict[str, int] = {}
        for texts, word, cols, row in zip(keys, words, columns, rows):
            for text in texts:
                if text in entries and entries[text][1] != cols:
                    raise ValueError(f"{source} rows {first_row[text]} and {row} have the same prompt "
                                     f"{_excerpt(word)!r} with different columns ({entries[text][1]} vs {cols}); a "
                                     "reward cannot tell which row a response answers: make the prompts unique")
                entries.setdefault(text, (word, cols))
                first_row.setdefault(text, row)
        return cls(entries, source)

    def lookup(self, prompts: Sequence[str]) -> tuple[list[str], dict[str, list]]:
        words, found = [], []
        for i, prompt in enumerate(prompts):
            entry = self.entries.get(prompt)
            if entry is None:
                raise ValueError(f"prompt {i} ({_excerpt(prompt)!r}) is not one of the prompts of {self.source}: the "
                                 "reward's columns cannot be found")
            words.append(entry[0])
            found.append(entry[1])
        names = sorted({k for cols in found for k in cols})
        return words, {name: [cols.get(name) for cols in found] for name in names}


def _excerpt(text: Any, limit: int = 60) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ calling
class _Component:
    def __init__(self, name: str, fn: Callable, weight: float) -> None:
        self.name, self.fn, self.weight = name, fn, weight
        if hasattr(fn, "columns"):  # a built-in says which columns it reads
            self.wants, self.var_kw = set(fn.columns), False
        else:
            self.wants, self.var_kw = accepted_columns(fn)

    def __call__(self, prompts: list[str], responses: list[str], columns: dict[str, list]) -> torch.Tensor:
        passed = dict(columns) if self.var_kw else {k: v for k, v in columns.items() if k in self.wants}
        missing = sorted(n for n in self.wants if n not in columns and not _has_default(self.fn, n))
        if missing:
            raise ValueError(f"reward {self.name}: needs the column(s) {missing} from the prompts file (columns "
                             f"there: {sorted(columns) or 'none'})")
        return checked(self.name, self.fn(prompts, responses, **passed), prompts)


def _has_default(fn: Callable, name: str) -> bool:
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is not param.empty


def checked(name: str, values: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``values`` as a (B,) float32 tensor, or a ValueError naming the reward and its first bad item."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist() if values.dim() <= 1 else values.tolist()
    elif hasattr(values, "tolist"):  # numpy
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"reward {name} returned {type(values).__name__}, not a sequence of numbers "
                         f"(one per response)") from None
    if len(values) != len(prompts):
        raise ValueError(f"reward {name} returned {len(values)} values for {len(prompts)} responses")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"reward {name}: item {i} (prompt {_excerpt(prompts[i])!r}) is {value!r}, not a number")
        if not math.isfinite(value):
            raise ValueError(f"reward {name}: item {i} (prompt {_excerpt(prompts[i])!r}) is {value}: rewards must "
                             "be finite")
    return torch.tensor(values, dtype=torch.float32)


class Reward:
    """The weighted sum of a spec's components, with the prompt columns found for them."""

    def __init__(self, parts: list[_Component], columns: PromptColumns | None) -> None:
        self.parts, self.columns = parts, columns
        self.name = " + ".join(p.name if p.weight == 1.0 else f"{p.weight:g}*{p.name}" for p in parts)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        prompts, responses = list(prompts), list(responses)
        columns: dict[str, list] = {}
        if self.columns is not None and any(p.wants or p.var_kw for p in self.parts):
            prompts, columns = self.columns.lookup(prompts)
        elif self.columns is not None:
            prompts = [self.columns.entries.get(p, (p, {}))[0] for p in prompts]
        total = torch.zeros(len(prompts))
        for part in self.parts:
            total += part.weight * part(prompts, responses, columns)
        return total


def build_reward(spec: Any, key: str, columns: PromptColumns | None = None) -> Reward:
    """One ``RewardFn`` for ``spec`` (not 'model'); ``columns``: the prompts file's extra columns, for functions
    that take them."""
    parts = []
    for item in components(spec, key):
        name, fn = _instantiate(item)
        parts.append(_Component(name, fn, item["weight"]))
    return Reward(parts, columns)
