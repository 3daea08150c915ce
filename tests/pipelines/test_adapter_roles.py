"""Every method of the ``adapter`` group as the adapter of each pipeline role, end to end on the tiny embedded
config in this process (``ray.enabled=false``):

- SFT and DPO policy (``pipeline=dpo adapter=<method>``): both adapters saved with the method's peft_type, the DPO
  adapter moved away from its SFT start, both reload onto the base and change its logits;
- reward model (``pipeline=rm`` with ``trainer.rm.adapter`` replaced by ``{method: <method>}``): adapter and score
  head saved, held-out accuracy reported, the reloaded pair scores sequences;
- PPO value (copied from a prompt-tuning reward adapter): per-token values read at the real tokens, the virtual
  ones cut off;
- the config errors around them (a merged ``trainer.rm.adapter`` mapping, AdaLoRA with DeepSpeed).

No method is refused for any role: prompt and prefix tuning hand the backbone's output back at the input's length,
so the score head's last token and the value head's per-token positions are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from align.config.run import adapter_config
from pipelines.runner import run_pipeline

from .tiny import TINY

RUN = [*TINY, "tracking.wandb=off", "ray.enabled=false"]
METHODS = ["lora", "dora", "rslora", "ia3", "prompt_tuning", "prefix_tuning", "adalora", "bottleneck"]
# peft_type in adapter_config.json, and the LoRA flags that tell LoRA, DoRA and rsLoRA apart
PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "rslora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING",
             "prefix_tuning": "PREFIX_TUNING", "adalora": "ADALORA", "bottleneck": "ALIGN_BOTTLENECK"}
LORA_FLAGS = {"lora": (False, False), "dora": (True, False), "rslora": (False, True)}


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run(name, *overrides) -> the run directory: each named pipeline runs once per module (the ZeRO-3 test
    compares with the plain DPO runs)."""
    done: dict[str, Path] = {}

    def run(name: str, *overrides: str) -> Path:
        if name not in done:
            run_dir = tmp_path_factory.mktemp(name)
            manifest = run_pipeline(compose_run_config([*RUN, f"run.dir={run_dir}", *overrides]), log=lambda _: None)
            assert all(rec["status"] == "done" for rec in manifest.stages.values()), manifest.stages
            done[name] = run_dir
        return done[name]

    return run


def rm_method(method: str) -> list[str]:
    """``trainer.rm.adapter`` replaced (not merged into the default LoRA spec) by ``{method: <method>}``."""
    return ["~trainer.rm.adapter", f"+trainer.rm.adapter={{method:{method}}}"]


def stage_metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"][stage]["metrics"]


def assert_saved_as(adapter_dir: Path, method: str) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE[method]
    if method in LORA_FLAGS:
        assert (config["use_dora"], config["use_rslora"]) == LORA_FLAGS[method]


def load_base(run_dir: Path):
    from align.adapters import AdapterModel
    from align.models.loading import load_base as load

    model_dir = json.loads((run_dir / "manifest.json").read_text())["stages"]["base"]["artifacts"]["model_dir"]
    base, tok = load(model_dir)
    return AdapterModel(base).eval(), tok


def token_batch(vocab_size: int, rows: int = 3, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (rows, length), generator=generator)


def logits(model, adapter: str | None, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model.use(adapter):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ------------------------------------------------------------------------------------------- SFT + DPO
@pytest.mark.parametrize("method", METHODS)
def test_sft_and_dpo_roles(method, runs):
    run_dir = runs(f"dpo-{method}", "pipeline=dpo", f"adapter={method}")
    sft_dir, dpo_dir = run_dir / "sft" / "adapter", run_dir / "dpo" / "adapter"
    assert_saved_as(sft_dir, method)
    assert_saved_as(dpo_dir, method)  # the policy is a copy of the SFT adapter, so the same method
    sft, dpo = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_dir, dpo_dir))
    assert sft.keys() == dpo.keys()
    assert any(sft[k].shape != dpo[k].shape or not torch.equal(sft[k], dpo[k]) for k in sft), "DPO did not train"
    assert (run_dir / "eval" / "result.json").is_file()

    model, _ = load_base(run_dir)
    model.load_adapter(sft_dir, "sft")
    model.load_adapter(dpo_dir, "policy")
    assert {type(model.configs[n]).peft_type for n in ("sft", "policy")} == {PEFT_TYPE[method]}
    ids = token_batch(model.config.vocab_size)
    base, with_sft, with_dpo = (logits(model, name, ids) for name in (None, "sft", "policy"))
    assert torch.isfinite(with_sft).all() and torch.isfinite(with_dpo).all()
    assert with_sft.shape == base.shape  # virtual tokens never reach the caller
    assert not torch.equal(with_sft, base)  # trained (every method, identity-initialised or not)
    assert not torch.equal(with_dpo, with_sft)


# ------------------------------------------------------------------------------------------- reward model
@pytest.mark.parametrize("method", METHODS)
def test_reward_model_role(method, runs):
    from align.models.heads import ScalarHead
    from align.trainers.reward_model import sequence_rewards

    run_dir = runs(f"rm-{method}", "pipeline=rm", *rm_method(method))
    rm_dir = run_dir / "rm" / "adapter"
    assert_saved_as(rm_dir, method)
    assert (rm_dir / "head.safetensors").is_file() and (rm_dir / "head.json").is_file()
    metrics = stage_metrics(run_dir, "rm")
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0

    model, _ = load_base(run_dir)
    model.load_adapter(rm_dir, "reward")
    head = ScalarHead.load(rm_dir)
    ids = token_batch(model.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # a shorter row: its score is read at its own last token
    with torch.no_grad():
        scores = sequence_rewards(model, head, {"input_ids": ids, "attention_mask": mask}, "reward")
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_rm_adapter_given_as_a_mapping_names_the_merge():
    """Hydra merges ``trainer.rm.adapter={method: ia3}`` into the default LoRA spec, so LoRA's ``r`` is left over:
    the error says so and how to replace the spec."""
    with pytest.raises(ConfigError) as info:
        compose_run_config(["pipeline=rm", "trainer.rm.adapter={method:ia3}"])
    assert info.value.key == "trainer.rm.adapter.r"
    assert "'~trainer.rm.adapter' '+trainer.rm.adapter={method: ia3}'" in str(info.value)


@pytest.mark.parametrize(("method", "flag"), [("dora", "use_dora"), ("rslora", "use_rslora")])
def test_dora_and_rslora_are_method_names(method, flag):
    cfg = compose_run_config(["pipeline=rm", *rm_method(method)])
    config = adapter_config(cfg.adapter_settings("rm"), "trainer.rm.adapter")
    assert type(config).peft_type == "LORA" and getattr(config, flag)


# ------------------------------------------------------------------------------------------- PPO value
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_ppo_value_role_copied_from_a_model_level_reward_adapter(method, runs):
    """value_init=reward: the value adapter is a copy of the prompt/prefix-tuning reward adapter. Its per-token
    values sit on the real tokens (prompt tuning: the same as the base run on [E; embed(x)] with the first P
    positions dropped)."""
    from align.models.heads import ScalarHead
    from align.models.roles import Role
    from align.trainers.rl_common import sequence_values

    run_dir = runs(f"ppo-{method}", "pipeline=ppo", f"adapter={method}", *rm_method(method))
    value_dir = run_dir / "ppo" / "value"
    for adapter_dir in (run_dir / "rm" / "adapter", run_dir / "ppo" / "adapter", value_dir):
        assert_saved_as(adapter_dir, method)
    assert json.loads((value_dir / "head.json").read_text())["kind"] == "value"

    model, _ = load_base(run_dir)
    model.load_adapter(value_dir, "value")
    head = ScalarHead.load(value_dir)
    ids = token_batch(model.config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        values = sequence_values(model, Role("value", "value", "value", False), head, batch)
        assert values.shape == (3, ids.shape[1] - 1) and torch.isfinite(values).all()
        prefix = sequence_values(model, Role("value", "value", "value", False), head,
                                 {k: v[:, :6] for k, v in batch.items()})
        torch.testing.assert_close(prefix, values[:, :5], rtol=1e-5, atol=1e-5)  # causal, position by position
        if method == "prompt_tuning":
            prompts = model.model_adapter("value").embedding.weight  # (P, H)
            backbone = model.model.base_model
            embeds = torch.cat([prompts[None].expand(3, -1, -1), backbone.get_input_embeddings()(ids)], dim=1)
            with model.disabled():
                hidden = backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, prompts.shape[0]:]
            torch.testing.assert_close(values, head(hidden)[:, :-1].float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- DeepSpeed
def test_adalora_with_deepspeed_is_refused_up_front():
    with pytest.raises(ConfigError) as info:
        compose_run_config(["adapter=adalora", "deepspeed=zero2"])
    assert info.value.key == "adapter.method" and "'sft' stage would train an AdaLoRA adapter" in str(info.value)
    with pytest.raises(ConfigError) as info:  # the reward model's own spec
        compose_run_config(["pipeline=rm", *rm_method("adalora"), "deepspeed=zero3"])
    assert info.value.key == "trainer.rm.adapter.method"
    compose_run_config(["pipeline=rm", "adapter=adalora", "deepspeed=zero2"])  # rm keeps its LoRA: fine
    with pytest.raises(ConfigError) as info:  # the RL stages train through DeepSpeed too
        compose_run_config(["pipeline=grpo", "adapter=adalora", "deepspeed=zero3", "pipeline.stages=[base,grpo]",
                            "trainer.grpo.reward=ground_truth"])
    assert info.value.key == "adapter.method" and "'grpo' stage would train an AdaLoRA adapter" in str(info.value)
    compose_run_config(["pipeline=grpo", "adapter=adalora", "pipeline.stages=[base,grpo]",  # without DeepSpeed: fine
                        "trainer.grpo.reward=ground_truth"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_model_level_adapters_under_zero3_on_one_rank(method, runs):
    """ZeRO-3 on one rank partitions the adapter's weights too: the prompt/prefix is read through its embedding's
    forward (where ZeRO-3 gathers it) and the stage saves through the gathering path, so the adapters equal those
    of the plain PyTorch run."""
    plain = runs(f"dpo-{method}", "pipeline=dpo", f"adapter={method}")
    zero3 = runs(f"dpo-{method}-zero3", "pipeline=dpo", f"adapter={method}", "deepspeed=zero3")
    for stage in ("sft", "dpo"):
        a, b = (load_file(str(d / stage / "adapter" / "adapter_model.safetensors")) for d in (plain, zero3))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
