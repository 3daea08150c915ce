"""On-policy preference pairs: best and worst of k samples under the reward function."""

import pytest
import torch

from align.adapters import AdapterModel
from align.data.synthetic import build_tokenizer
from align.models import tiny_llama
from reward.pairs import sample_preference_pairs


class LengthReward:
    """Longer responses score higher: makes best/worst easy to check by hand."""

    def __call__(self, prompts, responses):
        return torch.tensor([float(len(r.split())) for r in responses])


def test_best_and_worst_of_k():
    tok = build_tokenizer()
    model = AdapterModel(tiny_llama(vocab_size=len(tok)))
    prompts = ["review of the drama film the red river : the plot was good ."] * 3
    rows = sample_preference_pairs(model, None, tok, prompts, LengthReward(), k=4, max_new_tokens=8, seed=3)
    assert rows, "a random tiny model should produce responses of different lengths"
    for row in rows:
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen_score"] == len(row["chosen"].split())
        assert row["rejected_score"] == len(row["rejected"].split())
    with pytest.raises(ValueError, match="at least two"):
        sample_preference_pairs(model, None, tok, prompts, LengthReward(), k=1)
