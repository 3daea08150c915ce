"""DataConfig: defaults, and every bad value fails at construction naming its dotted key."""

import dataclasses
import pickle
import subprocess
import sys

import pytest

from align.config import ConfigError, DataConfig


def test_defaults():
    cfg = DataConfig()
    assert (cfg.train, cfg.eval, cfg.format, cfg.max_length, cfg.max_prompt_length) == (None, None, "auto", 512, 256)
    assert (cfg.on_bad_rows, cfg.packing, cfg.truncate, cfg.cache_dir, cfg.lint_samples) == ("error", False, True, None, 32)


def test_error_message_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as info:
        DataConfig(on_bad_rows="drop")
    assert str(info.value) == "data.on_bad_rows='drop': expected one of ('error', 'skip')"
    assert (info.value.key, info.value.value) == ("data.on_bad_rows", "drop")


@pytest.mark.parametrize("overrides, key", [
    ({"format": "jsonl"}, "data.format"),
    ({"max_length": 0}, "data.max_length"),
    ({"max_length": True}, "data.max_length"),
    ({"max_length": 64.0}, "data.max_length"),
    ({"max_prompt_length": 512}, "data.max_prompt_length"),  # == max_length leaves no room for a response
    ({"max_prompt_length": 0}, "data.max_prompt_length"),
    ({"packing": "yes"}, "data.packing"),
    ({"truncate": 1}, "data.truncate"),
    ({"lint_samples": -1}, "data.lint_samples"),
    ({"train": ""}, "data.train"),
    ({"eval": 3}, "data.eval"),
    ({"cache_dir": 3}, "data.cache_dir"),
])
def test_bad_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        DataConfig(**overrides)


def test_frozen_and_error_pickles():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataConfig().max_length = 3
    error = pickle.loads(pickle.dumps(ConfigError("data.format", "x", "one of ('auto',)")))
    assert str(error) == "data.format='x': expected one of ('auto',)"


def test_config_imports_only_the_standard_library():
    code = "import sys, align.config; print(sorted(m for m in ('torch', 'datasets', 'transformers', 'omegaconf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
