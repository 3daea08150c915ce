"""Shared fixtures: seeded RNG for every test, tiny models, quiet offline environment."""

import os
import random

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    torch.manual_seed(0)
    yield 0


@pytest.fixture
def input_ids():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (2, 12), generator=gen)
