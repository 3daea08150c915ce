"""AdaLoRA's rank allocation inside the training loops.

``AdaLoraHook.build(modules, params, total_steps)`` finds every AdaLoRA adapter whose parameters are being trained
(on any ``AdapterModel`` among ``modules``) and returns None when there is none, so LoRA and the other methods train
exactly as before. With one, the loop (``Trainer`` and ``RLTrainer``) does what PEFT's AdaLoRA recipe does, once per
optimizer step:

    loss = task loss + hook.regularization()       # orth_reg_weight x the orthogonal regulariser
    loss.backward(); optimizer.step()
    hook.after_optimizer_step()                     # allocator.update_and_allocate(step), step = 1, 2, ...
    optimizer.zero_grad()

``total_step`` left None in the adapter's config becomes ``total_steps``, the loop's number of optimizer steps
(``max_steps`` for the supervised loop, iterations x epochs x minibatches for RL), and the config is checked then.

An adapter whose config already carries a ``rank_pattern`` when the trainer is built (a pruned SFT adapter copied as
the DPO policy, or loaded from disk) has had its ranks allocated: it is trained at those ranks with the regulariser,
and triplets pruned but still held in memory stay at zero after every step; nothing is re-allocated.

Checkpoints: ``save`` writes the allocators' importance / uncertainty EMAs to ``adalora.safetensors`` and returns
the step count and current keep-masks for state.json; ``load`` restores them, so a resumed run allocates exactly as
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from align.adapters import AdaLoraAllocator, AdaLoraConfig, AdaLoraModule, AdapterModel
from align.adapters.adalora_allocator import orthogonal_regularization

STATE_FILE = "adalora.safetensors"
DEEPSPEED_REFUSAL = "AdaLoRA rank allocation is not supported with DeepSpeed; use deepspeed=none"


@dataclasses.dataclass
class TrainedAdaLora:
    """One trained AdaLoRA adapter: its allocator, or None when its ranks were allocated before this run."""

    model: AdapterModel
    name: str
    allocator: AdaLoraAllocator | None

    @property
    def modules(self) -> list[AdaLoraModule]:
        return self.model.adapter_modules(self.name)  # type: ignore[return-value]

    @property
    def config(self) -> AdaLoraConfig:
        return self.model.configs[self.name]  # type: ignore[return-value]

    def kept_ranks(self) -> int:
        return sum(int(m.rank_mask.sum()) if m.rank_mask is not None else m.lora_A.shape[0] for m in self.modules)


def adapter_models(modules: list[nn.Module]) -> list[AdapterModel]:
    """Every distinct ``AdapterModel`` among ``modules`` and their submodules."""
    found: dict[int, AdapterModel] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, AdapterModel):
                found.setdefault(id(sub), sub)
    return list(found.values())


def trained_adalora_adapters(modules: list[nn.Module], params: dict[str, nn.Parameter]) -> list[tuple[AdapterModel,
                                                                                                        str]]:
    """(model, adapter name) of each AdaLoRA adapter whose parameters are all among ``params``."""
    trained = {id(p) for p in params.values()}
    out = []
    for model in adapter_models(modules):
        for name, config in model.configs.items():
            if not isinstance(config, AdaLoraConfig):
                continue
            ids = [id(p) in trained for p in model.adapter_parameters(name)]
            if any(ids) and not all(ids):
                raise ValueError(f"only some parameters of AdaLoRA adapter {name!r} are trained; train all of it "
                                 "or none")
            if ids and all(ids):
                out.append((model, name))
    return out


class AdaLoraHook:
    """The regulariser and the per-step allocation of every trained AdaLoRA adapter (see the module docstring)."""

    def __init__(self, adapters: list[TrainedAdaLora]) -> None:
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"two trained AdaLoRA adapters share a name ({names}); the checkpoint keys them by name")
        self.adapters = adapters
        self.step = 0  # optimizer steps taken; the allocator's step is this count after the step (1, 2, ...)

    @classmethod
    def build(cls, modules: list[nn.Module], params: dict[str, nn.Parameter], total_steps: int) -> AdaLoraHook | None:
        """The hook for the AdaLoRA adapters trained through ``params`` (None when there is none). A config with
        total_step None gets ``total_steps``."""
        adapters = []
        for model, name in trained_adalora_adapters(modules, params):
            config = model.configs[name]
            if config.rank_pattern is not None:  # allocated before this run: trained at its ranks
                adapters.append(TrainedAdaLora(model, name, None))
                continue
            if config.total_step is None:
                model.configs[name] = dataclasses.replace(config, total_step=total_steps)  # validates the schedule
            adapters.append(TrainedAdaLora(model, name, AdaLoraAllocator(model, name)))
        return cls(adapters) if adapters else None

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def regularization(self) -> torch.Tensor | None:
        """Sum over the trained adapters of orth_reg_weight x their orthogonal regulariser (None when every weight
        is 0). Call once per optimizer step: it is added to the step's mean loss."""
        terms = [orthogonal_regularization(a.modules, a.config.orth_reg_weight) for a in self.adapters
                 if a.config.orth_reg_weight > 0]
        return torch.stack(terms).sum() if terms else None

    def after_optimizer_step(self) -> dict[str, float]:
        """After ``optimizer.step()``, before the gradients are cleared: update the importance scores and mask to
        the budget of this step (held adapters: re-zero their pruned triplets). Returns the kept ranks."""
        self.step += 1
        for adapter in self.adapters:
            if adapter.allocator is not None:
                adapter.allocator.update_and_allocate(self.step)
            else:
                with torch.no_grad():
                    for module in adapter.modules:
                        if module.rank_mask is not None:
                            module.lora_E.masked_fill_(~module.rank_mask[:, None], 0.0)
        return {"adalora/rank": float(sum(a.kept_ranks() for a in self.adapters))}

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> dict:
        """Write the EMAs to ``directory/adalora.safetensors``; returns the JSON part (for state.json)."""
        tensors: dict[str, torch.Tensor] = {}
        state: dict = {"step": self.step, "adapters": {}}
        for adapter in self.adapters:
            if adapter.allocator is None:
                state["adapters"][adapter.name] = {"allocating": False}
                continue
            json_part, adapter_tensors = adapter.allocator.state_dict()
            state["adapters"][adapter.name] = {"allocating": True, **json_part}
            tensors.update({f"{adapter.name}/{key}": value.contiguous() for key, value in adapter_tensors.items()})
        save_file(tensors, str(Path(directory) / STATE_FILE))
        return state

    def load(self, directory: Path, state: dict | None) -> None:
        """Restore what ``save`` wrote into ``directory`` (the checkpoint) and returned (``state``)."""
        saved = (state or {}).get("adapters", {})
        expected = {a.name: a.allocator is not None for a in self.adapters}
        if state is None or {name: s.get("allocating") for name, s in saved.items()} != expected:
            raise RuntimeError(f"checkpoint {directory} does not hold the AdaLoRA allocator state of adapters "
                               f"{self.names}: was it written by another configuration? Delete it or use a fresh "
                               "output directory")
        tensors = load_file(str(Path(directory) / STATE_FILE))
        for adapter in self.adapters:
            if adapter.allocator is not None:
                prefix = f"{adapter.name}/"
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                adapter.allocator.load_state_dict(saved[adapter.name], own)
        self.step = state["step"]
