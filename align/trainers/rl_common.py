"""What PPO, GRPO and RLOO share: scoring a rollout with every role, shaping rewards (unfinished penalty,
normalisation, clipping, KL), the clipped minibatch loss and the epochs of minibatch updates. The estimators differ
only in how advantages are computed (``ppo.py``, ``grpo.py``, ``rloo.py``); all math is in ``align.algos``.

Every per-token tensor here is (B, T - 1), aligned with the log-probs: position t scores token t + 1 of the rollout
(``mask`` True = that token is a response token). The whole RL run keeps the model in eval mode (dropout off), so
the log-probs of the update equal those of the rollout until the weights move (ratio 1 on the first minibatch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from align.adapters import AdapterModel
from align.algos import RunningMoments, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss
from align.config.rl import RLConfig
from align.models.forward import (
    hidden_states,
    last_token_hidden,
    response_logps_and_entropy,
    response_token_logps,
)
from align.models.heads import ScalarHead
from align.models.roles import POLICY, REFERENCE, REWARD, VALUE, Role

from .adalora_hook import AdaLoraHook
from .loop import TrainingDiverged
from .rollout import Rollout, apply_unfinished_penalty

RewardFn = Callable[[list[str], list[str]], torch.Tensor]  # reward.functions.RewardFn: (prompts, responses) -> (B,)


@dataclass
class Experience:
    """One scored rollout. ``scores`` (B,): the reward before shaping (unfinished penalty applied); ``rewards``
    (B,): after normalisation and clipping; ``kl`` (B, T-1): the per-token KL estimate of the configured
    estimator; ``advantages`` / ``returns`` are set by the estimator (returns only with a value model)."""

    rollout: Rollout
    mask: torch.Tensor
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rollout)


Reduce = Callable[[torch.Tensor], torch.Tensor]  # a data-parallel all-reduce: a small tensor summed over ranks
AdvantageFn = Callable[..., None]  # (exp, kl_coef, cfg, reduce=None): fills exp.advantages (and exp.returns)


# ---------------------------------------------------------------------------------------------- forwards
def sequence_values(model: AdapterModel, role: Role, head: ScalarHead, batch: dict) -> torch.Tensor:
    """Per-token values (B, T - 1) of ``role`` (the value at position t is that of the state ending at token t)."""
    with model.use(role.adapter):
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return head(hidden)[:, :-1].float()


@torch.no_grad()
def reward_model_scores(model: AdapterModel, role: Role, head: ScalarHead, batch: dict,
                        standardize: bool) -> torch.Tensor:
    """(B,) scores of the reward adapter + score head at each sequence's last token (standardised with the
    statistics the head stored after training when ``standardize``)."""
    with model.use(role.adapter):
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    scores = head(last_token_hidden(hidden, batch["attention_mask"])).float()
    return head.normalize(scores) if standardize else scores


def _in_chunks(fn: Callable[[dict], tuple[torch.Tensor, ...]], rollout: Rollout,
               size: int) -> tuple[torch.Tensor, ...]:
    """``fn`` (returning a tuple of tensors) over the rollout ``size`` rows at a time; per-token outputs, trimmed
    to each chunk's longest row, are padded back to the full width T - 1."""
    full = rollout.input_ids.shape[1] - 1
    parts = []
    for start in range(0, len(rollout), size):
        outs = fn(rollout.batch(slice(start, start + size)))
        parts.append([torch.nn.functional.pad(o, (0, full - o.shape[1])) if o.dim() == 2 else o for o in outs])
    return tuple(torch.cat(column) for column in zip(*parts))


@torch.no_grad()
def score_rollout(model: AdapterModel, roles: dict[str, Role], rollout: Rollout, cfg: RLConfig,
                  value_head: ScalarHead | None = None, reward_head: ScalarHead | None = None,
                  reward_fn: RewardFn | None = None, tokenizer=None) -> Experience:
    """Old policy log-probs and entropy, reference log-probs, values (PPO) and scores, each role switched on in
    turn on the one base."""
    size, temp = cfg.minibatch_size, cfg.rollout.temperature

    def policy(batch):
        with model.use(roles[POLICY].adapter):
            return response_logps_and_entropy(model, batch, cfg.chunk_size, temp)[:2]

    def reference(batch):
        with model.use(roles[REFERENCE].adapter):
            return response_token_logps(model, batch, cfg.chunk_size, temp)[:1]

    old_logps, entropy = _in_chunks(policy, rollout, size)
    (ref_logps,) = _in_chunks(reference, rollout, size)
    values = None
    if VALUE in roles:
        (values,) = _in_chunks(lambda b: (sequence_values(model, roles[VALUE], value_head, b),), rollout, size)
    if reward_fn is None:
        (scores,) = _in_chunks(lambda b: (reward_model_scores(model, roles[REWARD], reward_head, b,
                                                              cfg.standardize_reward_model),), rollout, size)
    else:
        rollout.decode(tokenizer)
        scores = torch.as_tensor(reward_fn(rollout.prompts, rollout.responses), dtype=torch.float32,
                                 device=rollout.input_ids.device)
    scores = apply_unfinished_penalty(scores, rollout.finished, cfg.rollout.unfinished_penalty)
    mask = rollout.response_mask[:, 1:]
    return Experience(rollout, mask, old_logps, ref_logps, entropy, values, scores)


# --------------------------------------------------------------------------------------- reward shaping
def shape_rewards(exp: Experience, cfg: RLConfig, moments: RunningMoments, reduce: Reduce | None = None) -> None:
    """Fill ``exp.rewards`` (normalised with the running moments, then clipped) and ``exp.kl`` (per token).
    ``reduce``: the moments take in the rewards of every data-parallel rank."""
    rewards = exp.scores
    if cfg.normalize_rewards:
        moments.update(rewards, reduce=reduce)
        if moments.count > 1:
            rewards = (rewards - moments.mean) / max(moments.std, 1e-8)
    if cfg.reward_clip > 0:
        rewards = rewards.clamp(-cfg.reward_clip, cfg.reward_clip)
    exp.rewards = rewards
    exp.kl = torch.where(exp.mask, kl_penalty(exp.old_logps, exp.ref_logps, cfg.kl.estimator), 0.0)


def sequence_kl(exp: Experience) -> torch.Tensor:
    """(B,) k1 estimate of KL(policy || reference) per response: the sum of log-ratios of its tokens (nats)."""
    return torch.where(exp.mask, exp.old_logps - exp.ref_logps, 0.0).sum(dim=1)


def penalised_sequence_rewards(exp: Experience, kl_coef: float, cfg: RLConfig) -> torch.Tensor:
    """(B,) reward minus ``kl_coef`` times the response's summed KL estimate (unless the KL is in the loss)."""
    if cfg.kl.in_loss:
        return exp.rewards
    return exp.rewards - kl_coef * exp.kl.sum(dim=1)


def broadcast(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T-1): each response's value on its tokens, 0 elsewhere."""
    return torch.where(mask, sequence_values[:, None], 0.0)


# --------------------------------------------------------------------------------------------- update
def minibatch_loss(model: AdapterModel, roles: dict[str, Role], exp: Experience, rows: torch.Tensor,
                   cfg: RLConfig, kl_coef: float,
                   value_head: ScalarHead | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss (+ ``vf_coef`` x clipped value loss, + ``kl_coef`` x KL when the KL is in the loss) of
    the rollout rows ``rows``, with gradients to the policy and value adapters."""
    batch = exp.rollout.batch(rows)
    width = batch["input_ids"].shape[1] - 1

    def take(t):
        return t[rows, :width]

    mask = take(exp.mask)
    with model.use(roles[POLICY].adapter):
        logps, _ = response_token_logps(model, batch, cfg.chunk_size, cfg.rollout.temperature)
    loss, pg = ppo_policy_loss(logps, take(exp.old_logps), take(exp.advantages), mask, cfg.clip_eps)
    metrics = {"loss/policy": loss.item(), "policy/clipfrac": pg["clipfrac"].item(),
               "policy/approx_kl": pg["approx_kl"].item()}
    if cfg.kl.in_loss:
        kl = masked_mean(kl_penalty(logps, take(exp.ref_logps), cfg.kl.estimator), mask)
        loss = loss + kl_coef * kl
        metrics["loss/kl"] = kl.item()
    if value_head is not None:
        values = sequence_values(model, roles[VALUE], value_head, batch)
        vf_loss, vf_clipfrac = ppo_value_loss(values, take(exp.values), take(exp.returns), mask, cfg.value_clip_eps)
        loss = loss + cfg.vf_coef * vf_loss
        metrics.update({"loss/value": vf_loss.item(), "value/clipfrac": vf_clipfrac.item()})
    return loss, metrics


def update(model: AdapterModel, roles: dict[str, Role], exp: Experience, cfg: RLConfig, kl_coef: float,
           backends: list, generator: torch.Generator, value_head: ScalarHead | None = None,
           adalora: AdaLoraHook | None = None, reduce: Reduce | None = None) -> dict[str, float]:
    """``cfg.ppo_epochs`` passes over the rollout in shuffled minibatches, one optimizer step (per back-end) each.
    Returns the metrics averaged over minibatches (the gradient norm of each back-end too) and the learning rate of
    the first update. With ``adalora``
    (trained AdaLoRA adapters) the orthogonal regulariser joins each minibatch loss and the allocator runs after
    the optimizer steps, before the gradients are cleared.

    Data-parallel (``reduce`` given, one DeepSpeed back-end): each rank's minibatch is its share of a global one.
    Every term of the loss is a token mean, so each rank scales its own by (its tokens x ranks / global tokens):
    DeepSpeed's average of the ranks' gradients is then exactly the gradient of the global token mean, whatever
    the ranks' response lengths."""
    totals: dict[str, float] = {}
    steps = 0
    driver = backends[0]  # runs the forward and backward: the only back-end under DeepSpeed

    def loss_fn(rows: torch.Tensor):
        return minibatch_loss(model, roles, exp, rows, cfg, kl_coef, value_head)

    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(exp), generator=generator)
        for rows in order.split(cfg.minibatch_size):
            loss, metrics = driver.forward(loss_fn, rows)
            if reduce is not None:
                local = exp.mask[rows.to(exp.mask.device)].sum().double()
                loss = loss * (local * driver.world_size / reduce(local.reshape(1))[0].clamp(min=1)).to(loss.dtype)
            regularizer = adalora.regularization() if adalora is not None else None
            if regularizer is not None:
                loss = loss + regularizer
                metrics["adalora/orth_reg"] = regularizer.item()
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the RL loss is {loss.item()}; nothing was saved for this iteration. "
                                       "Lower trainer.optimizer.lr or trainer.rl.kl.coef, or check the rewards")
            driver.backward(loss)
            for i, backend in enumerate(backends):
                norm = backend.clip_and_norm()
                if not math.isfinite(norm):
                    for other in backends:
                        other.zero_grad()
                    raise TrainingDiverged(f"gradient norm {norm}; nothing was saved for this iteration")
                metrics[f"grad_norm/{i}"] = norm
                if steps == 0 and i == 0:  # the lr of the iteration's first update (DeepSpeed has just made it)
                    first_lr = backend.lr
                backend.step(zero_grad=adalora is None)
            if adalora is not None:  # PEFT's order: after optimizer.step(), before the gradients are cleared
                metrics.update(adalora.after_optimizer_step())
                for backend in backends:
                    backend.zero_grad()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
    return {**{key: value / steps for key, value in totals.items()}, "lr": first_lr}
