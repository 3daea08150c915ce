"""Reward functions the user brings: ``package.module:function`` or ``path/to/file.py:function``.

The function is called as ``fn(prompts, responses, **columns)`` and returns a sequence of numbers (list, tuple,
numpy array or tensor), one per response. Only the columns its signature names are passed (all of them when it
takes ``**kwargs``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path


def is_callable_spec(spec: str) -> bool:
    """``module:function`` or ``file.py:function`` (a Windows drive letter is not a module)."""
    module, sep, function = spec.rpartition(":")
    return bool(sep and module and function and (module.endswith(".py") or "/" not in module))


def load_callable(spec: str) -> Callable:
    """The function ``spec`` names. Raises ValueError saying what is wrong and what to do."""
    module_name, _, function = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{spec}: no such file {path} (a path is read relative to the current directory "
                             f"{Path.cwd()})")
        unique = f"align_user_reward_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        module = sys.modules.get(unique)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                raise ValueError(f"{spec}: importing {path} failed: {type(exc).__name__}: {exc}") from None
            sys.modules[unique] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ValueError(f"{spec}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); is the package "
                             "installed or on PYTHONPATH? A file is given as path/to/file.py:function") from None
    fn = getattr(module, function, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{spec}: {module_name} has no attribute {function!r} (its functions: {public})")
    if not callable(fn):
        raise ValueError(f"{spec}: {function!r} is a {type(fn).__name__}, not a function")
    return fn


def accepted_columns(fn: Callable) -> tuple[set[str], bool]:
    """(the keyword parameters after prompts and responses, whether it takes **kwargs)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return set(), True
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in positional[2:]} | {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return names, var_kw
