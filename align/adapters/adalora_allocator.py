"""AdaLoRA's rank allocator: a plain object the training loop calls once per optimizer step, after
``backward()`` and before the gradients are cleared:

    allocator = AdaLoraAllocator(model, "policy")
    loss = task_loss + allocator.orthogonal_regularization()
    loss.backward(); optimizer.step()
    allocator.update_and_allocate(step)
    optimizer.zero_grad()

It follows PEFT's ``RankAllocator`` step for step (Zhang et al. 2023, eqs. 5-9): importance of every entry
I = |w ∂L/∂w|, smoothed Ī = β1 Ī + (1 - β1) I and uncertainty Ū = β2 Ū + (1 - β2) |I - Ī|; a triplet's score is
s(λ_i) + mean_j s(P_ij) + mean_k s(Q_ki) with s = Ī Ū. The budget (total kept rank) is the sum of init ranks until
``tinit``, falls as b(t) = b_T + (b_0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))³, and every ``deltaT`` steps
the λ of triplets scoring at or below the (b_0 - b(t))-th smallest score are zeroed. At step T - tfinal the final
allocation is fixed, written to the adapter's config as ``rank_pattern`` (so ``save_adapter`` writes pruned
tensors and the pattern), and re-applied at every later step.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from .adalora import AdaLoraConfig, AdaLoraModule
from .errors import AdapterError

if TYPE_CHECKING:
    from .model import AdapterModel

PARTS = ("lora_A", "lora_E", "lora_B")


class AdaLoraAllocator:
    """Allocates the rank budget of AdaLoRA adapter ``name`` of ``model`` (which must be trainable)."""

    def __init__(self, model: AdapterModel, name: str) -> None:
        config = model.configs.get(name)
        if not isinstance(config, AdaLoraConfig):
            raise AdapterError(f"adapter {name!r} is not an AdaLoRA adapter (config {type(config).__name__})")
        config.check_schedule()  # total_step set (a trainer fills it in) and a budgeting phase
        self.model, self.name = model, name
        layers = model.layers_of(name)
        self.modules: dict[str, AdaLoraModule] = {path: layer.adapters[name] for path, layer in layers.items()}
        self.init_budget = sum(m.lora_A.shape[0] for m in self.modules.values())
        self.target_budget = config.target_r * len(self.modules)
        self.reset_importance()

    @property
    def config(self) -> AdaLoraConfig:
        return self.model.configs[self.name]

    def reset_importance(self) -> None:
        self.importance: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to re-allocate at this step)."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % cfg.deltaT == 0

    def update_and_allocate(self, step: int) -> int:
        """Update the importance scores from the current gradients and mask to the step's budget; returns it."""
        final = self.config.total_step - self.config.tfinal
        budget, allocate = self.budget_schedule(step)
        if step < final:
            self._update_importance()
            if allocate:
                self._set_pattern(self._mask_to_budget(budget))
        elif step == final:
            self._set_pattern(self._mask_to_budget(budget))
            self.reset_importance()
        else:
            self._apply_pattern()
        return budget

    def orthogonal_regularization(self) -> torch.Tensor:
        """orth_reg_weight * mean over P and Q matrices of ||P Pᵀ - I||_F, ||Qᵀ Q - I||_F (a scalar with grad)."""
        return orthogonal_regularization(list(self.modules.values()), self.config.orth_reg_weight)

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What an exact resume needs beyond the adapter's tensors: the current keep-masks (``rank_pattern``, JSON)
        and the importance / uncertainty EMAs (tensors named ``importance/<layer path>.<part>``, ``uncertainty/...``)."""
        tensors = {f"{kind}/{path}.{part}": value.detach().cpu().clone()
                   for kind, store in (("importance", self.importance), ("uncertainty", self.uncertainty))
                   for (path, part), value in store.items()}
        return {"rank_pattern": self.config.rank_pattern}, tensors

    def load_state_dict(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``'s output: the masks (config and modules) and the EMAs."""
        self.reset_importance()
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            path, _, part = name.rpartition(".")
            if kind not in ("importance", "uncertainty") or path not in self.modules or part not in PARTS:
                raise AdapterError(f"allocator state {key!r} does not belong to adapter {self.name!r}")
            store = self.importance if kind == "importance" else self.uncertainty
            store[(path, part)] = value.to(getattr(self.modules[path], part).device)
        pattern = state.get("rank_pattern")
        if pattern is None:
            self.model.configs[self.name] = dataclasses.replace(self.config, rank_pattern=None)
            for module in self.modules.values():
                module.rank_mask = None
        else:
            self._set_pattern(pattern)

    # ------------------------------------------------------------------------------------------- internals
    def _update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, module in self.modules.items():
                for part in PARTS:
                    param = getattr(module, part)
                    if param.grad is None:
                        raise AdapterError(f"{path}.{part} has no gradient: call update_and_allocate after "
                                           "backward() and before the gradients are cleared")
                    key = (path, part)
                    sensitivity = (param * param.grad).abs()
                    smoothed = self.importance.get(key, torch.zeros_like(param))
                    smoothed = beta1 * smoothed + (1 - beta1) * sensitivity
                    spread = self.uncertainty.get(key, torch.zeros_like(param))
                    self.uncertainty[key] = beta2 * spread + (1 - beta2) * (sensitivity - smoothed).abs()
                    self.importance[key] = smoothed

    def _score(self, path: str, part: str) -> torch.Tensor:
        return self.importance[(path, part)] * self.uncertainty[(path, part)]

    def _triplet_scores(self, path: str) -> torch.Tensor:
        """(r,) score of each triplet of layer ``path``."""
        rows = self._score(path, "lora_A").mean(dim=1)  # (r,)
        cols = self._score(path, "lora_B").mean(dim=0)  # (r,)
        return self._score(path, "lora_E").view(-1) + (rows + cols)

    def _mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        if not self.importance:
            raise AdapterError("no importance scores yet: update_and_allocate must see gradients before it prunes")
        scores = {path: self._triplet_scores(path) for path in self.modules}
        pruned = self.init_budget - budget
        if pruned > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned).values.item()
        else:
            threshold = -float("inf")
        return {f"{path}.lora_E": (score > threshold).tolist() for path, score in scores.items()}

    def _set_pattern(self, pattern: dict[str, list[bool]]) -> None:
        self.model.configs[self.name] = dataclasses.replace(self.config, rank_pattern=pattern)
        self._apply_pattern()

    def _apply_pattern(self) -> None:
        pattern = self.config.rank_pattern
        with torch.no_grad():
            for path, module in self.modules.items():
                keep = torch.tensor(pattern[f"{path}.lora_E"], device=module.lora_E.device)
                module.lora_E.masked_fill_(~keep[:, None], 0.0)
                module.rank_mask = keep


def orthogonal_regularization(modules: list[AdaLoraModule], weight: float) -> torch.Tensor:
    """``weight`` * mean over the P and Q matrices of ``modules`` of ||P Pᵀ - I||_F and ||Qᵀ Q - I||_F (PEFT's
    term: Frobenius norms, not squared, averaged over every P and Q)."""
    terms = []
    for module in modules:
        for gram in (module.lora_A @ module.lora_A.T, module.lora_B.T @ module.lora_B):  # (r, r) each
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                         device=gram.device)))
    return weight * torch.stack(terms).mean()
