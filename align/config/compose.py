"""Hydra composition of ``configs/`` with ``key=value`` / ``group=option`` overrides, without Hydra's working-dir
and logging side effects, and with errors that name the key and suggest the closest valid one.

Values interpolated from the environment (``${oc.env:WANDB_API_KEY}``, directly or through another key) are
secrets as far as align knows: the running code gets the real value, but nothing written to disk or sent to W&B
may hold it. ``compose_mapping`` remembers them (``ComposedConfig.env_sourced``; string values are ``FromEnv``, so
they stay recognisable in anything built from the mapping: the typed specs, a stage's config, the flat W&B config)
and ``redacted`` gives the copy to write: each such value becomes ``<from env: WANDB_API_KEY>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .build import suggest
from .errors import ConfigError
from .run import RunConfig, load_run_config

GROUPS = ("pipeline", "model", "data", "adapter", "trainer", "deepspeed")


def config_dir() -> Path:
    """``$ALIGN_CONFIG_DIR`` or the repository's ``configs/`` (beside the ``align`` package)."""
    env = os.environ.get("ALIGN_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"no config.yaml in {path}: set ALIGN_CONFIG_DIR to the repository's configs/")
    return path


def group_options(group: str, root: Path | None = None) -> list[str]:
    root = root or config_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _check_groups(overrides: list[str], root: Path) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and key in GROUPS and "." not in key:
            options = group_options(key, root)
            if value not in options:
                raise ConfigError(key, value, f"one of {options}{suggest(value, options)}")


def _lookup(cfg, dotted: str):
    """The deepest existing node on ``dotted``'s path and the index of the first missing part (None: it exists)."""
    from omegaconf import DictConfig

    node, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            return node, i
        node = node[part]
    return node, None


# ------------------------------------------------------------------------------------ values from the environment
ENV_RESOLVER = "oc.env"  # OmegaConf's only resolver that reads the environment (Hydra adds none)


class FromEnv(str):
    """A string value that came (wholly or in part) from environment variables ``variables``. It is the real
    string to the running code; ``redacted`` replaces it with ``<from env: NAME>``."""

    def __new__(cls, value: str, variables: tuple[str, ...]) -> FromEnv:
        obj = super().__new__(cls, value)
        obj.variables = tuple(variables)
        return obj

    def __reduce__(self):  # Ray ships configs to its workers: stay recognisable there
        return (FromEnv, (str(self), self.variables))


class ComposedConfig(dict):
    """The merged config, a plain ``dict`` to its readers, plus ``env_sourced``: for every value interpolated from
    the environment, its dotted key -> the variables it read (numbers and containers included)."""

    def __init__(self, data: Mapping, env_sourced: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(data)
        self.env_sourced = dict(env_sourced or {})

    def __reduce__(self):
        return (ComposedConfig, (dict(self), self.env_sourced))


def redaction(variables: tuple[str, ...]) -> str:
    return f"<from env: {', '.join(variables)}>"


def redacted(obj: Any) -> Any:
    """A copy of ``obj`` (the composed mapping, or anything built from it: a stage's config, the flattened W&B
    config) fit to write to disk or send to W&B: every value that came from an environment interpolation is
    ``<from env: NAME>`` (by key for a ``ComposedConfig``, and wherever a ``FromEnv`` string appears)."""
    return _redact(obj, "", getattr(obj, "env_sourced", {}))


def _redact(value: Any, path: str, env: dict[str, tuple[str, ...]]) -> Any:
    if path in env:
        return redaction(env[path])
    if isinstance(value, FromEnv):
        return redaction(value.variables)
    prefix = f"{path}." if path else ""
    if isinstance(value, Mapping):
        return {k: _redact(v, f"{prefix}{k}", env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v, f"{prefix}{i}", env) for i, v in enumerate(value))
    return value


def _env_sourced(cfg) -> dict[str, tuple[str, ...]]:
    """Dotted key -> the environment variables its value reads, resolving each value alone while ``oc.env`` is
    watched (so a key that interpolates another key that reads the environment counts too). A value that cannot
    be resolved is left to ``to_container``, which reports it."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.resolvers import oc

    used: list[str] = []

    def watched_env(*args):
        used.append(str(args[0]))
        return oc.env(*args)

    found: dict[str, tuple[str, ...]] = {}

    def walk(node, prefix: str) -> None:
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            used.clear()
            try:
                value = node[key]
            except Exception:  # missing or broken: to_container raises it with its own message
                continue
            path = f"{prefix}{key}"
            if used:
                found[path] = tuple(dict.fromkeys(used))
            elif isinstance(value, (DictConfig, ListConfig)):
                walk(value, f"{path}.")

    OmegaConf.register_new_resolver(ENV_RESOLVER, watched_env, replace=True)
    try:
        walk(cfg, "")
    finally:
        OmegaConf.register_new_resolver(ENV_RESOLVER, oc.env, replace=True)
    return found


def _mark(value: Any, variables: tuple[str, ...]) -> Any:
    """Every string in ``value`` as a ``FromEnv`` of ``variables``."""
    if isinstance(value, str):
        return FromEnv(value, variables)
    if isinstance(value, dict):
        return {k: _mark(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, variables) for v in value]
    return value


def _key(node: dict | list, part: str) -> Any:
    return int(part) if isinstance(node, list) or (part not in node and part.lstrip("-").isdigit()) else part


def _with_env_marks(mapping: dict, env: dict[str, tuple[str, ...]]) -> ComposedConfig:
    for path, variables in env.items():
        *parents, last = path.split(".")
        node = mapping
        for part in parents:
            node = node[_key(node, part)]
        node[_key(node, last)] = _mark(node[_key(node, last)], variables)
    return ComposedConfig(mapping, env)


def compose_mapping(overrides: list[str] | tuple[str, ...] = ()) -> ComposedConfig:
    """The merged config as plain containers (values from the environment marked: see the module's docstring).
    Raises ``ConfigError`` for unknown groups, options and keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    root = config_dir()
    overrides = list(overrides)
    _check_groups(overrides, root)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(root), version_base=None, job_name="align"):
        try:
            cfg = compose("config", overrides=overrides)
        except (ConfigCompositionException, MissingConfigException) as exc:
            # a key the YAML does not have: add it (+key=value) so the typed schema names it with every valid
            # key and a suggestion, instead of Hydra's bare "not in struct"
            groups_only = [o for o in overrides if o.partition("=")[0].lstrip("+~") in GROUPS]
            base = compose("config", overrides=groups_only)
            fixed = []
            for item in overrides:
                key = item.partition("=")[0]
                plain = not key.startswith(("+", "~")) and key not in GROUPS
                fixed.append("+" + item if plain and _lookup(base, key)[1] is not None else item)
            if fixed == overrides:
                raise ConfigError("overrides", overrides, f"valid Hydra overrides ({exc})") from None
            try:
                cfg = compose("config", overrides=fixed)
            except (ConfigCompositionException, MissingConfigException) as again:
                raise ConfigError("overrides", overrides, f"valid Hydra overrides ({again})") from None
        finally:
            GlobalHydra.instance().clear()
    try:
        env = _env_sourced(cfg)
        return _with_env_marks(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), env)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        hint = ("a local model directory, e.g. model.path=/models/Llama-3-8B" if key == "model.path"
                else "a value (this option has no default): set it on the command line")
        raise ConfigError(str(key), "???", hint) from None


def compose_run_config(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose, then type and validate: the whole config check, before anything heavy starts."""
    cfg = load_run_config(compose_mapping(overrides))
    dpo = cfg.trainer["dpo"].extras
    asked = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "trainer.dpo.rounds"]
    if dpo.pairs == "dataset" and dpo.rounds > 1 and asked:  # the default's rounds are for on-policy pairs
        raise ConfigError("trainer.dpo.rounds", dpo.rounds,
                          "1 with trainer.dpo.pairs=dataset (each round samples fresh pairs from the current "
                          "policy; rounds over a fixed dataset would only repeat it: raise trainer.dpo.max_steps "
                          "instead), or trainer.dpo.pairs=onpolicy")
    return cfg
