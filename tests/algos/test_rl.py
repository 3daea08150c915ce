"""PPO / GRPO / RLOO math: KL estimators, masked whitening, GAE, clipped losses, entropy, group advantages."""

import math

import pytest
import torch

from align.algos import (
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

LN2, LN15 = math.log(2.0), math.log(1.5)


# ------------------------------------------------------------------------------------------------ KL estimators
def test_kl_estimators_by_hand():
    """p = [1/2, 1/2] (policy, samples), q = [1/4, 3/4] (ref). Per token, r = log q - log p = [-ln 2, ln 1.5]:
    k1 = -r = [ln 2, -ln 1.5]; k2 = r^2 / 2; k3 = e^r - 1 - r = [1/2 - 1 + ln 2, 3/2 - 1 - ln 1.5].
    Expectations under p: KL(p||q) = (ln 2 + ln(2/3)) / 2 = ln(4/3) / 2 = 0.14384 for k1 and k3 (k3: sum q - 1 = 0),
    E[k2] = (ln^2 2 + ln^2 1.5) / 4 = 0.16121."""
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    logp, ref = p.log(), q.log()
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([LN2, -LN15]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([LN2**2 / 2, LN15**2 / 2]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([LN2 - 0.5, 0.5 - LN15]))
    kl = math.log(4.0 / 3.0) / 2
    for kind, expected in (("k1", kl), ("k2", (LN2**2 + LN15**2) / 4), ("k3", kl)):
        torch.testing.assert_close((p * kl_penalty(logp, ref, kind)).sum(), torch.tensor(expected))


def test_k1_and_k3_are_unbiased_on_random_categoricals():
    """Enumerating the support with the policy's weights gives E_p[k1] = E_p[k3] = KL(p||q) exactly; k3 >= 0."""
    gen = torch.Generator().manual_seed(4)
    logp = torch.randn(5, 9, generator=gen, dtype=torch.float64).log_softmax(-1)
    ref = torch.randn(5, 9, generator=gen, dtype=torch.float64).log_softmax(-1)
    kl = (logp.exp() * (logp - ref)).sum(-1)
    for kind in ("k1", "k3"):
        torch.testing.assert_close((logp.exp() * kl_penalty(logp, ref, kind)).sum(-1), kl)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


# ------------------------------------------------------------------------------------------------ whitening
def test_whiten_by_hand():
    """Kept values {1, 3, 5, 7}: mean 4, unbiased var (9 + 1 + 1 + 9) / 3 = 20/3, whitened [-3, -1, 1, 3] / sqrt(20/3)
    = [-1.16190, -0.38730, 0.38730, 1.16190]; the masked 99 and -50 come back as 0 and do not enter the statistics.
    shift_mean=False adds the mean 4 back."""
    values = torch.tensor([[1.0, 3.0, 99.0], [5.0, 7.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    scale = math.sqrt(20.0 / 3.0)
    expected = torch.tensor([[-3.0, -1.0, 0.0], [1.0, 3.0, 0.0]]) / scale
    torch.testing.assert_close(whiten(values, mask), expected)
    torch.testing.assert_close(whiten(values, mask, shift_mean=False), (expected + 4.0) * mask)
    torch.testing.assert_close(masked_var(values, mask), torch.tensor(20.0 / 3.0))
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), torch.tensor(5.0))
    with pytest.raises(ValueError, match="at least 2"):
        whiten(values, torch.tensor([[True, False, False], [False, False, False]]))


# ------------------------------------------------------------------------------------------------ GAE
def slow_gae(rewards, values, mask, gamma, lam):
    """Reference: A_t = sum_l (gamma lam)^l delta_{t+l} over the run of kept tokens that starts at t, with
    delta_s = r_s + gamma V_{s+1} [s+1 kept] - V_s. Python loops, element by element."""
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    for b in range(batch):
        for t in range(length):
            if not mask[b, t]:
                continue
            total, discount, s = 0.0, 1.0, t
            while s < length and mask[b, s]:
                next_value = values[b, s + 1].item() if s + 1 < length and mask[b, s + 1] else 0.0
                total += discount * (rewards[b, s].item() + gamma * next_value - values[b, s].item())
                discount *= gamma * lam
                s += 1
            advantages[b, t] = total
    return advantages, torch.where(mask, advantages + values, 0.0)


def test_gae_by_hand():
    """gamma 0.9, lam 0.5, rewards [0, 0, 1, (pad)], values [0.5, 0.5, 0.5, (pad 7)]:
    delta_2 = 1 - 0.5 = 0.5 (the next token is padding: no bootstrap); delta_1 = delta_0 = 0.9 * 0.5 - 0.5 = -0.05.
    A_2 = 0.5, A_1 = -0.05 + 0.45 * 0.5 = 0.175, A_0 = -0.05 + 0.45 * 0.175 = 0.02875; returns = A + 0.5."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.02875, 0.175, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.52875, 0.675, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_slow_reference_with_masks(gamma, lam):
    """Rows: left padding (prompt) + right padding, a gap in the middle, all kept, none kept, random masks."""
    gen = torch.Generator().manual_seed(11)
    batch, length = 8, 9
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[0] = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    mask[1] = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    mask[2], mask[3] = True, False
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = slow_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


# ------------------------------------------------------------------------------------------------ clipped losses
def test_ppo_policy_loss_around_the_clip_by_hand():
    """eps 0.2, ratios [1.3, 1.1, 0.7, 1.3, 0.7], advantages [2, 2, 2, -1, -1], plus a masked token (ratio 5, A 1000).
    Per token max(-A r, -A clip(r)): [max(-2.6, -2.4), -2.2, max(-1.4, -1.6), max(1.3, 1.2), max(0.7, 0.8)]
    = [-2.4 (clipped), -2.2, -1.4, 1.3, 0.8 (clipped)] -> mean -3.9 / 5 = -0.78, clipfrac 2 / 5 = 0.4.
    d loss / d logp = -A r / 5 where unclipped, 0 where clipped: [0, -0.44, -0.28, 0.26, 0, 0]."""
    ratios = [1.3, 1.1, 0.7, 1.3, 0.7, 5.0]
    logp = torch.tensor(ratios).log().requires_grad_()
    advantages = torch.tensor([2.0, 2.0, 2.0, -1.0, -1.0, 1000.0])
    mask = torch.tensor([True] * 5 + [False])
    loss, metrics = ppo_policy_loss(logp, torch.zeros(6), advantages, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.78))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.4))
    kl = sum(0.5 * math.log(r) ** 2 for r in ratios[:5]) / 5
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(kl))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.44, -0.28, 0.26, 0.0, 0.0]))


@pytest.mark.parametrize("advantage,ratio", [(2.0, 1.25), (-1.0, 0.75)])
def test_ppo_policy_loss_exactly_at_the_clip(advantage, ratio):
    """eps is set so that the computed fp32 ratio sits exactly on 1 + eps (A > 0) or 1 - eps (A < 0): both terms
    equal -A r, the token is not counted as clipped and the gradient -A r passes whole (clamp passes it at its
    bounds; max splits a tie between two equal gradients). 1e-6 outside the bound (in log-ratio, about 10 fp32 ulps
    of the ratio) the clip bites (gradient 0, clipfrac 1); 1e-6 inside it does not."""
    logp = torch.tensor([ratio]).log()
    r = logp.exp().item()
    eps = r - 1.0 if advantage > 0 else 1.0 - r
    outward = 1e-6 if advantage > 0 else -1e-6
    inside = logp - outward
    r_inside = inside.exp().item()
    # point: (log ratio, loss, clipfrac, gradient)
    cases = {"at": (logp, -advantage * r, 0.0, -advantage * r),
             "outside": (logp + outward, -advantage * r, 1.0, 0.0),
             "inside": (inside, -advantage * r_inside, 0.0, -advantage * r_inside)}
    for name, (point, expected_loss, expected_clipfrac, expected_grad) in cases.items():
        point = point.clone().requires_grad_()
        loss, metrics = ppo_policy_loss(point, torch.zeros(1), torch.tensor([advantage]),
                                        torch.ones(1, dtype=torch.bool), eps)
        loss.backward()
        assert metrics["clipfrac"].item() == expected_clipfrac, name
        torch.testing.assert_close(loss, torch.tensor(expected_loss), msg=name)
        torch.testing.assert_close(point.grad, torch.tensor([expected_grad]), msg=name)


def test_ppo_value_loss_by_hand():
    """eps 0.2. Token 0: old 0, V 0.5, R 1: V_clip 0.2, errors 0.25 vs 0.64 -> 0.64 (clipped).
    Token 1: old 0, V 0.5, R 0: 0.25 vs 0.04 -> 0.25.  Token 2: old 0, V 0.1, R 1: inside, 0.81 both.
    Token 3: old 1, V 0.5, R 0.5: V_clip 0.8, 0 vs 0.09 -> 0.09 (clipped).  Token 4 masked.
    loss = 0.5 * (0.64 + 0.25 + 0.81 + 0.09) / 4 = 0.22375, clipfrac 2 / 4.
    d loss / d V = 0.5 / 4 * 2 (V - R) where unclipped: [0, 0.125, -0.225, 0, 0]."""
    values = torch.tensor([0.5, 0.5, 0.1, 0.5, 9.0], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    returns = torch.tensor([1.0, 0.0, 1.0, 0.5, -9.0])
    mask = torch.tensor([True, True, True, True, False])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.22375))
    torch.testing.assert_close(clipfrac, torch.tensor(0.5))
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 0.125, -0.225, 0.0, 0.0]))


def test_ppo_value_loss_exactly_at_the_clip():
    """V - old = 0.25 = eps exactly (binary fractions): both errors (0.25 - 1)^2 = 0.5625, not clipped, gradient
    0.5 * 2 * (0.25 - 1) = -0.75 passes whole. At V = 0.3125 the clip bites: loss 0.5 * 0.5625, gradient 0."""
    for v, clipfrac, grad in ((0.25, 0.0, -0.75), (0.3125, 1.0, 0.0)):
        values = torch.tensor([v], requires_grad=True)
        loss, frac = ppo_value_loss(values, torch.zeros(1), torch.ones(1), torch.ones(1, dtype=torch.bool), 0.25)
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(0.5 * 0.5625))
        assert frac.item() == clipfrac
        torch.testing.assert_close(values.grad, torch.tensor([grad]))


# ------------------------------------------------------------------------------------------------ entropy, EV
def test_entropy_by_hand_and_chunked():
    """Logits [0, ln 3, -inf, -inf] -> p [1/4, 3/4, 0, 0] -> H = (ln 4) / 4 + (3/4) ln(4/3) = 0.56233 (0 log 0 = 0,
    and the gradient stays finite); [5, 5, 5, 5] -> ln 4. Chunked rows equal unchunked (and TRL's, if installed)."""
    logits = torch.tensor([[[0.0, math.log(3.0), -math.inf, -math.inf], [5.0, 5.0, 5.0, 5.0]]])
    expected = torch.tensor([[math.log(4.0) / 4 + 0.75 * math.log(4.0 / 3.0), math.log(4.0)]])
    logits.requires_grad_()
    entropy = entropy_from_logits(logits)
    torch.testing.assert_close(entropy, expected)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
    random = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(entropy_from_logits(random, chunk_size=4), entropy_from_logits(random))
    trl_utils = pytest.importorskip("trl.trainer.utils")
    torch.testing.assert_close(entropy_from_logits(random), trl_utils.entropy_from_logits(random))


def test_explained_variance_by_hand():
    """returns [1, 2, 3, 4]: values = returns -> 1; values = the mean 2.5 -> 1 - var / var = 0."""
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    torch.testing.assert_close(explained_variance(torch.full((1, 4), 2.5), returns, mask), torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------ group advantages
def test_grpo_and_rloo_by_hand():
    """Group A rewards [3, 1, 0, 0]: mean 1, deviations [2, 0, -1, -1], unbiased var (4 + 0 + 1 + 1) / 3 = 2.
    GRPO: [2, 0, -1, -1] / (sqrt 2 + 1e-4); unscaled: [2, 0, -1, -1].
    RLOO: r_i - mean of the other three = [3 - 1/3, 1 - 3/3, 0 - 4/3, 0 - 4/3] = [8/3, 0, -4/3, -4/3]
    (= k / (k - 1) * deviations).
    Group B [2, 2, 2, 2]: all zeros (std 0, eps keeps GRPO finite)."""
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    deviations = torch.tensor([2.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(grpo_advantages(rewards, 4), deviations / (math.sqrt(2.0) + 1e-4))
    torch.testing.assert_close(grpo_advantages(rewards, 4, scale=False), deviations)
    torch.testing.assert_close(rloo_advantages(rewards, 4), torch.tensor([8 / 3, 0.0, -4 / 3, -4 / 3, 0, 0, 0, 0]))
    for bad in ((rewards, 3), (rewards, 1), (rewards.view(2, 4), 4)):
        with pytest.raises(ValueError, match="multiple of group_size"):
            rloo_advantages(*bad)
