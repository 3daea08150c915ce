"""RL config validation names the dotted key; the builders refuse inconsistent role set-ups; roles are checked."""

import pytest

from align.config.errors import ConfigError
from align.config.rl import KLConfig, RLConfig, RolloutConfig
from align.config.trainer import LoopConfig
from align.models.roles import POLICY, REFERENCE, Role, check_roles

from .rl_helpers import build_rl, rl_model


@pytest.mark.parametrize("kwargs, key", [
    ({"algo": "a2c"}, "trainer.rl.algo"),
    ({"algo": "grpo"}, "trainer.rl.rollout.group_size"),
    ({"rollout": RolloutConfig(temperature=0.0)}, "trainer.rl.rollout.temperature"),
    ({"rollout": RolloutConfig(top_p=1.5)}, "trainer.rl.rollout.top_p"),
    ({"rollout": RolloutConfig(unfinished_penalty=-1)}, "trainer.rl.rollout.unfinished_penalty"),
    ({"kl": KLConfig(estimator="k4")}, "trainer.rl.kl.estimator"),
    ({"kl": KLConfig(coef=-0.1)}, "trainer.rl.kl.coef"),
    ({"kl": KLConfig(adaptive=True, target=0.0)}, "trainer.rl.kl.target"),
    ({"reward_adapter": None}, "trainer.rl.value_init"),
    ({"value": "sft"}, "trainer.rl.value"),
    ({"policy": "sft"}, "trainer.rl.reference"),
    ({"lam": 1.5}, "trainer.rl.lam"),
    ({"clip_eps": 0.0}, "trainer.rl.clip_eps"),
    ({"ppo_epochs": 0}, "trainer.rl.ppo_epochs"),
    ({"value_lr": 1e-3}, "trainer.rl.value_lr"),
    ({"value_init": "random"}, "trainer.rl.value_init"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        RLConfig(**kwargs)
    assert info.value.key == key and str(info.value).startswith(f"{key}=")


def test_critic_free_configs_need_no_reward_adapter_for_the_value():
    assert RLConfig(algo="grpo", reward_adapter=None, rollout=RolloutConfig(group_size=4)).samples_per_step == 128
    assert not RLConfig(algo="rloo", rollout=RolloutConfig(group_size=2)).uses_value


def test_builders_refuse_mismatched_setups(tmp_path):
    with pytest.raises(ConfigError, match="trainer.rl.reward_adapter"):  # a reward adapter and a reward function
        build_rl("ppo", tmp_path, reward="function", reward_adapter="reward")
    with pytest.raises(ConfigError, match="trainer.rl.reference"):
        build_rl("grpo", tmp_path, reference="missing")
    with pytest.raises(ConfigError, match="trainer.rl.separate_value_optimizer"):  # DeepSpeed: one engine
        from align.trainers.ppo import build_ppo_trainer

        model, head = rl_model()
        build_ppo_trainer(model, [], None, RLConfig(separate_value_optimizer=True), LoopConfig(deepspeed="zero2.json"),
                          None, tmp_path, reward_head=head)


def test_check_roles():
    model, _ = rl_model()
    model.add_adapter("policy", model.configs["sft"])
    good = {POLICY: Role(POLICY, "policy", "lm", True), REFERENCE: Role(REFERENCE, "sft", "lm", False)}
    check_roles(model, good)
    with pytest.raises(ValueError, match="is frozen but adapter 'policy' is not"):
        check_roles(model, {REFERENCE: Role(REFERENCE, "policy", "lm", False)})
    with pytest.raises(ValueError, match="lacks"):
        check_roles(model, {POLICY: Role(POLICY, "nope", "lm", True)})
    with pytest.raises(ValueError, match="base never trains"):
        Role(POLICY, None, "lm", True)
