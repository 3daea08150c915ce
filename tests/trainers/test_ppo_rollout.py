"""Rollouts stop at EOS, their masks cover exactly the generated tokens through EOS, and responses that never end
are penalised."""

import torch

from align.adapters import AdapterModel, LoraConfig
from align.config.rl import RolloutConfig
from align.models import tiny_llama
from align.models.forward import response_logps_and_entropy, response_token_logps
from align.trainers.rl_common import score_rollout
from align.trainers.rollout import apply_unfinished_penalty, generate_rollout, layout, split_responses

from .rl_helpers import BOS, EOS, PAD, ToyTokenizer, build_rl, prompt_rows


def test_split_responses_by_hand():
    """Row 0 ends at its EOS (padding after it dropped), row 1 never ends, row 2 is only EOS, row 3 pads with EOS
    itself (pad == eos tokenizers): the response still ends at the first EOS."""
    generated = torch.tensor([[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD], [9, EOS, EOS, EOS]])
    responses, finished = split_responses(generated, EOS)
    assert responses == [[5, EOS], [5, 6, 7, 8], [EOS], [9, EOS]]
    assert finished.tolist() == [True, False, True, True]


def test_unfinished_penalty_by_hand():
    scores = torch.tensor([1.0, 1.0, -0.5])
    out = apply_unfinished_penalty(scores, torch.tensor([True, False, False]), penalty=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, -1.0]))


def _small_vocab_model() -> AdapterModel:
    """Vocabulary of 8: EOS is sampled about once in 8 tokens, so some rollouts end and some do not."""
    return AdapterModel(tiny_llama(seed=3, vocab_size=8))


def test_rollouts_stop_at_eos_and_masks_are_right():
    model = _small_vocab_model()
    prompts = [row["prompt_ids"] for row in prompt_rows(24, seed=2, vocab=8)]
    prompts = [p[: 2 + i % 3] for i, p in enumerate(prompts)]  # prompts of 2 to 4 tokens
    cfg = RolloutConfig(max_new_tokens=10, generation_batch_size=7)  # several generate calls, ragged last one
    torch.manual_seed(0)
    rollout = generate_rollout(model, None, prompts, cfg, EOS, PAD)
    finished = rollout.finished.tolist()
    assert 0 < sum(finished) < len(prompts)  # both kinds occur
    for i, (prompt, response) in enumerate(zip(prompts, rollout.response_ids)):
        if finished[i]:
            assert response[-1] == EOS and EOS not in response[:-1] and len(response) <= 10
        else:
            assert EOS not in response and len(response) == 10
        n, r = len(prompt), len(response)
        assert rollout.input_ids[i, :n + r].tolist() == prompt + response
        assert rollout.input_ids[i, n + r:].eq(PAD).all()
        assert rollout.attention_mask[i].tolist() == [1] * (n + r) + [0] * (rollout.input_ids.shape[1] - n - r)
        assert rollout.response_mask[i].tolist() == [False] * n + [True] * r + [False] * (
            rollout.input_ids.shape[1] - n - r)
    assert rollout.response_lengths.tolist() == [len(r) for r in rollout.response_ids]
    batch = rollout.batch(torch.tensor([0, 3]))
    assert batch["input_ids"].shape[1] == int(rollout.attention_mask[[0, 3]].sum(1).max())
    rollout.decode(ToyTokenizer())
    assert str(EOS) not in " ".join(rollout.responses).split() and len(rollout.responses) == len(prompts)


def test_rollout_leaves_model_mode_and_grad_state_alone():
    model = _small_vocab_model()
    model.train()
    generate_rollout(model, None, [[BOS, 3]], RolloutConfig(max_new_tokens=3), EOS, PAD)
    assert model.training and torch.is_grad_enabled()


class ZeroReward:
    def __call__(self, prompts, responses):
        return torch.zeros(len(responses))


def test_unfinished_responses_are_penalised_in_scoring(tmp_path):
    """A zero reward: every score is -penalty exactly where the response did not produce EOS."""
    model = _small_vocab_model()
    trainer = build_rl("grpo", tmp_path, reward="function", model=(model, None), reference=None,
                       rollout={"max_new_tokens": 4, "unfinished_penalty": 0.75})
    trainer.reward_fn = ZeroReward()
    prompts = [row["prompt_ids"] for row in prompt_rows(16, seed=4, vocab=8)]
    torch.manual_seed(1)
    rollout = generate_rollout(model, "policy", prompts, trainer.cfg.rollout, EOS, PAD)
    assert 0 < int(rollout.finished.sum()) < 16
    exp = score_rollout(model, trainer.roles, rollout, trainer.cfg, reward_fn=trainer.reward_fn,
                        tokenizer=ToyTokenizer())
    torch.testing.assert_close(exp.scores, -0.75 * (~rollout.finished).float())


def test_scoring_logps_and_entropy_follow_the_sampling_temperature():
    """Chunked log-probs (vocab chunks of 50) and row-chunked entropy at temperature 2 equal those of the full
    logits divided by 2, at response positions only (0 elsewhere)."""
    model = AdapterModel(tiny_llama(seed=0))
    model.add_adapter("a", LoraConfig(r=2, init_lora_weights=False))  # trainable: the log-probs can need gradients
    model.set_active("a")
    rollout = layout([[BOS, 5, 6], [BOS, 9]], [[7, 8, EOS], [11, 12, 13, 14]], PAD, torch.tensor([True, False]))
    batch = rollout.batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / 2.0
    full = logits.log_softmax(-1)
    expected = full.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    # with gradients (chunked log-probs, row-chunked entropy) and without (one fused pass over the vocabulary)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            logps, entropy, mask = response_logps_and_entropy(model, batch, chunk_size=50, temperature=2.0,
                                                              rows_per_chunk=3)
        assert logps.requires_grad is grad and not entropy.requires_grad
        torch.testing.assert_close(logps[mask], expected[mask])
        torch.testing.assert_close(entropy[mask], -(full.exp() * full).sum(-1)[mask])
        assert mask.sum() == 7 and logps[~mask].eq(0).all() and entropy[~mask].eq(0).all()
        plain, _ = response_token_logps(model, batch, temperature=2.0)
        torch.testing.assert_close(plain, logps.detach())
    # a trainable output head alone (the hidden states need no gradient) also takes the differentiable path
    model.set_active(None)
    model.model.get_output_embeddings().weight.requires_grad_(True)
    logps, _, _ = response_logps_and_entropy(model, batch, chunk_size=50, temperature=2.0)
    assert logps.requires_grad
