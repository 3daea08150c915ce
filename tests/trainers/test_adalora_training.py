"""The training loops drive AdaLoRA's rank allocator (align/trainers/adalora_hook.py).

Set-up: tiny_llama (2 layers) with AdaLoRA on q_proj and v_proj: 4 adapted layers at init_r = 6, so the budget
starts at b0 = 4 x 6 = 24 and ends at b_T = target_r x 4 = 2 x 4 = 8. total_step is left None and becomes the loop's
max_steps = 10; tinit = 2, tfinal = 3, deltaT = 1: the budget is 24 for steps 1-2, then 8 + 16 (1 - (t - 2) / 5)³:
t = 3: 8 + 16 x 0.512 = 16.19 -> 16; t = 4: 8 + 16 x 0.216 = 11.46 -> 11; t = 5: 8 + 16 x 0.064 = 9.02 -> 9;
t = 6: 8.13 -> 8; t = 7 = T - tfinal: the final allocation, 8; steps 8-10 keep it.
"""

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file

from align.adapters import AdaLoraConfig, AdapterError, AdapterModel
from align.config.methods import DPOConfig, RewardConfig, SFTConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models import tiny_llama
from align.trainers.adalora_hook import STATE_FILE, AdaLoraHook
from align.trainers.checkpoint import latest_checkpoint
from align.trainers.dpo import build_dpo_trainer
from align.trainers.reward_model import build_reward_trainer, new_reward_head
from align.trainers.sft import build_sft_trainer

from .helpers import (
    PAD,
    assert_equal_tensors,
    build_trainer,
    loop_config,
    optim_config,
    preference_rows,
    sft_rows,
    snapshot,
)
from .rl_helpers import BUILDERS, MarkerReward, ToyTokenizer, prompt_rows, rl_config

SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 1, "target_modules": ["q_proj", "v_proj"]}
BUDGETS = [24, 24, 16, 11, 9, 8, 8, 8, 8, 8]  # kept triplets after steps 1..10 (module docstring)
TARGET_BUDGET = 2 * 4  # target_r x adapted layers


def adalora_model(name: str = "sft", seed: int = 0, **overrides) -> AdapterModel:
    """tiny_llama with one AdaLoRA adapter (PEFT's init: Λ = 0, so it starts as the base), seeded like
    ``helpers.lora_model``: two calls build identical models."""
    model = AdapterModel(tiny_llama(seed=seed))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_adapter(name, AdaLoraConfig(**{**SCHEDULE, **overrides}))
    return model


def sft_trainer(out_dir, model: AdapterModel | None = None, loop: dict | None = None, **adapter):
    """10 steps of 2 micro-batches of 2 rows, AdamW lr 1e-2 with warm-up and cosine decay, weight decay."""
    loop_cfg = loop_config(**{"max_steps": 10, "grad_accum_steps": 2, **(loop or {})})
    optim_cfg = optim_config(schedule="cosine", warmup_steps=2, weight_decay=0.01)
    model = model or adalora_model(**adapter)
    return build_sft_trainer(model, sft_rows(12), None, PAD, SFTConfig(), loop_cfg, optim_cfg, out_dir)


def masks(model: AdapterModel, name: str = "sft") -> dict[str, torch.Tensor | None]:
    return {path: layer.adapters[name].rank_mask for path, layer in model.layers_of(name).items()}


def by_hand_regulariser(model: AdapterModel, weight: float, name: str = "sft") -> float:
    """weight x mean over the 4 P and 4 Q matrices of ||P Pᵀ - I||_F and ||Qᵀ Q - I||_F, computed here."""
    norms = []
    for module in model.adapter_modules(name):
        p, q = module.lora_A.detach().double(), module.lora_B.detach().double()
        eye = torch.eye(p.shape[0], dtype=torch.float64)
        norms += [((p @ p.T - eye) ** 2).sum().sqrt().item(), ((q.T @ q - eye) ** 2).sum().sqrt().item()]
    assert len(norms) == 8
    return weight * sum(norms) / len(norms)


# ---------------------------------------------------------------------------------------------- allocation
def test_sft_prunes_to_the_scheduled_budget_and_saves_the_pattern(tmp_path):
    model = adalora_model()
    trainer = sft_trainer(tmp_path / "run", model)
    assert isinstance(trainer.adalora, AdaLoraHook) and trainer.adalora.names == ["sft"]
    assert model.configs["sft"].total_step == 10  # None -> the loop's max_steps
    kept = []
    for _ in range(10):
        kept.append(trainer.train_step()["adalora/rank"])
    assert kept == BUDGETS
    pattern = model.configs["sft"].rank_pattern
    assert len(pattern) == 4 and all(len(mask) == 6 for mask in pattern.values())
    per_layer = {path: int(mask.sum()) for path, mask in masks(model).items()}
    assert sum(per_layer.values()) == TARGET_BUDGET == 8
    assert per_layer == {path[: -len(".lora_E")]: sum(mask) for path, mask in pattern.items()}
    for module in model.adapter_modules("sft"):  # pruned triplets hold Λ = 0
        assert torch.all(module.lora_E[~module.rank_mask] == 0)

    model.save_adapter("sft", tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern and saved["total_step"] == 10
    assert sum(sum(mask) for mask in saved["rank_pattern"].values()) == 8
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for path, rank in per_layer.items():
        assert tensors[f"base_model.model.{path}.lora_A"].shape[0] == rank
        assert tensors[f"base_model.model.{path}.lora_E"].shape == (rank, 1)
    reloaded = AdapterModel(tiny_llama(seed=0))
    reloaded.load_adapter(tmp_path / "adapter", "b")
    assert sum(m.lora_A.shape[0] for m in reloaded.adapter_modules("b")) == 8


def test_fit_drives_the_allocator_and_logs_it(tmp_path):
    model = adalora_model()
    last = sft_trainer(tmp_path, model).fit()
    assert last["train/adalora/rank"] == 8
    assert sum(sum(mask) for mask in model.configs["sft"].rank_pattern.values()) == 8
    state = json.loads((latest_checkpoint(tmp_path / "checkpoints") / "state.json").read_text())
    assert state["adalora"]["step"] == 10
    assert state["adalora"]["adapters"]["sft"]["rank_pattern"] == model.configs["sft"].rank_pattern


def test_orthogonal_regulariser_is_in_the_loss(tmp_path):
    """Λ = 0 at init, so the task loss of step 1 is the base's whatever orth_reg_weight is; the reported losses
    differ by exactly the regulariser of the initial P and Q (P, Q ~ N(0, 0.02²) with r = 6: P Pᵀ and Qᵀ Q are
    near 0, so each norm is near ||I_6||_F = √6 = 2.449 and the term near 0.5 x 2.449 = 1.22; measured 1.2115)."""
    without = sft_trainer(tmp_path / "w0", orth_reg_weight=0.0)
    with_reg = sft_trainer(tmp_path / "w05", orth_reg_weight=0.5)
    expected = by_hand_regulariser(with_reg.modules[0], 0.5)
    assert expected == pytest.approx(0.5 * 6 ** 0.5, rel=0.02)
    first_without, first_with = without.train_step(), with_reg.train_step()
    assert first_without["nll"] == first_with["nll"]  # the same task loss
    assert first_without["adalora/orth_reg"] == 0.0
    assert first_with["adalora/orth_reg"] == pytest.approx(expected, rel=1e-5)
    assert first_with["loss"] - first_without["loss"] == pytest.approx(expected, rel=1e-5)
    # the term has a gradient: P moved differently in the two runs
    p_without = without.modules[0].adapter_modules("sft")[0].lora_A
    p_with = with_reg.modules[0].adapter_modules("sft")[0].lora_A
    assert not torch.equal(p_without, p_with)


# ------------------------------------------------------------------------------------------------- resume
class Killed(Exception):
    """Stands in for SIGKILL in the middle of a step."""


def run(out_dir, kill_at: int | None = None):
    """10 steps with checkpoints every 5 and adapter dropout 0.1 (so the RNG restore matters too); with
    ``kill_at``, die at the start of that step and resume on freshly built objects. Returns the trainer, the
    kept ranks after each step it took and the allocator's importance / uncertainty EMAs after each."""
    torch.manual_seed(0)
    trainer = sft_trainer(out_dir, loop={"save_every": 5}, lora_dropout=0.1)
    kept: list[float] = []
    emas: list[dict[str, torch.Tensor]] = []
    if kill_at is not None:
        step = trainer.train_step

        def dying():
            if trainer.step + 1 == kill_at:
                raise Killed
            return step()

        trainer.train_step = dying
        with pytest.raises(Killed):
            trainer.fit()
        assert latest_checkpoint(trainer.checkpoint_dir).name == "step-000005"
        torch.manual_seed(1234)  # a new process
        trainer = sft_trainer(out_dir, loop={"save_every": 5}, lora_dropout=0.1)
    step = trainer.train_step

    def recording():
        out = step()
        kept.append(out["adalora/rank"])
        emas.append(trainer.adalora.adapters[0].allocator.state_dict()[1])
        return out

    trainer.train_step = recording
    trainer.fit()
    return trainer, kept, emas


def test_resume_is_bit_identical_with_allocator_state(tmp_path):
    """Killed after step 5 (budget 9, masks set, importance EMAs mid-flight), resumed for steps 6-10: the
    adapter tensors, masks, rank pattern and optimizer state equal the straight run's bit for bit."""
    straight, straight_kept, straight_emas = run(tmp_path / "straight")
    resumed, resumed_kept, resumed_emas = run(tmp_path / "resumed", kill_at=6)
    assert straight_kept == BUDGETS and resumed_kept == BUDGETS[5:]
    assert len(straight_emas[5]) == 2 * 4 * 3  # step 6 updates the EMAs of P, Λ, Q in 4 layers (twice: I and U)
    assert_equal_tensors(resumed_emas[0], straight_emas[5])
    assert resumed_emas[1:] == straight_emas[6:] == [{}] * 4  # the final allocation (step 7) drops them
    assert (latest_checkpoint(tmp_path / "resumed" / "checkpoints").parent / "step-000005" / STATE_FILE).is_file()
    assert_equal_tensors(snapshot(resumed.params), snapshot(straight.params))
    straight_model, resumed_model = straight.modules[0], resumed.modules[0]
    assert resumed_model.configs["sft"] == straight_model.configs["sft"]  # rank_pattern included
    assert_equal_tensors(masks(resumed_model), masks(straight_model))
    state_a = straight.backend.optimizer.state_dict()["state"]
    state_b = resumed.backend.optimizer.state_dict()["state"]
    for index in state_a:
        assert_equal_tensors(state_a[index], state_b[index])
    assert resumed.adalora.step == straight.adalora.step == 10


def test_resume_restores_the_importance_scores(tmp_path, monkeypatch):
    """Control for the test above: the checkpoint at step 5 holds the EMAs, and a resume that restores the masks
    but drops the EMAs scores step 6 differently."""
    straight, _, straight_emas = run(tmp_path / "straight")
    saved = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000005" / STATE_FILE))
    assert len(saved) == 2 * 4 * 3  # importance and uncertainty of P, Λ, Q in each of the 4 layers
    assert all(key.startswith(("sft/importance/", "sft/uncertainty/")) for key in saved)
    original = AdaLoraHook.load

    def forgetful(self, directory, state):
        original(self, directory, state)
        for adapter in self.adapters:
            adapter.allocator.reset_importance()

    monkeypatch.setattr(AdaLoraHook, "load", forgetful)
    _, _, resumed_emas = run(tmp_path / "resumed", kill_at=6)
    assert resumed_emas[0].keys() == straight_emas[5].keys()
    assert all(not torch.equal(resumed_emas[0][k], straight_emas[5][k]) for k in resumed_emas[0])


# --------------------------------------------------------------------------------------- other trainers
def test_lora_run_builds_no_hook(tmp_path):
    trainer = build_trainer("sft", tmp_path, loop={"max_steps": 2, "save_every": 1})
    assert trainer.adalora is None
    out = trainer.train_step()
    assert not any(key.startswith("adalora/") for key in out)
    trainer.fit()
    checkpoint = latest_checkpoint(trainer.checkpoint_dir)
    assert not (checkpoint / STATE_FILE).exists()
    assert "adalora" not in json.loads((checkpoint / "state.json").read_text())


def test_reward_and_dpo_trainers_allocate_too(tmp_path):
    """The same schedule through the reward-model trainer (adapter + head) and DPO (a fresh AdaLoRA policy, the
    bare base as reference): both end at the target budget 8."""
    loop, optim = LoopConfig(max_steps=10, micro_batch_size=2, progress=False), OptimizerConfig(lr=1e-2)
    model = adalora_model("reward")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        head = new_reward_head(model)
    rm = build_reward_trainer(model, head, preference_rows(12, 0), None, PAD, RewardConfig(), loop, optim,
                              tmp_path / "rm")
    assert [rm.train_step()["adalora/rank"] for _ in range(10)] == BUDGETS

    model = AdapterModel(tiny_llama(seed=0))
    dpo = build_dpo_trainer(model, datasets.Dataset.from_list(preference_rows(12, 0)), None, PAD,
                            DPOConfig(reference=None), loop, optim, tmp_path / "dpo",
                            adapter_config=AdaLoraConfig(**SCHEDULE))
    assert dpo.adalora.names == ["policy"] and model.configs["policy"].total_step == 10
    assert [dpo.train_step()["adalora/rank"] for _ in range(10)] == BUDGETS


def test_a_pruned_adapter_copied_as_policy_keeps_its_ranks(tmp_path):
    """DPO after an AdaLoRA SFT run: the policy is a copy of the pruned SFT adapter (rank_pattern set, pruned
    triplets held at Λ = 0 in memory). It trains at those 8 ranks with the regulariser; nothing is re-allocated
    and the pruned triplets stay at zero."""
    model = adalora_model()
    sft_trainer(tmp_path / "sft", model).fit()
    pattern = model.configs["sft"].rank_pattern
    dpo = build_dpo_trainer(model, datasets.Dataset.from_list(preference_rows(12, 0)), None, PAD,
                            DPOConfig(), loop_config(max_steps=3), optim_config(), tmp_path / "dpo")
    assert dpo.adalora.names == ["policy"] and dpo.adalora.adapters[0].allocator is None
    before = {k: v.detach().clone() for k, v in dpo.params.items()}
    for _ in range(3):
        out = dpo.train_step()
        assert out["adalora/rank"] == 8 and out["adalora/orth_reg"] > 0
    assert model.configs["policy"].rank_pattern == pattern
    for module in model.adapter_modules("policy"):
        assert torch.all(module.lora_E[~module.rank_mask] == 0)
    assert any(not torch.equal(before[k], p) for k, p in dpo.params.items())  # it did train


# ------------------------------------------------------------------------------------------------- refusals
def test_deepspeed_is_refused_before_the_engine_is_built(tmp_path):
    with pytest.raises(ValueError, match="AdaLoRA rank allocation is not supported with DeepSpeed; use "
                                         "deepspeed=none"):
        sft_trainer(tmp_path, loop={"deepspeed": "configs/deepspeed/zero2.json"})


def test_schedule_that_does_not_fit_max_steps_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="no budgeting phase"):
        sft_trainer(tmp_path, loop={"max_steps": 5}, tinit=2, tfinal=3)  # 2 >= 5 - 3


# --------------------------------------------------------------------------------------------------- RL
def test_grpo_allocates_per_optimizer_step(tmp_path):
    """GRPO, 2 iterations of 4 prompts x 2 samples, 2 epochs of minibatches of 2: 2 x 2 x 4 = 16 optimizer steps,
    so total_step = 16; tinit = 2, tfinal = 4: the budget falls over steps 3..12 to 8 and stays there."""
    model = AdapterModel(tiny_llama(seed=0))
    cfg = rl_config("grpo", reference=None, reward_adapter=None)
    loop = LoopConfig(max_steps=2, progress=False)
    config = AdaLoraConfig(**{**SCHEDULE, "tfinal": 4})
    trainer = BUILDERS["grpo"](model, prompt_rows(12), ToyTokenizer(), cfg, loop, OptimizerConfig(lr=1e-2),
                               tmp_path, adapter_config=config, reward_fn=MarkerReward())
    assert model.configs["policy"].total_step == 16
    metrics = trainer.fit()
    assert trainer.adalora.step == 16
    assert metrics["adalora/orth_reg"] > 0
    assert sum(sum(mask) for mask in model.configs["policy"].rank_pattern.values()) == 8
    state = json.loads((latest_checkpoint(trainer.checkpoint_dir) / "state.json").read_text())
    assert state["adalora"]["step"] == 16


def grpo_trainer(out_dir, save_every: int = 0):
    model = AdapterModel(tiny_llama(seed=0))
    cfg = rl_config("grpo", reference=None, reward_adapter=None)
    loop = LoopConfig(max_steps=4, save_every=save_every, progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BUILDERS["grpo"](model, prompt_rows(12), ToyTokenizer(), cfg, loop, OptimizerConfig(lr=1e-2),
                                out_dir, adapter_config=AdaLoraConfig(**{**SCHEDULE, "tfinal": 4}),
                                reward_fn=MarkerReward())


def test_grpo_resume_is_bit_identical_with_allocator_state(tmp_path):
    """4 iterations (32 optimizer steps, budget falling over steps 3..28) straight == 2 iterations, a kill, and
    NEW objects resuming for 2 more: the kill point (step 16) is mid-schedule, with masks and EMAs set."""
    torch.manual_seed(0)
    straight = grpo_trainer(tmp_path / "straight", save_every=2)
    straight.fit()
    torch.manual_seed(0)
    first = grpo_trainer(tmp_path / "resumed", save_every=2)
    iteration = first.iteration

    def dying():
        if first.step == 2:
            raise Killed
        return iteration()

    first.iteration = dying
    with pytest.raises(Killed):
        first.fit()
    saved = json.loads((latest_checkpoint(first.checkpoint_dir) / "state.json").read_text())
    assert saved["adalora"]["step"] == 16 and saved["adalora"]["adapters"]["policy"]["rank_pattern"] is not None
    torch.manual_seed(1234)
    resumed = grpo_trainer(tmp_path / "resumed", save_every=2)
    resumed.fit()
    assert resumed.adalora.step == straight.adalora.step == 32
    assert_equal_tensors(snapshot(resumed.params), snapshot(straight.params))
    assert resumed.model.configs["policy"] == straight.model.configs["policy"]
    assert sum(sum(mask) for mask in straight.model.configs["policy"].rank_pattern.values()) == 8
