import pytest
import torch

from reward.functions import GroundTruthReward, get_reward_function


def test_ground_truth_reward_scores_responses():
    reward = get_reward_function("ground_truth")
    assert isinstance(reward, GroundTruthReward)
    out = reward(["p", "p"], ["the acting was good .", "the acting was bad ."])
    torch.testing.assert_close(out, torch.tensor([0.25, -0.25]))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward(["p", "p"], ["x"])
    with pytest.raises(ValueError, match="available"):
        get_reward_function("nope")
