"""Learning-rate schedule by hand, the lr the loop really uses and reports, no weight decay on 1-D tensors."""

import math

import pytest
import torch

from align.models.heads import ScalarHead
from align.trainers.optim import build_optimizer, lr_factor

from .helpers import build_trainer, optim_config

# warm-up 2 steps, 6 steps in all: factors for steps 0..5 (0-based). Warm-up: (step + 1) / 2 -> 0.5, 1.0.
# Decay over the 4 remaining steps, progress p = (step - 2) / 4 = 0, 1/4, 1/2, 3/4.
#   linear: 1 - p                      -> 1, 0.75, 0.5, 0.25
#   cosine: (1 + cos(pi p)) / 2        -> 1, (1 + sqrt(2)/2)/2, 0.5, (1 - sqrt(2)/2)/2
#   min_lr_ratio 0.1 maps f to 0.1 + 0.9 f (decay part only)
HALF_SQRT2 = math.sqrt(2) / 2
FACTORS = {
    ("constant", 0.0): [0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
    ("linear", 0.0): [0.5, 1.0, 1.0, 0.75, 0.5, 0.25],
    ("cosine", 0.0): [0.5, 1.0, 1.0, (1 + HALF_SQRT2) / 2, 0.5, (1 - HALF_SQRT2) / 2],
    ("linear", 0.1): [0.5, 1.0, 1.0, 0.775, 0.55, 0.325],
    ("cosine", 0.1): [0.5, 1.0, 1.0, 0.1 + 0.9 * (1 + HALF_SQRT2) / 2, 0.55,
                      0.1 + 0.9 * (1 - HALF_SQRT2) / 2],
}


@pytest.mark.parametrize("schedule, min_lr_ratio", list(FACTORS))
def test_lr_factor_by_hand(schedule, min_lr_ratio):
    cfg = optim_config(schedule=schedule, warmup_steps=2, min_lr_ratio=min_lr_ratio)
    got = [lr_factor(step, cfg, total_steps=6) for step in range(6)]
    assert got == pytest.approx(FACTORS[(schedule, min_lr_ratio)], abs=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_loop_uses_and_reports_the_scheduled_lr(schedule, tmp_path):
    """Step k (1-based) runs at lr * factor(k - 1), and its metrics report that lr, not the next step's."""
    trainer = build_trainer("sft", tmp_path, loop={"max_steps": 6, "grad_accum_steps": 1},
                            optim={"lr": 0.2, "schedule": schedule, "warmup_steps": 2})
    used = []
    optimizer = trainer.backend.optimizer
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    reported = [trainer.train_step()["lr"] for _ in range(6)]
    expected = [0.2 * f for f in FACTORS[(schedule, 0.0)]]
    assert used == pytest.approx(expected, abs=1e-9)
    assert reported == pytest.approx(expected, abs=1e-9)


def test_no_weight_decay_on_one_dimensional_tensors():
    """AdamW, lr 0.1, weight decay 0.5, zero gradients: the Adam part is 0 / (sqrt(0) + eps) = 0, so a decayed
    tensor becomes (1 - 0.1 * 0.5) * 1 = 0.95 and a tensor without decay stays 1."""
    head = ScalarHead(4)
    with torch.no_grad():
        head.proj.weight.fill_(1.0)  # (1, 4): decayed
        head.proj.bias.fill_(1.0)  # (1,): not decayed
    optimizer = build_optimizer(list(head.parameters()), optim_config(lr=0.1, weight_decay=0.5))
    for p in head.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(head.proj.weight.detach(), torch.full((1, 4), 0.95))
    torch.testing.assert_close(head.proj.bias.detach(), torch.ones(1))
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.5, 0.0]
