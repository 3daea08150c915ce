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
from align.algos.rl import global_masked_moments
from align.config.errors import ConfigError
from align.config.rl import RLConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.heads import ScalarHead
from align.models.roles import POLICY, REFERENCE, REWARD, VALUE, Role, check_roles

from .adalora_hook import DEEPSPEED_REFUSAL, AdaLoraHook
from .backend import TorchBackend, build_backend
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
        self.prompts.shard(self.rank, self.world_size)  # each rank rolls out its share of every global batch

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"

    @property
    def driver(self):
        """The back-end that runs forwards and backwards (the only one under DeepSpeed)."""
        return next(iter(self.backends.values()))

    @property
    def rank(self) -> int:
        return self.driver.rank

    @property
    def world_size(self) -> int:
        return self.driver.world_size

    @property
    def reduce(self):
        """The all-reduce (sum over ranks) of a data-parallel run; None in one process."""
        return self.driver.reduce_sum if self.world_size > 1 else None

    # -------------------------------------------------------------------------------------- iteration
    def iteration(self) -> dict[str, float]:
        """One rollout and its PPO epochs; returns the iteration's metrics."""
        start = time.perf_counter()
        k, reduce = self.cfg.rollout.group_size, self.reduce
        self.driver.before_eval()  # ZeRO-3: the output head whole again after the last optimizer step
        prompt_ids = [p for p in self.prompts.next() for _ in range(k)]  # the k samples of a prompt adjacent
        chunks = math.ceil(len(prompt_ids) / self.cfg.rollout.generation_batch_size)
        rollout = generate_rollout(self.model, self.roles[POLICY].adapter, prompt_ids, self.cfg.rollout,
                                   self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                   seed=self.loop.seed * 100_003 + self.step, first_chunk=self.rank * chunks,
                                   synced=self.driver.synced_forwards)
        generation = time.perf_counter() - start
        exp = score_rollout(self.model, self.roles, rollout, self.cfg, self.value_head, self.reward_head,
                            self.reward_fn, self.tokenizer)
        shape_rewards(exp, self.cfg, self.moments, reduce)
        kl_coef = self.kl_controller.value
        self.advantage_fn(exp, kl_coef, self.cfg, reduce=reduce)
        shuffle = torch.Generator().manual_seed(self.loop.seed * 1_000_003 + self.step)
        metrics = update(self.model, self.roles, exp, self.cfg, kl_coef, list(self.backends.values()), shuffle,
                         self.value_head, self.adalora, reduce)
        kl, count = sequence_kl(exp).sum().double(), torch.tensor(float(len(exp)), dtype=torch.float64)
        if reduce is not None:  # the controller sees the global batch's mean KL, the same on every rank
            kl, count = reduce(torch.stack([kl, count.to(kl.device)])).unbind()
        kl = float(kl / count)
        self.kl_controller.update(kl, int(count))
        self.step += 1
        metrics.update(rollout_metrics(exp, kl, kl_coef, reduce))
        total = time.perf_counter() - start
        metrics.update({"time/iteration_s": total, "time/generation_share": generation / total})
        return mean_over_ranks(metrics, reduce, self.world_size)

    def fit(self) -> dict[str, float]:
        """Run to ``loop.max_steps`` iterations, resuming from the newest checkpoint; returns the last metrics."""
        self.resume()
        self.model.eval()  # dropout off for every role: the rollout's log-probs are the update's starting point
        last: dict[str, float] = {}
        bar = tqdm(total=self.loop.max_steps, initial=self.step, desc=f"{self.cfg.algo} {Path(self.out_dir).name}",
                   disable=not self.loop.progress or self.rank != 0, dynamic_ncols=True)
        while self.step < self.loop.max_steps:
            last = self.iteration()
            bar.update(1)
            bar.set_postfix({k: f"{last[k]:.3g}" for k in ("reward/score_mean", "kl", "policy/entropy")})
            if self.tracker is not None and self.rank == 0 and (self.step % self.loop.log_every == 0
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
            backends = {}
            for group, backend in self.backends.items():
                (directory / f"optimizer-{group}").mkdir(exist_ok=True)  # every rank writes its shards there
                backends[group] = backend.save_state(directory / f"optimizer-{group}")  # scheduler / DeepSpeed's
            out = {"backends": backends}
            if self.adalora is not None:
                out["adalora"] = self.adalora.save(directory)
            return out

        with self.driver.gathered():  # whole tensors, never ZeRO-3's empty shards
            trainable = {name: p.detach().cpu().clone() for name, p in self.params.items()}
        return save_checkpoint(self.checkpoint_dir, self.step, trainable, state, keep=self.loop.keep_checkpoints,
                               write_extra=write_optimizers, rank=self.rank, barrier=self.driver.barrier)

    def resume(self) -> bool:
        """Load the newest checkpoint if there is one; True when training continues from it."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        tensors, state = load_checkpoint(path, rank=self.rank)
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks trainable tensors {missing[:3]}: was it written by another "
                               "configuration? Delete it or use a fresh output directory")
        with torch.no_grad(), self.driver.gathered():
            for name, param in self.params.items():
                param.copy_(tensors[name])
        for group, backend in self.backends.items():
            saved = (state["backends"][group] if "backends" in state
                     else {"scheduler": state["schedulers"][group]})  # checkpoints written before DeepSpeed RL
            backend.load_state(path / f"optimizer-{group}", saved)
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


def rollout_metrics(exp: Experience, kl: float, kl_coef: float, reduce=None) -> dict[str, float]:
    """Reward, KL, entropy, length and (with a value model) explained-variance figures of one scored rollout
    (``reduce``: the score's standard deviation over every rank's rollouts; the means are averaged afterwards)."""
    lengths = exp.rollout.response_lengths.float()
    out = {"reward/score_mean": exp.scores.mean().item(), "reward/score_std": _std(exp.scores, reduce),
           "reward/shaped_mean": exp.rewards.mean().item(), "kl": kl, "kl/coef": kl_coef,
           "policy/entropy": masked_mean(exp.entropy, exp.mask).item(),
           "rollout/response_length": lengths.mean().item(),
           "rollout/finished": exp.rollout.finished.float().mean().item()}
    if exp.values is not None:  # the same keys on every rank (mean_over_ranks): NaN when undefined
        out["value/explained_variance"] = (explained_variance(exp.values, exp.returns, exp.mask).item()
                                           if int(exp.mask.sum()) > 1 else math.nan)
    return out


def mean_over_ranks(metrics: dict[str, float], reduce, world_size: int) -> dict[str, float]:
    """Each metric averaged over the data-parallel ranks (every rank holds as many rollouts); unchanged in one
    process. Every rank must report the same keys."""
    if reduce is None:
        return metrics
    keys = sorted(metrics)
    values = reduce(torch.tensor([metrics[k] for k in keys], dtype=torch.float64)) / world_size
    return dict(zip(keys, values.tolist()))


def _std(values: torch.Tensor, reduce=None) -> float:
    if reduce is not None:  # the global batch's: the same on every rank
        count = int(reduce(torch.tensor([float(values.numel())], dtype=torch.float64))[0])
        return global_masked_moments(values, torch.ones_like(values, dtype=torch.bool), reduce)[1].sqrt().item() \
            if count > 1 else 0.0
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
    if loop.precision != "fp32":
        raise ConfigError("trainer.precision", loop.precision, "'fp32' for the RL trainers (bf16 is not wired yet)")
    if loop.deepspeed is not None and cfg.separate_value_optimizer:
        raise ConfigError("trainer.rl.separate_value_optimizer", True,
                          "false with DeepSpeed: one engine updates the policy and value adapters and the value head, "
                          "with one optimizer and one global gradient-norm clip")
    check_roles(model, roles)
    groups = {POLICY: {f"policy.{n}": p for n, p in model.named_adapter_parameters(roles[POLICY].adapter)}}
    if VALUE in roles:
        groups[VALUE] = {f"value.{n}": p for n, p in model.named_adapter_parameters(roles[VALUE].adapter)}
        groups[VALUE].update({f"value_head.{n}": p for n, p in value_head.named_parameters()})
    if not cfg.separate_value_optimizer:
        groups = {"all": {n: p for group in groups.values() for n, p in group.items()}}
    total = optimizer_steps(cfg, loop)
    if loop.deepspeed is None:
        backends = {group: TorchBackend(params, replace(optim, lr=cfg.value_lr) if group == VALUE and cfg.value_lr
                                        else optim, total) for group, params in groups.items()}
    else:
        adalora = AdaLoraHook.build([model], groups["all"], total)
        if adalora is not None:  # refused before the engine exists: its allocator never sees ZeRO's gradients
            raise ValueError(f"{DEEPSPEED_REFUSAL} (AdaLoRA adapters trained: {adalora.names})")
        # every role adapter and the value head exist now, as DeepSpeed requires; one engine over the model and the
        # value head, one minibatch per optimizer step, its schedule over the run's optimizer steps
        modules = [model] + ([value_head] if value_head is not None else [])
        ds_loop = replace(loop, micro_batch_size=cfg.minibatch_size, grad_accum_steps=1, max_steps=total)
        backends = {"all": build_backend(modules, groups["all"], optim, ds_loop)}
    kl = cfg.kl
    controller = (AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef))
    stream = BatchStream(prompt_rows, cfg.rollout.prompts_per_step,
                         lambda rows: [list(r["prompt_ids"]) for r in rows], seed=loop.seed)
    params = {n: p for group in groups.values() for n, p in group.items()}
    return RLTrainer(model=model, roles=roles, advantage_fn=advantage_fn, prompts=stream, tokenizer=tokenizer,
                     cfg=cfg, loop=loop, out_dir=Path(out_dir), params=params, backends=backends,
                     kl_controller=controller, moments=RunningMoments(), value_head=value_head,
                     reward_head=reward_head, reward_fn=reward_fn, tracker=tracker)
