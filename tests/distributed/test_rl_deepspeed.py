"""PPO, GRPO and RLOO through the DeepSpeed back-end in one process (a gloo group of one rank) against the plain
PyTorch back-end: the same rollouts (seeded by iteration) and the same updates, ZeRO-2, ZeRO-3 and CPU offload; and
what DeepSpeed refuses in an RL trainer. Two ranks: test_rl_multirank.py (slow)."""

import pytest
import torch

from align.adapters import AdaLoraConfig
from align.config.errors import ConfigError
from align.trainers.backend import TorchBackend
from tests.trainers.rl_helpers import build_rl, rl_model

from .test_deepspeed import CONFIGS
from .tiny_rl import STEPS, assert_close_after_adam, rl_trainer


@pytest.mark.parametrize(("algo", "name"), [("ppo", "zero2"), ("grpo", "zero3"), ("rloo", "zero2_offload")])
def test_one_rank_of_deepspeed_trains_as_plain_pytorch(algo, name, single_rank, tmp_path):
    """fp32 sums in another order (ZeRO's flat gradient buffers; offload runs DeepSpeedCPUAdam): measured at most
    8.6e-6 apart after 3 iterations x 2 epochs (ZeRO-3), on weights that moved by ~0.04."""
    torch.manual_seed(0)
    plain = rl_trainer(algo, tmp_path / "plain")
    assert isinstance(plain.driver, TorchBackend)
    plain_metrics = plain.fit()
    torch.manual_seed(0)
    ds = rl_trainer(algo, tmp_path / "ds", deepspeed=str(CONFIGS / f"{name}.json"))
    assert ds.driver.zero_stage == int(name[4]) and ds.world_size == 1 and ds.reduce is None
    ds_metrics = ds.fit()
    with ds.driver.gathered():
        assert_close_after_adam(ds.params, plain.params)
    for key in ("reward/score_mean", "lr"):
        assert ds_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-5, abs=1e-6), key
    assert ds_metrics["kl"] == pytest.approx(plain_metrics["kl"], abs=1e-4)  # as on two ranks
    assert ds.step == STEPS and (tmp_path / "ds" / "checkpoints" / f"step-{STEPS:06d}" / "optimizer-all"
                                 / "deepspeed").is_dir()


def test_deepspeed_refusals_in_rl(single_rank, tmp_path):
    deepspeed = str(CONFIGS / "zero2.json")
    with pytest.raises(ConfigError, match="trainer.rl.separate_value_optimizer"):
        build_rl("ppo", tmp_path / "a", deepspeed=deepspeed, separate_value_optimizer=True)
    model, head = rl_model()
    model.add_adapter("policy", AdaLoraConfig(init_r=4, target_r=2))
    with pytest.raises(ValueError, match="AdaLoRA adapters trained: \\['policy'\\]"):
        build_rl("grpo", tmp_path / "b", deepspeed=deepspeed, model=(model, head), reference=None)
