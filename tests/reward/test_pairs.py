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


def test_score_ids_ranks_the_sampled_token_ids():
    """``score_ids`` sees each sample as the prompt's ids (``encode_prompts``) and the generated ids through the
    first EOS, which decode to the response text; scoring by the number of response tokens ranks as the ids say."""
    from align.models.generate import encode_prompts, sample_ids

    tok = build_tokenizer()
    model = AdapterModel(tiny_llama(vocab_size=len(tok)))
    prompts = ["review of the drama film the red river : the plot was good .", "the acting was bad ."]
    seen = []

    def by_length(prompt_ids, response_ids):
        seen.append((prompt_ids, response_ids))
        return torch.tensor([float(len(r)) for r in response_ids])

    rows = sample_preference_pairs(model, None, tok, prompts, None, k=4, max_new_tokens=8, seed=3,
                                   score_ids=by_length)
    assert len(seen) == 4 and all(p == encode_prompts(tok, prompts) for p, _ in seen)
    for i, (_, response_ids) in enumerate(seen):
        drawn = sample_ids(model, None, tok, prompts, max_new_tokens=8, seed=3 + i)
        assert drawn.response_ids == response_ids
        assert drawn.texts == tok.batch_decode(response_ids, skip_special_tokens=True)
        for ids in response_ids:  # through the first EOS, or all 8 tokens
            assert tok.eos_token_id not in ids[:-1] and (ids[-1] == tok.eos_token_id or len(ids) == 8)
    for row in rows:
        i = prompts.index(row["prompt"])
        lengths = [len(r[i]) for _, r in seen]
        assert (row["chosen_score"], row["rejected_score"]) == (max(lengths), min(lengths))
    with pytest.raises(ValueError, match="exactly one"):
        sample_preference_pairs(model, None, tok, prompts, LengthReward(), k=2, score_ids=by_length)
    with pytest.raises(ValueError, match="exactly one"):
        sample_preference_pairs(model, None, tok, prompts, None, k=2)
