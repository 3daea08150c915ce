"""Nothing from the network by surprise: the Hugging Face libraries default to offline in every align process.

The entry points (``python -m align.run``, ``align.sweep``, ``align.generate``, ``align.export``, ``align.convert``)
call ``default_offline`` before anything imports ``huggingface_hub``, ``datasets``, ``transformers`` or
``bitsandbytes`` (those read the variables once, at import): without it a data name that is not a local file made
``datasets`` retry a Hub download for half a minute, and importing bitsandbytes tries to fetch kernels from the
Hub. ``data.allow_hub=true`` opts out (and then needs network). A value the user set wins either way.

The Ray processes a pipeline starts (stage tasks, Ray Train workers, Tune trials) get the same defaults through
the job's runtime environment: ``pipelines.executors.start_ray`` passes ``worker_env()``.

Standard library only: importing this module must not import any of the libraries it configures.
"""

from __future__ import annotations

import os

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_FALSE = ("", "0", "false", "no", "off")
_set_here: dict[str, str] = {}  # the defaults this process set (not the user's own values)


def default_offline(allow_hub: bool = False) -> dict[str, str]:
    """Set ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` where they are not set (an explicit value wins),
    unless ``allow_hub``. Returns the variables this process defaulted so far."""
    if not allow_hub:
        for var in OFFLINE_VARS:
            if var not in os.environ:
                os.environ[var] = _set_here[var] = "1"
    return dict(_set_here)


def worker_env() -> dict[str, str]:
    """The variables Ray must give every worker process: the defaults this process set and still has. A value the
    user set reaches the workers by the user's own route (the job's runtime_env, the nodes' environment), and Ray
    refuses a ray.init runtime_env that repeats a variable of the submitted job's."""
    return {var: value for var, value in _set_here.items() if os.environ.get(var) == value}


def hub_allowed() -> bool:
    """False when ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` says offline (what the entry points default to
    unless ``data.allow_hub=true``)."""
    return all(os.environ.get(var, "").strip().lower() in _FALSE for var in OFFLINE_VARS)
