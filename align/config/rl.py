"""``trainer.rl`` config: PPO, GRPO and RLOO on one frozen base (rollouts, KL control, rewards, the PPO update).
Plain floats for the math; every check names the dotted key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from .errors import ConfigError

RLAlgo = Literal["ppo", "grpo", "rloo"]
KLEstimator = Literal["k1", "k2", "k3"]
ValueInit = Literal["reward", "fresh"]
PREFIX = "trainer.rl"


def _number(key: str, value: object, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        bound += f"{' and ' if bound else ''}<= {high}" if high is not None else ""
        raise ConfigError(key, value, f"a finite number {bound}".strip())


def _integer(key: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def _choice(key: str, value: object, literal) -> None:
    if value not in get_args(literal):
        raise ConfigError(key, value, f"one of {get_args(literal)}")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling with the policy adapter. Each iteration draws ``prompts_per_step`` prompts and samples
    ``group_size`` responses for each (GRPO and RLOO need at least 2). A response that has not produced EOS after
    ``max_new_tokens`` is unfinished: ``unfinished_penalty`` is subtracted from its score. Generation runs
    ``generation_batch_size`` sequences at a time."""

    prompts_per_step: int = 32
    group_size: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    unfinished_penalty: float = 1.0
    generation_batch_size: int = 64

    def check(self, prefix: str) -> None:
        _integer(f"{prefix}.prompts_per_step", self.prompts_per_step, 1)
        _integer(f"{prefix}.group_size", self.group_size, 1)
        _integer(f"{prefix}.max_new_tokens", self.max_new_tokens, 1)
        _number(f"{prefix}.temperature", self.temperature, 0.0, low_open=True)
        _number(f"{prefix}.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number(f"{prefix}.unfinished_penalty", self.unfinished_penalty, 0.0)
        _integer(f"{prefix}.generation_batch_size", self.generation_batch_size, 1)


@dataclass(frozen=True)
class KLConfig:
    """KL(policy || reference) control. ``coef`` is the (initial) coefficient; ``estimator`` k1 (default,
    unbiased), k2 or k3 (unbiased, >= 0). ``adaptive``: proportional control towards ``target`` nats per response
    over ``horizon`` samples (Ziegler et al. 2019); otherwise fixed. ``in_loss``: a k-estimator term in the loss
    (GRPO's choice) instead of a per-token penalty in the reward."""

    coef: float = 0.05
    estimator: KLEstimator = "k1"
    adaptive: bool = False
    target: float = 6.0
    horizon: float = 10000.0
    in_loss: bool = False

    def check(self, prefix: str) -> None:
        _number(f"{prefix}.coef", self.coef, 0.0)
        _choice(f"{prefix}.estimator", self.estimator, KLEstimator)
        _number(f"{prefix}.target", self.target, 0.0, low_open=True)
        _number(f"{prefix}.horizon", self.horizon, 0.0, low_open=True)
        for key in ("adaptive", "in_loss"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{prefix}.{key}", getattr(self, key), "true or false")


@dataclass(frozen=True)
class RLConfig:
    """One on-policy trainer for three estimators (``algo``): PPO (value model + GAE), GRPO (group-normalised
    outcome advantages) and RLOO (leave-one-out baseline); the rollout, scoring and clipped update are shared.

    Roles on the one base: ``policy`` (trainable copy of ``reference``, or fresh when ``reference`` is None, the
    bare base), ``reward_adapter`` + its score head (None: a reward function scores the text), ``value`` adapter +
    per-token head (PPO only), started from the reward adapter and head (``value_init='reward'``) or fresh.

    Rewards: the learned reward is standardised with the statistics its head stored after training
    (``standardize_reward_model``); ``normalize_rewards`` further standardises with running moments (kept in
    checkpoints); ``reward_clip`` > 0 clips to [-clip, clip]. Update: ``ppo_epochs`` passes over the rollout in
    shuffled minibatches of ``minibatch_size`` sequences, one optimizer step each; the policy and value adapters
    share one optimizer unless ``separate_value_optimizer`` (then ``value_lr`` applies; None: the policy's lr).
    ``whiten_advantages`` applies to PPO and RLOO (GRPO's group normalisation replaces it)."""

    algo: RLAlgo = "ppo"
    policy: str = "policy"
    reference: str | None = "sft"
    reward_adapter: str | None = "reward"
    value: str = "value"
    value_init: ValueInit = "reward"
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo_epochs: int = 4
    minibatch_size: int = 16
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    standardize_reward_model: bool = True
    normalize_rewards: bool = False
    reward_clip: float = 0.0
    separate_value_optimizer: bool = False
    value_lr: float | None = None
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        _choice(f"{PREFIX}.algo", self.algo, RLAlgo)
        _choice(f"{PREFIX}.value_init", self.value_init, ValueInit)
        self.rollout.check(f"{PREFIX}.rollout")
        self.kl.check(f"{PREFIX}.kl")
        if self.algo in ("grpo", "rloo") and self.rollout.group_size < 2:
            raise ConfigError(f"{PREFIX}.rollout.group_size", self.rollout.group_size,
                              f"an integer >= 2 for {self.algo} (its baseline compares samples of one prompt)")
        for key in ("policy", "value"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"{PREFIX}.{key}", getattr(self, key), "a non-empty adapter name")
        seen: dict[str, str] = {}
        roles = [("policy", self.policy), ("reference", self.reference), ("reward_adapter", self.reward_adapter)]
        for key, name in roles + ([("value", self.value)] if self.uses_value else []):
            if name is None:
                continue
            if name in seen:
                raise ConfigError(f"{PREFIX}.{key}", name, f"an adapter other than {PREFIX}.{seen[name]}'s: each "
                                  "role needs its own")
            seen[name] = key
        if self.algo == "ppo" and self.value_init == "reward" and self.reward_adapter is None:
            raise ConfigError(f"{PREFIX}.value_init", self.value_init,
                              "'fresh' when the reward is a function (trainer.rl.reward_adapter=null): there is no "
                              "reward adapter to start the value model from")
        _integer(f"{PREFIX}.ppo_epochs", self.ppo_epochs, 1)
        _integer(f"{PREFIX}.minibatch_size", self.minibatch_size, 1)
        _integer(f"{PREFIX}.chunk_size", self.chunk_size, 1)
        for key in ("clip_eps", "value_clip_eps"):
            _number(f"{PREFIX}.{key}", getattr(self, key), 0.0, low_open=True)
        _number(f"{PREFIX}.vf_coef", self.vf_coef, 0.0)
        _number(f"{PREFIX}.gamma", self.gamma, 0.0, 1.0)
        _number(f"{PREFIX}.lam", self.lam, 0.0, 1.0)
        _number(f"{PREFIX}.reward_clip", self.reward_clip, 0.0)
        if self.value_lr is not None:
            _number(f"{PREFIX}.value_lr", self.value_lr, 0.0, low_open=True)
            if not self.separate_value_optimizer:
                raise ConfigError(f"{PREFIX}.value_lr", self.value_lr,
                                  "null unless trainer.rl.separate_value_optimizer=true (one optimizer, one lr)")

    @property
    def uses_value(self) -> bool:
        return self.algo == "ppo"

    @property
    def samples_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size
