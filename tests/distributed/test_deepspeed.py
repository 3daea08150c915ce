"""The DeepSpeed back-end in one process (a gloo group of one rank): the same steps as the plain PyTorch back-end,
checkpoints that resume exactly, shipped configs that resolve, and the errors that guard its preconditions.

The first test in a fresh environment JIT-compiles DeepSpeed's shared-memory communication op (about 50 s, cached
in $TORCH_EXTENSIONS_DIR afterwards)."""

import json
from pathlib import Path

import pytest
import torch

from align.adapters import LoraConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.distributed.ds_config import read_ds_config, resolve_ds_config
from align.trainers.backend import TorchBackend
from align.trainers.loop import TrainingDiverged

from .tiny_dpo import OPTIM, dpo_trainer, loop_config, run, sft_trainer, tiny_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
STEPS, MICRO_BATCH, ACCUM = 3, 2, 2


def assert_close_runs(got: list[dict], expected: list[dict]) -> None:
    for step, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"step {step}: {key}"


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """LoRA weights of magnitude ~0.5 after 3 steps: fp32 sums in another order differ by ~1e-6."""
    assert a.keys() == b.keys()
    difference = max((a[k].detach() - b[k].detach()).abs().max().item() for k in a)
    assert difference < atol, f"max |difference| {difference:.3g}"


def torch_run(build, tmp_path: Path):
    torch.manual_seed(0)
    trainer = build(tiny_model(), loop_config(STEPS, MICRO_BATCH, ACCUM), tmp_path / "torch")
    assert isinstance(trainer.backend, TorchBackend)
    return run(trainer), trainer.params


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs_resolve(name):
    loop = LoopConfig(micro_batch_size=4, grad_accum_steps=2)
    ds = resolve_ds_config(read_ds_config(CONFIGS / name), OPTIM, loop, world_size=2, hidden_size=32)
    assert "auto" not in json.dumps(ds)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert ds["gradient_clipping"] == OPTIM.max_grad_norm
    assert ds["optimizer"]["params"]["lr"] == OPTIM.lr
    assert ds["optimizer"]["params"]["betas"] == [OPTIM.beta1, OPTIM.beta2]
    assert ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is ("offload" not in name)  # offload: DeepSpeedCPUAdam
    assert ds["zero_optimization"]["reduce_bucket_size"] == 32 * 32


@pytest.mark.parametrize(("change", "message"), [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, "optimizer.params.lr=1.0 contradicts"),
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps=8 contradicts"),
    ({"bf16": {"enabled": True}}, "trainer.precision=bf16"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
    ({"optimizer": {"type": "Lamb"}}, "AdamW"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, "allgather_bucket_size"),
])
def test_config_contradictions_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        resolve_ds_config(change, OPTIM, LoopConfig(), world_size=1)


def test_8bit_adamw_is_refused():
    with pytest.raises(ValueError, match="adamw_8bit"):
        resolve_ds_config({}, OptimizerConfig(name="adamw_8bit"), LoopConfig(), world_size=1)


# --------------------------------------------------------------------------------- training, one rank
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_dpo_matches_torch_backend(config, tmp_path, single_rank):
    """3 DPO steps of 2 micro-batches: the same losses, gradient norms (DeepSpeed's, before clipping), learning
    rates and final LoRA weights as the plain back-end; under ZeRO-3 the weights live in shards outside a gather."""
    expected, expected_params = torch_run(dpo_trainer, tmp_path)
    torch.manual_seed(0)
    trainer = dpo_trainer(tiny_model(), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / config)),
                          tmp_path / "ds")
    assert type(trainer.backend).__name__ == "DeepSpeedBackend"
    assert_close_runs(run(trainer), expected)
    with trainer.backend.gathered():
        assert_same_weights(trainer.params, expected_params)


@pytest.mark.parametrize("config", ["zero2.json", "zero2_offload.json"])
def test_dpo_on_an_nf4_base_matches_torch_backend(config, tmp_path, single_rank):
    """QLoRA under DeepSpeed ZeRO-2: the frozen NF4 base stays as it is (replicated), the adapter trains as with
    the plain back-end."""
    torch.manual_seed(0)
    plain = dpo_trainer(tiny_model("nf4"), loop_config(STEPS, MICRO_BATCH, ACCUM), tmp_path / "torch")
    expected = run(plain)
    torch.manual_seed(0)
    trainer = dpo_trainer(tiny_model("nf4"), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / config)),
                          tmp_path / "ds")
    assert_close_runs(run(trainer), expected)
    assert_same_weights(trainer.params, plain.params)


def test_an_nf4_base_under_zero3_is_refused(tmp_path, single_rank):
    with pytest.raises(ValueError, match=r"a quantized base with DeepSpeed ZeRO-3: .*use ZeRO-2"):
        dpo_trainer(tiny_model("nf4"), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / "zero3.json")),
                    tmp_path / "ds")


def test_sft_matches_torch_backend(tmp_path, single_rank):
    expected, expected_params = torch_run(sft_trainer, tmp_path)
    torch.manual_seed(0)
    trainer = sft_trainer(tiny_model(), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / "zero2.json")),
                          tmp_path / "ds")
    assert_close_runs(run(trainer), expected)
    assert_same_weights(trainer.params, expected_params)


def test_checkpoint_resumes_exactly(tmp_path, single_rank):
    """Stop after step 2 with a checkpoint; a new model and engine resume with ``fit`` and end where 3 straight
    steps of the plain back-end end. The checkpoint holds DeepSpeed's shards, not the frozen base."""
    _, expected_params = torch_run(dpo_trainer, tmp_path)
    loop = loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / "zero2.json"))
    torch.manual_seed(0)
    first = dpo_trainer(tiny_model(), loop, tmp_path / "ds")
    run(first, stop_at=2)
    checkpoint = first.save()
    shards = list((checkpoint / "deepspeed").rglob("*.pt"))
    assert shards and sum(p.stat().st_size for p in shards) < 200_000  # the base has 40k params: not in there
    torch.manual_seed(1)
    second = dpo_trainer(tiny_model(), loop, tmp_path / "ds")
    second.fit()
    assert second.step == STEPS
    assert_same_weights(second.params, expected_params)


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss that the NaN guard can only catch through
    the gradient norm, which DeepSpeed computes."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_non_finite_gradient_norm_stops_without_update(config, tmp_path, single_rank):
    trainer = dpo_trainer(tiny_model(), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / config)), tmp_path)
    with trainer.backend.gathered():
        before = {k: v.detach().clone() for k, v in trainer.params.items()}
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda batch: (InfiniteGradient.apply(loss_fn(batch)[0]), {})
    with pytest.raises(TrainingDiverged, match="gradient norm is (inf|nan)"):
        trainer.train_step()
    with trainer.backend.gathered():
        assert all(torch.equal(trainer.params[k], before[k]) for k in before)  # DeepSpeed skipped the update


def test_adapters_created_after_the_engine_are_refused(tmp_path, single_rank):
    model = tiny_model()
    trainer = dpo_trainer(model, loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / "zero2.json")), tmp_path)
    model.add_adapter("value", LoraConfig(r=2))  # too late: DeepSpeed's optimizer does not hold it
    with pytest.raises(RuntimeError, match="changed after the DeepSpeed engine was built"):
        trainer.train_step()


def test_trainable_parameters_outside_the_trainer_are_refused(tmp_path, single_rank):
    model = tiny_model()
    model.add_adapter("other", LoraConfig(r=2))  # trainable, but the DPO trainer trains only the policy
    with pytest.raises(ValueError, match="require grad but are not trained"):
        dpo_trainer(model, loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / "zero2.json")), tmp_path)
