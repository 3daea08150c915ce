"""Hydra composition of ``configs/`` with ``key=value`` / ``group=option`` overrides, without Hydra's working-dir
and logging side effects, and with errors that name the key and suggest the closest valid one."""

from __future__ import annotations

import os
from pathlib import Path

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


def compose_mapping(overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The merged config as plain containers. Raises ``ConfigError`` for unknown groups, options and keys."""
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
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        hint = ("a local model directory, e.g. model.path=/models/Llama-3-8B" if key == "model.path"
                else "a value (this option has no default): set it on the command line")
        raise ConfigError(str(key), "???", hint) from None


def compose_run_config(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose, then type and validate: the whole config check, before anything heavy starts."""
    return load_run_config(compose_mapping(overrides))
