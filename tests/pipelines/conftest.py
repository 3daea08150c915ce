"""Fixtures of the in-process pipeline tests: one ALIGN_CACHE per session (the tiny base is built once), the W&B
directories that in-process stages would otherwise set for the whole process, torch's thread count restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def align_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("align-cache")


@pytest.fixture(scope="module")
def pipeline_environment(align_cache, tmp_path_factory):
    threads = torch.get_num_threads()
    wandb = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_CACHE", str(align_cache))
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(wandb))
        yield
    torch.set_num_threads(threads)
