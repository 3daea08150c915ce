"""The NaN/inf guard: a non-finite loss or gradient norm stops training with a message naming the step and
the last good checkpoint; the weights stay those of the last finished step; nothing is saved for the bad
step."""

import pytest
import torch
from safetensors.torch import load_file

from align.trainers.checkpoint import latest_checkpoint
from align.trainers.loop import TrainingDiverged

from .helpers import assert_equal_tensors, build_trainer, max_difference, snapshot

BAD_STEP = 3


def poison(trainer, fault: str) -> dict[int, dict[str, torch.Tensor]]:
    """Make step BAD_STEP non-finite: its second micro-batch's loss is NaN ('loss'), or one adapter tensor's
    gradient is +inf ('grad_norm', loss finite). Returns the weights seen at the start of each step."""
    weights_at_start: dict[int, dict[str, torch.Tensor]] = {}
    loss_fn = trainer.loss_fn
    first_param = next(iter(trainer.params.values()))
    calls = []

    def poisoned(batch):
        step = trainer.step + 1
        weights_at_start.setdefault(step, snapshot(trainer.params))
        calls.append(step)
        loss_sum, metrics = loss_fn(batch)
        if step == BAD_STEP and calls.count(step) == 2:
            if fault == "loss":
                return loss_sum * float("nan"), metrics
            first_param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return loss_sum, metrics

    trainer.loss_fn = poisoned
    return weights_at_start


@pytest.mark.parametrize("fault, expected", [("loss", "loss is nan"), ("grad_norm", "gradient norm is inf")])
def test_non_finite_step_stops_with_last_good_checkpoint(fault, expected, tmp_path):
    trainer = build_trainer("sft", tmp_path, loop={"max_steps": 5, "save_every": 1, "grad_accum_steps": 2})
    weights_at_start = poison(trainer, fault)
    with pytest.raises(TrainingDiverged) as error:
        trainer.fit()
    root = trainer.checkpoint_dir
    good = root / "step-000002"
    message = str(error.value)
    assert f"step {BAD_STEP}: {expected}" in message
    assert f"the last good checkpoint is {good}" in message
    assert trainer.step == 2
    assert latest_checkpoint(root) == good
    assert not (root / "step-000003").exists() and not list(root.glob(".tmp-*"))
    after_step_2 = weights_at_start[BAD_STEP]
    assert_equal_tensors(snapshot(trainer.params), after_step_2)  # the bad step changed nothing
    assert_equal_tensors(load_file(str(good / "trainable.safetensors")), after_step_2)
    assert max_difference(after_step_2, weights_at_start[2]) > 1e-3  # step 2 moved them: checks can fail
    if fault == "grad_norm":
        assert all(p.grad is None for p in trainer.params.values())  # the infinite gradients were dropped


def test_diverged_before_any_checkpoint_says_so(tmp_path):
    trainer = build_trainer("sft", tmp_path, loop={"max_steps": 5, "save_every": 0, "grad_accum_steps": 2})
    poison(trainer, "loss")
    with pytest.raises(TrainingDiverged, match="step 3: loss is nan.*no checkpoint was written yet"):
        trainer.fit()
    assert latest_checkpoint(trainer.checkpoint_dir) is None
