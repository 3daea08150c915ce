"""The on-policy RL loop shared by PPO, GRPO and RLOO: draw prompts, sample, score with every role, shape rewards,
compute advantages (the estimator's one function), run the minibatch epochs, log, checkpoint.

This is a loop of its own rather than the supervised ``Trainer``: an iteration is a rollout followed by many
optimizer steps over data it generated, with one or two optimizers. It reuses the pieces the supervised loop is
built from: ``TorchBackend`` (optimizer, schedule, clipping, optimizer state files), the atomic checkpoints of
``checkpoint.py`` (with RNG capture), ``BatchStream`` for the position in the prompt set, and the ``Tracker``.

A checkpoint holds the policy and value adapters and the value head (``trainable.safetensors``), each optimizer's
state (``optimizer-<group>/optimizer.pt``), the schedulers, the KL controller, the running reward moments, the
prompt-stream position and the RNG states, so a resumed run continues exactly (tested bit for bit on CPU).

An AdaLoRA policy (or value) adapter has its ranks allocated as in the supervised loop (``adalora_hook.py``): the
orthogonal regulariser joins every minibatch loss and the allocator runs after every optimizer step, counting
optimizer steps (iterations x epochs x minibatches; ``total_step`` defaults to that total); its state is checkpointed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from align.adapters import AdapterModel, LoraConfig
from align.algos import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    explained_variance,
    masked_mean,
)
from align.config.errors import ConfigError
from align.config.rl import RLConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.heads import ScalarHead
from align.models.roles import POLICY, REFERENCE, REWARD, VALUE, Role, check_roles

from .adalora_hook import AdaLoraHook
from .backend import TorchBackend
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data_stream import BatchStream
from .rl_common import AdvantageFn, Experience, RewardFn, score_rollout, sequence_kl, shape_rewards, update
from .rollout import generate_rollout


@dataclass
class RLTrainer:
    """Runs ``loop.max_steps`` RL iterations. ``params`` are the trainable tensors by checkpoint name;
    ``backends`` one optimizer back-end per group of them (``groups`` maps group -> names)."""

    model: AdapterModel
    roles: dict[str, Role]
    advantage_fn: AdvantageFn
    prompts: BatchStream
    tokenizer: Any
    cfg: RLConfig
    loop: LoopConfig
    out_dir: Path
    params: dict[str, nn.Parameter]
    backends: dict[str, TorchBackend]
    kl_controller: FixedKLController | AdaptiveKLController
    moments: RunningMoments
    value_head: ScalarHead | None = None
    reward_head: ScalarHead | None = None
    reward_fn: RewardFn | None = None
    tracker: Any = None
    step: int = 0
    adalora: AdaLoraHook | None = field(default=None, init=False)  # built when an AdaLoRA adapter is trained

    def __post_init__(self) -> None:
        self.adalora = AdaLoraHook.build([self.model], self.params, optimizer_steps(self.cfg, self.loop))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"

    # -------------------------------------------------------------------------------------- iteration
    def iteration(self) -> dict[str, float]:
        """One rollout and its PPO epochs; returns the iteration's metrics."""
        start = time.perf_counter()
        k = self.cfg.rollout.group_size
        prompt_ids = [p for p in self.prompts.next() for _ in range(k)]  # the k samples of a prompt adjacent
        rollout = generate_rollout(self.model, self.roles[POLICY].adapter, prompt_ids, self.cfg.rollout,
                                   self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        generation = time.perf_counter() - start
        exp = score_rollout(self.model, self.roles, rollout, self.cfg, self.value_head, self.reward_head,
                            self.reward_fn, self.tokenizer)
        shape_rewards(exp, self.cfg, self.moments)
        kl_coef = self.kl_controller.value
        self.advantage_fn(exp, kl_coef, self.cfg)
        shuffle = torch.Generator().manual_seed(self.loop.seed * 1_000_003 + self.step)
        lr = next(iter(self.backends.values())).lr  # the iteration's first lr; the schedule advances per minibatch
        metrics = update(self.model, self.roles, exp, self.cfg, kl_coef, list(self.backends.values()), shuffle,
                         self.value_head, self.adalora)
        kl = sequence_kl(exp).mean().item()
        self.kl_controller.update(kl, len(exp))
        self.step += 1
        metrics.update(rollout_metrics(exp, kl, kl_coef))
        total = time.perf_counter() - start
        metrics.update({"time/iteration_s": total, "time/generation_share": generation / total,
                        "lr": lr})
        return metrics

    def fit(self) -> dict[str, float]:
        """Run to ``loop.max_steps`` iterations, resuming from the newest checkpoint; returns the last metrics."""
        self.resume()
        self.model.eval()  # dropout off for every role: the rollout's log-probs are the update's starting point
        last: dict[str, float] = {}
        bar = tqdm(total=self.loop.max_steps, initial=self.step, desc=f"{self.cfg.algo} {Path(self.out_dir).name}",
                   disable=not self.loop.progress, dynamic_ncols=True)
        while self.step < self.loop.max_steps:
            last = self.iteration()
            bar.update(1)
            bar.set_postfix({k: f"{last[k]:.3g}" for k in ("reward/score_mean", "kl", "policy/entropy")})
            if self.tracker is not None and (self.step % self.loop.log_every == 0
                                             or self.step == self.loop.max_steps):
                self.tracker.log(last, step=self.step)
            if self.loop.save_every and self.step % self.loop.save_every == 0:
                self.save()
        bar.close()
        saved = latest_checkpoint(self.checkpoint_dir)
        if saved is None or saved.name != f"step-{self.step:06d}":
            self.save()
        return last

    # --------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        state = {"stream": self.prompts.state_dict(), "kl_controller": self.kl_controller.state_dict(),
                 "reward_moments": self.moments.state_dict()}

        def write_optimizers(directory: Path) -> dict:
            schedulers = {}
            for group, backend in self.backends.items():
                (directory / f"optimizer-{group}").mkdir()
                schedulers[group] = backend.save_state(directory / f"optimizer-{group}")["scheduler"]
            out = {"schedulers": schedulers}
            if self.adalora is not None:
                out["adalora"] = self.adalora.save(directory)
            return out

        trainable = {name: p.detach().cpu().clone() for name, p in self.params.items()}
        return save_checkpoint(self.checkpoint_dir, self.step, trainable, state, keep=self.loop.keep_checkpoints,
                               write_extra=write_optimizers)

    def resume(self) -> bool:
        """Load the newest checkpoint if there is one; True when training continues from it."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        tensors, state = load_checkpoint(path)
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks trainable tensors {missing[:3]}: was it written by another "
                               "configuration? Delete it or use a fresh output directory")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[name])
        for group, backend in self.backends.items():
            backend.load_state(path / f"optimizer-{group}", {"scheduler": state["schedulers"][group]})
        if self.adalora is not None:
            self.adalora.load(path, state.get("adalora"))
        self.prompts.load_state_dict(state["stream"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["reward_moments"])
        self.step = state["step"]
        return True


def optimizer_steps(cfg: RLConfig, loop: LoopConfig) -> int:
    """Optimizer steps of a whole run: iterations x epochs x minibatches of each rollout."""
    return loop.max_steps * cfg.ppo_epochs * math.ceil(cfg.samples_per_step / cfg.minibatch_size)


def rollout_metrics(exp: Experience, kl: float, kl_coef: float) -> dict[str, float]:
    """Reward, KL, entropy, length and (with a value model) explained-variance figures of one scored rollout."""
    lengths = exp.rollout.response_lengths.float()
    out = {"reward/score_mean": exp.scores.mean().item(), "reward/score_std": _std(exp.scores),
           "reward/shaped_mean": exp.rewards.mean().item(), "kl": kl, "kl/coef": kl_coef,
           "policy/entropy": masked_mean(exp.entropy, exp.mask).item(),
           "rollout/response_length": lengths.mean().item(),
           "rollout/finished": exp.rollout.finished.float().mean().item()}
    if exp.values is not None and int(exp.mask.sum()) > 1:
        out["value/explained_variance"] = explained_variance(exp.values, exp.returns, exp.mask).item()
    return out


def _std(values: torch.Tensor) -> float:
    return values.std().item() if values.numel() > 1 else 0.0


# -------------------------------------------------------------------------------------------- setup
def setup_roles(model: AdapterModel, cfg: RLConfig, reward_head: ScalarHead | None, reward_fn: RewardFn | None,
                adapter_config: LoraConfig | None = None) -> dict[str, Role]:
    """Freeze the reference and reward adapters, create the policy (a trainable copy of the reference, or a fresh
    adapter when the reference is the bare base; an existing one is kept) and return the roles."""
    if (reward_fn is None) == (cfg.reward_adapter is None) or (reward_fn is None and reward_head is None):
        raise ConfigError("trainer.rl.reward_adapter", cfg.reward_adapter,
                          "an adapter name with its score head (reward_head=) and no reward_fn, or null with a "
                          "reward_fn")
    for name, key in ((cfg.reference, "reference"), (cfg.reward_adapter, "reward_adapter")):
        if name is not None:
            if name not in model.adapter_names:
                raise ConfigError(f"trainer.rl.{key}", name, f"an adapter of the model ({model.adapter_names}); "
                                  "load it first, or null")
            model.freeze(name)
    if cfg.policy not in model.adapter_names:
        if cfg.reference is not None:
            model.copy_adapter(cfg.reference, cfg.policy)
        else:
            model.add_adapter(cfg.policy, adapter_config or LoraConfig())
    roles = {POLICY: Role(POLICY, cfg.policy, "lm", True), REFERENCE: Role(REFERENCE, cfg.reference, "lm", False)}
    if cfg.reward_adapter is not None:
        roles[REWARD] = Role(REWARD, cfg.reward_adapter, "score", False)
    return roles


def build_rl_trainer(model: AdapterModel, roles: dict[str, Role], advantage_fn: AdvantageFn, prompt_rows,
                     tokenizer, cfg: RLConfig, loop: LoopConfig, optim: OptimizerConfig, out_dir: str | Path,
                     value_head: ScalarHead | None = None, reward_head: ScalarHead | None = None,
                     reward_fn: RewardFn | None = None, tracker=None) -> RLTrainer:
    """Trainable tensors, optimizer back-ends, KL controller, reward moments and the prompt stream, for roles set
    up by the estimator's builder (``build_ppo_trainer``, ``build_grpo_trainer``, ``build_rloo_trainer``)."""
    if loop.deepspeed is not None:
        raise ConfigError("trainer.deepspeed", loop.deepspeed, "null: the RL trainers run in one process for now")
    if loop.precision != "fp32":
        raise ConfigError("trainer.precision", loop.precision, "'fp32' for the RL trainers (bf16 is not wired yet)")
    check_roles(model, roles)
    groups = {POLICY: {f"policy.{n}": p for n, p in model.named_adapter_parameters(roles[POLICY].adapter)}}
    if VALUE in roles:
        groups[VALUE] = {f"value.{n}": p for n, p in model.named_adapter_parameters(roles[VALUE].adapter)}
        groups[VALUE].update({f"value_head.{n}": p for n, p in value_head.named_parameters()})
    if not cfg.separate_value_optimizer:
        groups = {"all": {n: p for group in groups.values() for n, p in group.items()}}
    total = optimizer_steps(cfg, loop)
    backends = {group: TorchBackend(params, replace(optim, lr=cfg.value_lr) if group == VALUE and cfg.value_lr
                                    else optim, total) for group, params in groups.items()}
    kl = cfg.kl
    controller = (AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef))
    stream = BatchStream(prompt_rows, cfg.rollout.prompts_per_step,
                         lambda rows: [list(r["prompt_ids"]) for r in rows], seed=loop.seed)
    params = {n: p for group in groups.values() for n, p in group.items()}
    return RLTrainer(model=model, roles=roles, advantage_fn=advantage_fn, prompts=stream, tokenizer=tokenizer,
                     cfg=cfg, loop=loop, out_dir=Path(out_dir), params=params, backends=backends,
                     kl_controller=controller, moments=RunningMoments(), value_head=value_head,
                     reward_head=reward_head, reward_fn=reward_fn, tracker=tracker)
