"""The embedded review world: determinism, the hidden scorer by hand, splits, tokenizer and the tiny base."""

import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.data.synthetic import EmbeddedTaskConfig, ReviewWorld, build_tokenizer, generate_splits, score
from align.data.synthetic.scorer import score_breakdown
from align.models.embedded import EmbeddedBaseConfig, build_embedded_base

SMALL = EmbeddedTaskConfig(n_pretrain=200, n_pretrain_eval=50, n_sft=50, n_preferences=300,
                           n_preferences_eval=20, n_prompts=50, n_eval_prompts=30)


def test_world_is_deterministic_for_a_seed():
    assert generate_splits(SMALL) == generate_splits(SMALL)
    other = generate_splits(EmbeddedTaskConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other["sft"] != generate_splits(SMALL)["sft"]


def test_scorer_by_hand():
    """Values: good 1.0, superb 1.5, 'very' x1.25, 'not' x-0.7, loved 1.2, overall x1.5, denominator max(n, 4)."""
    assert score("the acting was good .") == pytest.approx(1.0 / 4)
    assert score("the acting was very superb . i loved the music .") == pytest.approx((1.5 * 1.25 + 1.2) / 4)
    assert score("the plot was not good .") == pytest.approx(-0.7 / 4)
    assert score("overall it was a bad film .") == pytest.approx(-1.5 / 4)
    # contrast: the first clause counts half: 0.5 * 1.0 - 1.3 (awful)
    assert score("the plot was good but the music was awful .") == pytest.approx((0.5 - 1.3) / 4)
    # five valid sentences: the denominator is 5
    five = "the acting was good . the plot was good . the music was good . the cast was good . it lasts an hour ."
    assert score(five) == pytest.approx(4.0 / 5)
    assert score("") == -1.0
    assert score("superb") == pytest.approx(-1.0 / 4)  # unterminated fragment: invalid
    assert score("the acting was good . the acting was good .") == pytest.approx((1.0 - 0.5) / 4)  # repeat
    assert score("the acting was good.") == score("the acting was good .")  # a decoder's glued full stop


def test_scorer_ranks_reviews_and_resists_hacks():
    ranked = [
        "the acting was very superb . i loved the music . overall it was a brilliant film . the plot was great .",
        "the acting was good . i liked the plot . it lasts two hours .",
        "the acting was good . it lasts two hours .",
        "it lasts two hours . the film is set in paris .",
        "the plot was not good . the music was bland .",
        "the acting was terrible . i hated the plot . overall it was a very awful film . the script was painful .",
    ]
    scores = [score(r) for r in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    best_single = score("overall it was a very superb film .")
    assert best_single < scores[0]  # one strong sentence does not reach a full positive review
    assert score("overall it was a very superb film . " * 4) < best_single  # repetition does not pay
    assert score("superb superb superb superb .") < 0  # word salad is invalid


def test_base_distribution_spans_both_signs():
    world = ReviewWorld(3)
    scores = [score(world.review().response) for _ in range(2000)]
    assert sum(s > 0.5 for s in scores) / 2000 > 0.1
    assert sum(s < -0.5 for s in scores) / 2000 > 0.1
    assert sum(s == 0 for s in scores) / 2000 < 0.05  # few exact ties (the prototype had ~20%)
    assert all(score_breakdown(world.review().response).invalid == 0 for _ in range(200))


def test_splits_labels_and_held_out_prompts():
    splits = generate_splits(SMALL)
    assert {k: len(v) for k, v in splits.items()} == {
        "pretrain": 200, "pretrain_eval": 50, "sft": 50, "preferences": 300, "preferences_eval": 20,
        "prompts": 50, "eval_prompts": 30}
    train_prompts = {r["prompt"] for k in ("sft", "preferences", "prompts") for r in splits[k]}
    assert not train_prompts & {r["prompt"] for r in splits["eval_prompts"]}
    for row in splits["preferences"] + splits["preferences_eval"]:
        assert row["chosen_score"] == pytest.approx(score(row["chosen"]))
        assert row["rejected_score"] == pytest.approx(score(row["rejected"]))
    assert all(r["chosen_score"] >= r["rejected_score"] for r in splits["preferences_eval"])  # noise-free
    flipped = sum(r["chosen_score"] < r["rejected_score"] for r in splits["preferences"]) / 300
    # Bradley-Terry at T = 0.1 flips mostly near-ties: a few percent up to ~20%
    assert 0.01 < flipped < 0.2
    noisier = generate_splits(EmbeddedTaskConfig(**{**SMALL.__dict__, "bt_temperature": 1.0}))["preferences"]
    assert sum(r["chosen_score"] < r["rejected_score"] for r in noisier) / 300 > flipped


def test_tokenizer_covers_the_world_and_chat_template(tmp_path):
    tok = build_tokenizer()
    world = ReviewWorld(0)
    for _ in range(200):
        review = world.review()
        ids = tok(f"{review.prompt} {review.response}").input_ids
        assert tok.unk_token_id not in ids and ids.count(tok.bos_token_id) == 1
        response_ids = tok(review.response, add_special_tokens=False).input_ids
        assert tok.decode(response_ids) == review.response  # decoding round-trips: generated text re-tokenizes
        assert score(tok.decode(response_ids)) == pytest.approx(score(review.response))
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "review of the drama film the red river : the plot was good ."},
                {"role": "assistant", "content": "i loved the music ."}]
    ids = loaded.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt = loaded.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert ids[: len(prompt)] == prompt  # the prompt/response boundary does not move
    assert ids.count(loaded.bos_token_id) == 1 and ids[-1] == loaded.eos_token_id and ids.count(loaded.eos_token_id) == 1


def test_tiny_base_learns_and_is_cached(tmp_path):
    quick = EmbeddedBaseConfig(hidden_size=64, intermediate_size=128, num_layers=2, steps=60, batch_size=8,
                               block_size=64)
    task = EmbeddedTaskConfig(n_pretrain=2000, n_pretrain_eval=100, n_sft=10, n_preferences=10,
                              n_preferences_eval=10, n_prompts=10, n_eval_prompts=10)
    built = build_embedded_base(task, quick, cache_root=tmp_path, progress=False)
    report = built.report
    assert report["perplexity"] < report["unigram_perplexity"] < report["uniform_perplexity"]
    again = build_embedded_base(task, quick, cache_root=tmp_path, progress=False)
    assert again.model_dir == built.model_dir and again.report == report  # from the cache: same files
    model = AutoModelForCausalLM.from_pretrained(built.model_dir)
    tok = AutoTokenizer.from_pretrained(built.model_dir)
    assert model.config.vocab_size == len(tok) and tok.chat_template
    assert json.loads((built.data_dir / "sft.jsonl").read_text().splitlines()[0]).keys() == {"prompt", "completion"}
    ids = tok(["the acting was"], return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert math.isfinite(statistics.mean([report["perplexity"]]))
