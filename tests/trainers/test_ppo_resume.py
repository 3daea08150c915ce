"""Full-state RL resume: 4 iterations straight == 2 iterations, a kill, NEW model objects resuming for 2 more,
bit for bit: policy and value adapters, value head, optimizer states, schedulers, KL controller, reward moments,
prompt position and the sampled rollouts. The rollouts are seeded by (run seed, iteration), so a resume samples
the same responses even without the saved RNG states; a control run with another rollout seed diverges."""

import pytest
import torch

import align.trainers.checkpoint as checkpoint_module
import align.trainers.rollout as rollout_module
from align.trainers.checkpoint import latest_checkpoint

from .rl_helpers import build_rl

SETTINGS = {
    "ppo": {"algo": "ppo"},
    "ppo-two-optimizers-adaptive-kl-normalised": {
        "algo": "ppo", "separate_value_optimizer": True, "value_lr": 5e-3, "normalize_rewards": True,
        "reward_clip": 1.5, "kl": {"adaptive": True, "target": 0.01, "horizon": 10.0, "estimator": "k3"}},
    "grpo": {"algo": "grpo", "reward": "function", "kl": {"in_loss": True, "estimator": "k3"}},
    "rloo": {"algo": "rloo", "normalize_rewards": True},
}


class Killed(Exception):
    """Stands in for SIGKILL in the middle of an iteration."""


def _build(setting: str, out_dir):
    options = dict(SETTINGS[setting])
    algo = options.pop("algo")
    return build_rl(algo, out_dir, max_steps=4, save_every=2, **options)


def _record(trainer, kill_at: int | None = None) -> list[torch.Tensor]:
    """Record each iteration's rollout (input ids), die at the start of iteration ``kill_at``."""
    seen = []
    iteration = trainer.iteration

    def recording():
        if trainer.step + 1 == kill_at:
            raise Killed
        metrics = iteration()
        seen.append(metrics)
        return metrics

    trainer.iteration = recording
    return seen


def _optimizer_state(trainer) -> dict[str, torch.Tensor]:
    flat = {}
    for group, backend in trainer.backends.items():
        for index, entry in backend.optimizer.state_dict()["state"].items():
            flat.update({f"{group}.{index}.{k}": v for k, v in entry.items()})
        flat[f"{group}.lr"] = torch.tensor([g["lr"] for g in backend.optimizer.param_groups])
    return flat


def _state(trainer) -> dict:
    return {"params": {k: v.detach().clone() for k, v in trainer.params.items()},
            "optimizer": _optimizer_state(trainer), "kl": trainer.kl_controller.state_dict(),
            "moments": trainer.moments.state_dict(), "position": trainer.prompts.state_dict(), "step": trainer.step,
            "schedulers": {g: b.scheduler.state_dict() for g, b in trainer.backends.items()}}


def _run(setting: str, out_dir, kill: bool):
    torch.manual_seed(0)
    trainer = _build(setting, out_dir)
    seen = _record(trainer, kill_at=3 if kill else None)
    if kill:
        with pytest.raises(Killed):
            trainer.fit()
        assert latest_checkpoint(trainer.checkpoint_dir).name == "step-000002"
        torch.manual_seed(1234)  # a new process: whatever RNG state it happens to have
        trainer = _build(setting, out_dir)
        seen = _record(trainer)
        trainer.fit()
    else:
        trainer.fit()
    return trainer, seen


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())), torch.Tensor):
            differing = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
            assert not differing, f"{key}: {len(differing)} tensors differ, e.g. {differing[:2]}"
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_resume_is_bit_identical(setting, tmp_path):
    straight, straight_seen = _run(setting, tmp_path / "straight", kill=False)
    resumed, resumed_seen = _run(setting, tmp_path / "resumed", kill=True)
    assert straight.step == resumed.step == 4 and len(resumed_seen) == 2
    _assert_same(_state(straight), _state(resumed))
    for expected, got in zip(straight_seen[2:], resumed_seen):  # same rollouts, same rewards, same KL after resume
        assert expected["reward/score_mean"] == got["reward/score_mean"] and expected["kl"] == got["kl"]
    if setting.startswith("ppo-two"):
        assert set(straight.backends) == {"policy", "value"} and straight.moments.count == 16
        assert straight.kl_controller.value != 0.05  # the adaptive controller moved, and was restored
    if setting.startswith("ppo"):
        assert any(name.startswith("value_head.") for name in straight.params)


def test_rollouts_are_seeded_by_iteration_not_by_the_saved_rng(tmp_path, monkeypatch):
    """The RNG states a checkpoint restores no longer decide the samples: a resume without them ends with the same
    weights. The control: a different rollout seed (chunk_seed) changes the weights."""
    straight, _ = _run("ppo", tmp_path / "straight", kill=False)
    monkeypatch.setattr(checkpoint_module, "restore_rng", lambda tensors, python_state: None)
    resumed, _ = _run("ppo", tmp_path / "resumed", kill=True)
    _assert_same(_state(straight), _state(resumed))
    monkeypatch.setattr(rollout_module, "chunk_seed", lambda seed, chunk: seed + chunk + 1)
    reseeded, _ = _run("ppo", tmp_path / "reseeded", kill=False)
    differing = [k for k, v in straight.params.items() if not torch.equal(v, reseeded.params[k])]
    assert differing
