"""KL coefficient controllers and running reward moments: updates by hand, checkpoint round trips."""

import math

import pytest
import torch

from align.algos import AdaptiveKLController, FixedKLController, RunningMoments


def test_adaptive_kl_controller_by_hand():
    """coef 0.2, target 6, horizon 10,000, 256 samples per update.
    KL 9: e = clip(9/6 - 1 = 0.5) = 0.2 -> 0.2 * (1 + 0.2 * 256 / 10,000) = 0.2 * 1.00512 = 0.201024.
    KL 5.4: e = 0.9 - 1 = -0.1 -> 0.201024 * (1 - 0.00256) = 0.201024 * 0.99744 = 0.2005093786.
    KL 6: e = 0 -> unchanged. KL 0: e = clip(-1) = -0.2 -> * (1 - 0.2 * 256 / 10,000) = * 0.99488."""
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    assert controller.update(9.0, 256) == pytest.approx(0.201024, abs=1e-12)
    assert controller.update(5.4, 256) == pytest.approx(0.2005093786, abs=1e-10)
    assert controller.update(6.0, 256) == pytest.approx(0.2005093786, abs=1e-10)
    assert controller.update(0.0, 256) == pytest.approx(0.2005093786 * 0.99488, abs=1e-10)


def test_kl_controllers_round_trip_their_state():
    """A controller rebuilt from another's state_dict continues identically (the resume contract)."""
    controller = AdaptiveKLController(0.1, target=4.0, horizon=1_000)
    for kl in (1.0, 7.0, 3.5):
        controller.update(kl, 64)
    restored = AdaptiveKLController(0.5, target=1.0, horizon=1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.update(5.0, 64) == controller.update(5.0, 64)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_running_moments_by_hand():
    """[1, 2, 3] then [4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3."""
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0]))
    assert moments.count == 4
    assert moments.mean == pytest.approx(2.5)
    assert moments.var == pytest.approx(5.0 / 3.0)
    assert moments.std == pytest.approx(math.sqrt(5.0 / 3.0))


@pytest.mark.parametrize("sizes", [[600], [1] * 40 + [560], [3, 0, 597], [100] * 6, [7, 593]])
def test_running_moments_equal_torch_over_all_data(sizes):
    """Any chunking of the same 600 values (offset 5, scale 3, fp32) gives torch's mean and unbiased std of all of
    them; a state_dict round trip halfway changes nothing."""
    data = 5.0 + 3.0 * torch.randn(600, generator=torch.Generator().manual_seed(8))
    moments = RunningMoments()
    for i, chunk in enumerate(data.split(sizes)):
        if i == len(sizes) // 2:
            restored = RunningMoments()
            restored.load_state_dict(moments.state_dict())
            moments = restored
        moments.update(chunk.view(-1, 1) if i % 2 else chunk)  # shapes do not matter
    reference = data.double()
    assert moments.count == 600
    assert moments.mean == pytest.approx(reference.mean().item(), rel=1e-12)
    assert moments.std == pytest.approx(reference.std().item(), rel=1e-12)
