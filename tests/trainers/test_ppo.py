"""PPO with four roles on one base: the base exists once for all roles, only the policy and value adapters (and the
value head) move, the metrics are logged, the update starts at ratio 1, and a 4-bit NF4 base trains after no-grad
rollouts."""

import math

import pytest
import torch

from align.models import tiny_llama
from align.models.roles import POLICY, REFERENCE, REWARD, VALUE
from align.tracking import Tracker
from align.tracking.tracker import read_metrics
from align.trainers.rl_common import minibatch_loss, score_rollout, shape_rewards
from align.trainers.rollout import generate_rollout

from .rl_helpers import build_rl, rl_model


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_four_roles_share_one_base(tmp_path):
    trainer = build_rl("ppo", tmp_path)
    roles = trainer.roles
    assert {r.adapter for r in roles.values()} == {"policy", "sft", "reward", "value"}
    assert [r.name for r in roles.values() if r.trainable] == [POLICY, VALUE]
    base_tensors = [t for name, t in [*trainer.model.named_parameters(), *trainer.model.named_buffers()]
                    if ".adapters." not in name]
    one_base = tiny_llama(seed=0)
    single = [*one_base.parameters(), *one_base.buffers()]
    # every role's forward runs through these very tensors: one storage per base tensor, the bytes of one base
    assert len(_storages(base_tensors)) == len(single)
    assert sum(_storages(base_tensors).values()) == sum(_storages(single).values())
    # nothing the trainer holds (optimizers, heads) keeps another copy of a base-sized tensor
    optimised = [p for b in trainer.backends.values() for g in b.optimizer.param_groups for p in g["params"]]
    assert not set(_storages(optimised)) & set(_storages(base_tensors))
    assert sum(p.numel() for p in optimised) == sum(p.numel() for p in trainer.params.values())
    assert all(p.requires_grad is False for p in base_tensors if p.is_floating_point())


def test_only_policy_value_and_value_head_change(tmp_path):
    trainer = build_rl("ppo", tmp_path, max_steps=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    reward_head = {k: v.clone() for k, v in trainer.reward_head.state_dict().items()}
    value_head = {k: v.clone() for k, v in trainer.value_head.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    moving = {k for k in before if ".adapters.policy." in k or ".adapters.value." in k}
    assert changed == moving  # every policy/value adapter tensor moved; base, sft and reward did not
    assert all(torch.equal(v, trainer.reward_head.state_dict()[k]) for k, v in reward_head.items())
    assert not torch.equal(value_head["proj.weight"], trainer.value_head.proj.weight)
    assert torch.equal(value_head["mean"], trainer.value_head.mean)  # statistics are not trained


def test_value_role_starts_from_reward_role(tmp_path):
    trainer = build_rl("ppo", tmp_path)
    model = trainer.model
    for (name, value), (_, reward) in zip(model.named_adapter_parameters("value"),
                                          model.named_adapter_parameters("reward")):
        assert torch.equal(value, reward), name
    assert torch.equal(trainer.value_head.proj.weight, trainer.reward_head.proj.weight)
    fresh = build_rl("ppo", tmp_path / "fresh", value_init="fresh")
    assert not torch.equal(fresh.value_head.proj.weight, fresh.reward_head.proj.weight)
    assert all(torch.count_nonzero(p) == 0 for n, p in fresh.model.named_adapter_parameters("value")
               if n.endswith("lora_B.weight"))


def test_metrics_are_logged(tmp_path):
    with Tracker(tmp_path) as tracker:
        trainer = build_rl("ppo", tmp_path, max_steps=2)
        trainer.tracker = tracker
        trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    expected = {"reward/score_mean", "reward/score_std", "kl", "kl/coef", "policy/entropy", "policy/clipfrac",
                "policy/approx_kl", "value/explained_variance", "value/clipfrac", "loss/policy", "loss/value",
                "rollout/response_length", "rollout/finished", "time/generation_share"}
    assert expected <= set(records[-1])
    assert all(math.isfinite(records[-1][k]) for k in expected)
    assert 0 < records[-1]["time/generation_share"] < 1
    assert 0 < records[-1]["rollout/response_length"] <= 6
    assert records[0]["kl"] == 0.0  # the policy starts as an exact copy of the reference


def _scored(trainer):
    rows = [p for p in trainer.prompts.next() for _ in range(trainer.cfg.rollout.group_size)]
    rollout = generate_rollout(trainer.model, "policy", rows, trainer.cfg.rollout, 2, 0)
    exp = score_rollout(trainer.model, trainer.roles, rollout, trainer.cfg, trainer.value_head,
                        trainer.reward_head, trainer.reward_fn, trainer.tokenizer)
    shape_rewards(exp, trainer.cfg, trainer.moments)
    trainer.advantage_fn(exp, trainer.kl_controller.value, trainer.cfg)
    return exp


def test_first_minibatch_starts_at_ratio_one(tmp_path):
    """Eval mode throughout: the update's log-probs equal the rollout's before any step (approx KL 0)."""
    trainer = build_rl("ppo", tmp_path)
    trainer.model.eval()
    exp = _scored(trainer)
    _, metrics = minibatch_loss(trainer.model, trainer.roles, exp, torch.tensor([2, 0]), trainer.cfg, 0.05,
                                trainer.value_head)
    assert metrics["policy/approx_kl"] < 1e-12 and metrics["policy/clipfrac"] == 0.0
    assert metrics["value/clipfrac"] == 0.0


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_adapters_get_gradients_after_no_grad_rollouts(quantization, tmp_path):
    """The repack trap: the no-grad, eval-mode generation and scoring passes must not cut the gradient through
    4-bit layers; every policy and value adapter tensor gets a non-zero gradient, and a run trains."""
    model = rl_model(quantization, hidden_size=64, intermediate_size=128)
    trainer = build_rl("ppo", tmp_path, model=model, max_steps=2)
    assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules()) == (quantization == "nf4")
    trainer.model.eval()
    exp = _scored(trainer)
    loss, _ = minibatch_loss(trainer.model, trainer.roles, exp, torch.arange(len(exp)), trainer.cfg, 0.05,
                             trainer.value_head)
    loss.backward()
    for name, param in trainer.params.items():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
    for name in (REFERENCE, REWARD):
        adapter = trainer.roles[name].adapter
        assert all(p.grad is None for p in trainer.model.adapter_parameters(adapter))
    for backend in trainer.backends.values():
        backend.zero_grad()
    before = {k: v.detach().clone() for k, v in trainer.params.items()}
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["loss/value"])
    assert all(not torch.equal(before[k], v) for k, v in trainer.params.items())
