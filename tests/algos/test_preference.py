"""Bradley-Terry and the DPO family, each asserted on hand-worked numbers.

No peer comparison with TRL: in trl 1.16 the DPO-family formulas sit inline in ``DPOTrainer._compute_loss``, which
needs a full trainer (model forward with ``fused_lm_head``, accelerator, metrics), not a callable loss function.

Shared pairs, beta = 0.5, h = (policy_c - ref_c) - (policy_r - ref_r):
    pair 0: policy (-1, -3), ref (-2, -2) -> h = 1 - (-1) = 2,  beta h = 1
    pair 1: policy = ref                  -> h = 0,             beta h = 0
    pair 2: policy (-4, -2), ref (-3, -3) -> h = -1 - 1 = -2,   beta h = -1
With a = log(1 + e^-1) = 0.31326, log(1 + e^1) = 1 + a.
"""

import math

import pytest
import torch

from align.algos import (
    DPO_LOSSES,
    bradley_terry_loss,
    cdpo_loss,
    dpo_implicit_rewards,
    dpo_sigmoid_loss,
    get_dpo_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
    simpo_loss,
)

BETA = 0.5
A = math.log1p(math.exp(-1.0))
LOG2 = math.log(2.0)


def pairs(requires_grad=False):
    policy_chosen = torch.tensor([-1.0, -5.0, -4.0], requires_grad=requires_grad)
    policy_rejected = torch.tensor([-3.0, -6.0, -2.0])
    ref_chosen = torch.tensor([-2.0, -5.0, -3.0])
    ref_rejected = torch.tensor([-2.0, -6.0, -3.0])
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_bradley_terry_by_hand():
    """r_c - r_r = 1 -> log(1 + e^-1) = a; margin 1 -> log 2; margin 3 -> log(1 + e^2); equal rewards -> log 2."""
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.5])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor([A, LOG2]))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0])),
                               torch.tensor([LOG2, LOG2]))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=3.0),
                               torch.tensor([math.log1p(math.exp(2.0)), math.log1p(math.exp(3.0))]))


def test_dpo_sigmoid_by_hand():
    """-log sigmoid(beta h) = log(1 + e^(-beta h)): [a, log 2, 1 + a]. d loss / d policy_chosen =
    -beta * sigmoid(-beta h): pair 1 (h = 0) -> -0.5 * 0.5 = -0.25."""
    args = pairs(requires_grad=True)
    loss = dpo_sigmoid_loss(*args, beta=BETA)
    torch.testing.assert_close(loss, torch.tensor([A, LOG2, 1.0 + A]))
    loss.sum().backward()
    torch.testing.assert_close(args[0].grad[1], torch.tensor(-0.25))


def test_ipo_by_hand():
    """1 / (2 beta) = 1: (h - 1)^2 = [(2 - 1)^2, (0 - 1)^2, (-2 - 1)^2] = [1, 1, 9]."""
    torch.testing.assert_close(ipo_loss(*pairs(), beta=BETA), torch.tensor([1.0, 1.0, 9.0]))


def test_hinge_by_hand():
    """relu(1 - beta h) = [relu(0), relu(1), relu(2)] = [0, 1, 2]."""
    torch.testing.assert_close(hinge_loss(*pairs(), beta=BETA), torch.tensor([0.0, 1.0, 2.0]))


def test_cdpo_by_hand():
    """eps = 0.1: 0.9 log(1 + e^(-beta h)) + 0.1 log(1 + e^(beta h)).
    pair 0: 0.9 a + 0.1 (1 + a) = a + 0.1;  pair 1: log 2;  pair 2: 0.9 (1 + a) + 0.1 a = a + 0.9."""
    torch.testing.assert_close(cdpo_loss(*pairs(), beta=BETA, label_smoothing=0.1),
                               torch.tensor([A + 0.1, LOG2, A + 0.9]))


def test_robust_dpo_by_hand():
    """eps = 0.1: [0.9 log(1 + e^(-beta h)) - 0.1 log(1 + e^(beta h))] / 0.8.
    pair 0: (0.9 a - 0.1 (1 + a)) / 0.8 = a - 0.125;  pair 1: (0.9 - 0.1) log 2 / 0.8 = log 2;
    pair 2: (0.9 (1 + a) - 0.1 a) / 0.8 = a + 1.125."""
    torch.testing.assert_close(robust_dpo_loss(*pairs(), beta=BETA, label_smoothing=0.1),
                               torch.tensor([A - 0.125, LOG2, A + 1.125]))


def test_label_smoothing_zero_is_dpo_and_bounds():
    sigmoid = dpo_sigmoid_loss(*pairs(), beta=BETA)
    torch.testing.assert_close(cdpo_loss(*pairs(), beta=BETA), sigmoid)
    torch.testing.assert_close(robust_dpo_loss(*pairs(), beta=BETA), sigmoid)
    for bad in (0.5, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            robust_dpo_loss(*pairs(), beta=BETA, label_smoothing=bad)


def test_simpo_by_hand():
    """beta = 2, gamma = 0.5, averaged policy log-probs.
    pair 0: (-1.0, -1.5): 2 * 0.5 - 0.5 = 0.5 -> log(1 + e^-0.5);  pair 1: equal -> -0.5 -> log(1 + e^0.5).
    The reference is ignored: None or any tensor give the same loss."""
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    expected = torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))])
    torch.testing.assert_close(simpo_loss(chosen, rejected, None, None, 2.0, gamma=0.5), expected)
    torch.testing.assert_close(simpo_loss(chosen, rejected, torch.randn(2), torch.randn(2), 2.0), expected)


def test_implicit_rewards_by_hand():
    """beta (policy - ref): chosen 0.5 * [1, 0, -1], rejected 0.5 * [-1, 0, 1]."""
    chosen, rejected = dpo_implicit_rewards(*pairs(), beta=BETA)
    torch.testing.assert_close(chosen, torch.tensor([0.5, 0.0, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.0, 0.5]))


def test_table_names_and_unknown_name():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "cdpo", "robust", "simpo"}
    assert get_dpo_loss("ipo") is ipo_loss
    with pytest.raises(ValueError, match="'dpo'.*cdpo, hinge, ipo, robust, sigmoid, simpo"):
        get_dpo_loss("dpo")


def test_every_loss_has_the_shared_signature():
    """Positional (policy_c, policy_r, ref_c, ref_r, beta) -> (B,) for every entry; a foreign option is refused."""
    for name, loss_fn in DPO_LOSSES.items():
        out = loss_fn(*pairs(), BETA)
        assert out.shape == (3,), name
    with pytest.raises(TypeError):
        dpo_sigmoid_loss(*pairs(), BETA, label_smoothing=0.1)
