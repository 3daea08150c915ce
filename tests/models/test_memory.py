"""Memory per rank predicted from the config (align.models.memory): hand-computed numbers for a tiny Llama, the
predictions checked against real models (parameter bytes, bitsandbytes' stored state, the LoRA parameters the
adapter engine creates, the tensors autograd saves), and the ``--cfg job`` lines."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from align.adapters import AdapterModel, LoraConfig
from align.algos.logprobs import KEEP_LOGITS_BYTES as LOGPROBS_KEEP
from align.config.compose import compose_run_config
from align.config.embedded import EmbeddedBaseConfig
from align.config.trainer import OptimizerConfig
from align.data.synthetic import build_tokenizer
from align.models.embedded import _new_model
from align.models.forward import response_token_logps
from align.models.heads import ScalarHead
from align.models.loading import load_base
from align.models.memory import (
    KEEP_LOGITS_BYTES,
    ModelShape,
    Role,
    Setup,
    Workload,
    Zero,
    activation_parts,
    adapter_params,
    base_bytes,
    kv_cache_bytes,
    optimizer_state_bytes,
    param_bytes,
    predict,
    saved_tensor_bytes,
)
from align.models.memory_plan import (
    embedded_shape,
    predict_stage,
    read_deepspeed,
    stage_roles,
    stage_workload,
)
from align.models.quantize import quantize_linear_layers
from align.models.roles import Role as ModelRole
from align.models.tiny import tiny_gpt2, tiny_llama
from align.run import main
from align.trainers.optim import build_optimizer
from align.trainers.reward_model import sequence_rewards
from align.trainers.rl_common import sequence_values

# tiny_llama(): V=128, H=32, I=64, 2 layers, 4 heads, 2 kv heads, head_dim 8, lm_head not tied
TINY = ModelShape(vocab_size=128, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=4, num_kv_heads=2,
                  head_dim=8, tie_word_embeddings=False)
LORA8 = {"method": "lora", "r": 8, "target_modules": "all-linear"}


def _shape(model) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict())


def _zero(name: str) -> Zero:
    return Zero.from_json(name, read_deepspeed(f"{name}.json"))


# ------------------------------------------------------------------------------------------------ by hand
def test_tiny_llama_base_bytes_by_hand():
    """Parameters: embed 128x32 = 4096; per layer q 32x32 = 1024, k 32x16 = 512 (2 kv heads x 8), v 512, o 1024,
    gate 32x64 = 2048, up 2048, down 64x32 = 2048 (Linear: 9216) + two norms 2x32 = 64 -> 9280; x 2 layers = 18560;
    final norm 32; lm_head 4096. Total 26784 -> fp32 107136 B, bf16 53568 B.
    NF4 (blocksize 64, no double quantization): ceil(n/2) packed + 4 B per 64 values + 64 B code, per Linear:
    q 512 + 64 + 64 = 640, k 256 + 32 + 64 = 352, v 352, o 640, gate/up/down 1024 + 128 + 64 = 1216 each
    -> 5632 per layer, 11264 for both; the rest (embed 4096 + norms 160 + lm_head 4096 = 8352) in the compute
    dtype: 33408 B fp32 -> 44672 B; bf16 16704 B -> 27968 B.
    int8: n + 4 B per output row: q 1024 + 128 = 1152, k 512 + 64 = 576, v 576, o 1152, gate 2048 + 256 = 2304,
    up 2304, down 2048 + 128 = 2176 -> 10240 per layer, 20480 + 33408 = 53888 B."""
    assert sum(p.numel for p in TINY.params()) == 26784
    assert base_bytes(TINY, "none", "fp32") == 107136
    assert base_bytes(TINY, "none", "bf16") == 53568
    assert base_bytes(TINY, "nf4", "fp32") == 44672
    assert base_bytes(TINY, "nf4", "bf16") == 27968
    assert base_bytes(TINY, "int8", "fp32") == 53888
    # double quantization of q (1024 values, 16 blocks): 512 packed + 16 x 1 B absmax + 4 B (one fp32 absmax per
    # 256 blocks) + 256 x 4 B nested code + 4 B offset + 64 B code = 1624
    q = next(p for p in TINY.params() if p.path.endswith("q_proj"))
    assert param_bytes(q, "nf4", "fp32", double_quant=True) == 1624


def test_tiny_llama_lora_training_bytes_by_hand():
    """LoRA r=8 on the 7 projections (A r x in, B out x r; k/v out = 2 kv heads x 8 = 16): q 8 x (32 + 32) = 512,
    k 8 x (32 + 16) = 384, v 384, o 512, gate 8 x (32 + 64) = 768, up 768, down 768 -> 4096 per layer, 8192.
    Plain PyTorch: adapters and grads 4 B each = 32768 B, AdamW 2 fp32 moments 65536 B + a 4 B step for each of
    the 28 tensors (7 A and 7 B per layer) = 65648 B."""
    assert sum(p.numel for p in adapter_params(TINY, LORA8)) == 8192
    work = Workload(rows=1, seq_len=4, logit_positions=3)
    m = predict("sft", TINY, [Role("sft", LORA8, True)], work, Setup())
    assert (m.base, m.adapters, m.grads, m.optimizer, m.host) == (107136, 32768, 32768, 65648, 0)
    # a frozen reference adapter (DPO) doubles the adapters, not the grads or the optimizer
    m = predict("dpo", TINY, [Role("sft", LORA8, False), Role("policy", LORA8, True)], work, Setup())
    assert (m.adapters, m.grads, m.optimizer) == (65536, 32768, 65648)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_optimizer_state_bytes_equal_what_the_optimizer_holds(name):
    """64 x 128 and 4101 values take 8-bit states (>= 4096), 16 x 32 stays fp32 under adamw_8bit."""
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(4101)),
              torch.nn.Parameter(torch.randn(16, 32))]
    opt = build_optimizer(params, OptimizerConfig(name=name))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    held = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
            for p in params for v in opt.state[p].values() if torch.is_tensor(v)}
    assert optimizer_state_bytes([p.numel() for p in params], name) == sum(held.values())


def test_zero2_divides_by_ranks_and_offload_moves_the_optimizer_to_the_host():
    """P = 8192 trained values, 2 ranks -> 4096 each; reduce_bucket_size 'auto' = H^2 = 1024 values (4096 B, one
    bucket: overlap_comm is off in zero2.json). ZeRO-2: grads 4 x 4096 + 4096 = 20480, optimizer = fp32 master
    4 x 4096 + moments 8 x 4096 = 49152. Offload: the device keeps the bucket; the host gets master, moments, grad
    partition and staging copy, 20 x 4096 = 81920. The base and the adapters stay whole on every rank."""
    work, roles = Workload(1, 4, 3), [Role("sft", LORA8, True)]
    m = predict("sft", TINY, roles, work, Setup(ranks=2, zero=_zero("zero2")))
    assert (m.base, m.adapters, m.grads, m.optimizer, m.host) == (107136, 32768, 20480, 49152, 0)
    m = predict("sft", TINY, roles, work, Setup(ranks=2, zero=_zero("zero2_offload")))
    assert (m.base, m.adapters, m.grads, m.optimizer, m.host) == (107136, 32768, 4096, 0, 81920)
    one = predict("sft", TINY, roles, work, Setup(ranks=1, zero=_zero("zero2")))
    assert (one.grads, one.optimizer) == (4 * 8192 + 4096, 12 * 8192)


def test_zero3_splits_the_base_too():
    """Persistence threshold 'auto' = 10H = 320 values: the norms (32) and the output head (lm_head, kept whole by
    align) stay whole: 5 x 32 + 4096 = 4256 values = 17024 B. Split over 2 ranks: embed 4096 -> 2048, per layer
    q 512, k 256, v 256, o 512, gate/up/down 1024 each = 4608, x 2 = 9216 -> 11264 values = 45056 B. Working set
    with 2 ranks: layer 0 whole (9280 base + 4096 adapter values = 53504 B) + the prefetch bucket (int(0.9 x
    1024) = 921 values = 3684 B) -> 57188 B. Base 17024 + 45056 + 57188 = 119268 B.
    Adapter tensors under 320 values stay whole: per layer A of q/k/v/o/gate/up (8 x 32 = 256 each), B of q/o
    (256), k/v (128), down (256) = 2560; split: B of gate/up (512) and A of down (8 x 64 = 512) -> 768 per rank;
    x 2 layers: (5120 + 1536) x 4 B = 26624. Optimizer: moments 8 x 4096 (the fp32 partition is the master);
    grads 4 x 4096 + one bucket 4096 = 20480. Offload: the device keeps 17024 + 57188 = 74212 B of base and
    5120 x 4 = 20480 B of adapters; the host 45056 + 6144 + 16 x 4096 = 116736 B."""
    work, roles = Workload(1, 4, 3), [Role("sft", LORA8, True)]
    m = predict("sft", TINY, roles, work, Setup(ranks=2, zero=_zero("zero3")))
    assert (m.base, m.adapters, m.grads, m.optimizer, m.host) == (119268, 26624, 20480, 32768, 0)
    m = predict("sft", TINY, roles, work, Setup(ranks=2, zero=_zero("zero3_offload")))
    assert (m.base, m.adapters, m.grads, m.optimizer, m.host) == (74212, 20480, 4096, 0, 116736)


def test_kv_cache_and_rl_total_by_hand():
    """KV cache: 2 (k, v) x 2 layers x 2 kv heads x 8 x (6 + 10 tokens) x 4 rows x 4 B = 16384 B. An RL stage adds
    max(activations, KV cache): generation and the update do not overlap."""
    assert kv_cache_bytes(TINY, rows=4, tokens=16, dtype="fp32") == 16384
    work = Workload(rows=1, seq_len=2, logit_positions=1, generation_rows=4, generation_len=16)
    m = predict("grpo", TINY, [Role("sft", LORA8, False), Role("policy", LORA8, True)], work, Setup())
    assert m.kv_cache == 16384 and m.activations < m.kv_cache
    assert m.total == m.base + m.adapters + m.grads + m.optimizer + m.kv_cache


def test_logits_kept_only_up_to_the_logprob_limit():
    """N x V x 4 B of fp32 slice logits are kept for backward when they fit in 256 MiB (the log-prob path's own
    limit), else recomputed; two (N, chunk) fp32 temporaries either way. V = 128 here: 2 x N x 128 x 4 B."""
    assert KEEP_LOGITS_BYTES == LOGPROBS_KEEP
    shape = ModelShape(vocab_size=128, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=4,
                       num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    small = activation_parts(shape, adapter_params(shape, LORA8), Workload(1, 4, 3))["logits"]
    assert small == 3 * 128 * 4 + 2 * 3 * 128 * 4
    n = KEEP_LOGITS_BYTES // (128 * 4) + 1  # one position too many to keep
    big = activation_parts(shape, adapter_params(shape, LORA8), Workload(n, 1, n))["logits"]
    assert big == 2 * n * 128 * 4


# ------------------------------------------------------------------------------------------------ real models
def test_base_bytes_equal_the_parameters_of_the_real_tiny_models():
    for model in (tiny_llama(), tiny_gpt2()):
        real = sum(p.numel() * p.element_size() for p in model.parameters())
        assert base_bytes(_shape(model), "none", "fp32") == real
    tok = build_tokenizer()
    embedded = _new_model(EmbeddedBaseConfig(), tok)  # the embedded base's architecture (tied embeddings)
    assert embedded_shape(EmbeddedBaseConfig()).vocab_size == len(tok)
    assert base_bytes(embedded_shape(EmbeddedBaseConfig())) == sum(p.numel() * 4 for p in embedded.parameters())


def _stored_bytes(model) -> int:
    """What a base really holds: parameters (packed 4-bit / int8 weights included) and bitsandbytes' quantization
    state (absmax, codes, nested statistics, int8 row scales)."""
    def size(t):
        return t.numel() * t.element_size()

    total = 0
    for p in model.parameters():
        total += size(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += size(qs.absmax) + size(qs.code)
            if qs.nested:
                total += size(qs.offset) + size(qs.state2.absmax) + size(qs.state2.code)
        if getattr(p, "SCB", None) is not None:
            total += size(p.SCB)
    return total


@pytest.mark.parametrize(("quantization", "dtype"), [("nf4", "fp32"), ("nf4", "bf16"), ("int8", "fp32")])
def test_quantized_base_bytes_equal_what_bitsandbytes_stores(tmp_path, quantization, dtype):
    tok = build_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model, _ = load_base(tmp_path, quantization=quantization, dtype=torch_dtype)
    shape = ModelShape.from_config(json.loads((tmp_path / "config.json").read_text()))
    assert base_bytes(shape, quantization, dtype) == _stored_bytes(model)


def test_double_quantized_nf4_bytes_equal_what_bitsandbytes_stores():
    """``quantize_linear_layers`` keeps bitsandbytes' default (compress_statistics=True)."""
    model = quantize_linear_layers(tiny_llama(), "nf4")
    assert base_bytes(TINY, "nf4", "fp32", double_quant=True) == _stored_bytes(model)


@pytest.mark.parametrize("settings", [
    {"r": 8},
    {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 2, "target_modules": r".*\.1\.mlp\..*_proj"},
    {"method": "dora", "r": 4},
    {"r": 3, "target_modules": "all-linear", "exclude_modules": ["o_proj"]},
])
def test_lora_count_equals_what_the_adapter_engine_creates(settings):
    model = AdapterModel(tiny_llama())
    method = {k: v for k, v in settings.items() if k != "method"}
    model.add_adapter("a", LoraConfig(use_dora=settings.get("method") == "dora", **method))
    real = sum(p.numel() for _, p in model.named_adapter_parameters("a"))
    assert sum(p.numel for p in adapter_params(_shape(model.model), settings)) == real


def test_lora_count_on_gpt2_with_lora_only_biases():
    model = AdapterModel(tiny_gpt2())
    model.add_adapter("a", LoraConfig(r=4, target_modules=("c_attn", "c_proj", "c_fc"), bias="lora_only"))
    real = sum(p.numel() for _, p in model.named_adapter_parameters("a"))
    settings = {"r": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "bias": "lora_only"}
    assert sum(p.numel for p in adapter_params(_shape(model.model), settings)) == real


def _saved_bytes(model, params, forward) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``forward()`` (parameters excluded)."""
    with saved_tensor_bytes(params) as saved:
        forward()
    return saved["bytes"]


def _batch(padded: bool) -> dict:
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -1] = 0
    response = torch.ones_like(ids, dtype=torch.bool)
    response[:, :5] = False  # 2 x 11 response positions after the shift
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response}


@pytest.mark.parametrize(("base", "precision", "padded", "targets"), [
    ("fp32", "fp32", True, "all-linear"), ("fp32", "fp32", False, "all-linear"),
    ("bf16", "fp32", True, "all-linear"), ("fp32", "bf16", True, "all-linear"), ("nf4", "fp32", False, "all-linear"),
    ("fp32", "fp32", True, ["v_proj", "down_proj"]),
])
def test_activation_estimate_equals_what_autograd_saves(base, precision, padded, targets):
    """Against torch's saved-tensor hooks on a 3-layer Llama (H 64, 4 heads, 2 kv heads): to the byte, for an fp32,
    bf16 and NF4 base, bf16 autocast on an fp32 base (it keeps bf16 copies of the frozen weights), padded rows
    (the SDPA mask, k/v repeated to all heads) and unpadded (SDPA's own GQA)."""
    lm = tiny_llama(hidden_size=64, intermediate_size=128, num_layers=3)
    shape = _shape(lm)
    if base == "bf16":
        lm = lm.to(torch.bfloat16)
    if base == "nf4":
        lm = quantize_linear_layers(lm, "nf4")
    model = AdapterModel(lm)
    model.add_adapter("a", LoraConfig(r=8, target_modules=targets))
    model.train()
    batch = _batch(padded)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def forward():
        with autocast, model.use("a"):
            response_token_logps(model, batch)

    measured = _saved_bytes(model, model.parameters(), forward)
    work = Workload(rows=2, seq_len=16, logit_positions=22, padded=padded)
    settings = {"r": 8, "target_modules": targets}
    estimate = activation_parts(shape, adapter_params(shape, settings), work, "bf16" if base == "bf16" else "fp32",
                                precision, None, "nf4" if base == "nf4" else "none")
    assert estimate["saved"] == measured


@pytest.mark.parametrize("kind", ["value", "score"])
def test_head_roles_activations_equal_what_autograd_saves(kind):
    lm = tiny_llama(hidden_size=64, intermediate_size=128, num_layers=3)
    model = AdapterModel(lm)
    model.add_adapter("a", LoraConfig(r=8))
    model.train()
    head = ScalarHead(64, kind)
    batch = _batch(padded=True)

    def forward():
        if kind == "value":
            sequence_values(model, ModelRole("value", "a", "value", True), head, batch)
        else:
            sequence_rewards(model, head, batch, "a")

    measured = _saved_bytes(model, [*model.parameters(), *head.parameters()], forward)
    estimate = activation_parts(_shape(lm), adapter_params(_shape(lm), {"r": 8}), Workload(2, 16, 0), head=kind)
    assert estimate == {"saved": measured, "logits": 0}


# ------------------------------------------------------------------------------------------------ from the config
def test_stage_roles_follow_what_the_stages_load():
    cfg = compose_run_config(["pipeline=ppo"])
    roles = {r.name: r for r in stage_roles(cfg, "ppo")}
    # frozen: the sft reference and the reward model (its own r=32 LoRA + score head); trained: the policy (a copy
    # of sft) and the value model (a copy of the reward model, value_init=reward, with its value head)
    assert [(n, r.trainable, r.head, r.settings["r"]) for n, r in roles.items()] == [
        ("sft", False, None, 16), ("reward", False, "score", 32), ("policy", True, None, 16),
        ("value", True, "value", 32)]
    assert [(r.name, r.trainable) for r in stage_roles(cfg, "rm")] == [("reward", True)]
    dpo = compose_run_config([])
    assert [(r.name, r.trainable) for r in stage_roles(dpo, "dpo")] == [("sft", False), ("policy", True)]
    ranked = compose_run_config(["pipeline.stages=[base,sft,rm,dpo,eval]", "trainer.dpo.pair_reward=model"])
    assert [(r.name, r.trainable, r.head) for r in stage_roles(ranked, "dpo")] == [
        ("sft", False, None), ("reward", False, "score"), ("policy", True, None)]
    assert stage_workload(dpo, "dpo").rows == 2 * 16  # chosen and rejected of 16 pairs in one forward


def test_cfg_job_sft_line_by_hand(capsys):
    """The embedded base: V = 141, H = 128, I = 384, 4 layers, 4 heads, 2 kv heads (head_dim 32), tied.
    Base: embed 141 x 128 = 18048; per layer q 16384, k/v 128 x 64 = 8192 each, o 16384, gate/up/down 49152
    each, norms 256 -> 196864, x 4 = 787456; final norm 128; total 805632 x 4 B = 3222528 B (3.1 MiB).
    LoRA r=16: per layer q 16 x 256 = 4096, k/v 16 x 192 = 3072, o 4096, gate/up/down 16 x 512 = 8192
    -> 38912, x 4 = 155648 x 4 B = 622592 B (608 KiB) for the adapter and again for its grads; AdamW 1245184 B
    + a 4 B step for each of its 56 tensors = 1245408 B.
    Activations, 2 rows x 32 tokens (padded), per token: layer 0 (no gradient reaches its first norm) fp32
    (128 + 1 + 4 heads) x 4 = 532 B; attention 4 x 128 + MLP 3 x 384 = 1664 x 4 = 6656 B; adapter inputs
    (norm outputs 128 + 128, down's input 384) x 4 = 2560 B + A's outputs 7 x 16 x 4 = 448 B -> 10196 B; layers 1-3
    also keep their first norm's input: 10712 B each; + the final norm (129 x 4): 42848 B per token, x 64 tokens
    = 2742272 B. Rotary tables 2 x 32 x 32 x 4 = 8192; SDPA masks 4 layers x 2 x 32^2 x 4 = 32768; 62 response
    positions x (128 x 4 + 13) + 64 mask bytes = 32614; logits kept 62 x 141 x 4 = 34968 and two slices
    2 x 62 x 141 x 4 = 69936. Activations 2920750 B (2.8 MiB); total 8633870 B (8.2 MiB)."""
    overrides = ["pipeline=sft", "trainer.sft.micro_batch_size=2", "data.max_length=32", "data.max_prompt_length=16",
                 "adapter.r=16"]
    m = predict_stage(compose_run_config(overrides), "sft")
    assert (m.base, m.adapters, m.grads, m.optimizer, m.activations) == (3222528, 622592, 622592, 1245408, 2920750)
    assert main(["--cfg", "job", *overrides]) == 0
    out = capsys.readouterr().out
    assert ("#   memory sft (per rank, 1 rank, fp32 base, no DeepSpeed; trains sft): base 3.1 MiB + adapters 608 KiB "
            "+ grads 608 KiB + optimizer 1.2 MiB + activations ~2.8 MiB = ~8.2 MiB (host: 0 MiB offloaded)\n") in out


def test_cfg_job_prints_one_memory_line_per_training_stage(capsys):
    assert main(["--cfg", "job", "pipeline=ppo"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   memory ")]
    assert [line.split()[2] for line in lines] == ["sft", "rm", "ppo"]
    assert all(" = ~" in line and "MiB" in line for line in lines)
    assert "max(activations ~" in lines[2] and "KV cache" in lines[2]
    assert main(["--cfg", "job", "deepspeed=zero3_offload", "resources.num_workers=2"]) == 0
    dpo = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   memory dpo")]
    assert len(dpo) == 1 and "2 ranks" in dpo[0] and "DeepSpeed zero3_offload (ZeRO-3)" in dpo[0]
    assert "optimizer 0 MiB" in dpo[0] and "(host: 0 MiB offloaded)" not in dpo[0]


def test_cfg_job_says_when_the_shape_is_unknown(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    model = tmp_path / "model"
    model.mkdir()  # no config.json
    assert main(["--cfg", "job", "pipeline.stages=[base,sft]", f"model.path={model}", f"data.sft={data}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   memory ")]
    assert lines == [f"#   memory sft: not predicted (model.path={model} has no config.json: the model's shape is "
                     "unknown without loading it)"]


def test_cfg_job_says_when_the_adapter_method_has_no_rule(capsys):
    assert main(["--cfg", "job", "pipeline=sft", "adapter=ia3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   memory ")]
    assert lines == ["#   memory sft: not predicted (adapter method 'ia3' has no size rule here (lora, dora, rslora "
                     "have))"]


def test_the_smollm2_config_gives_its_published_size():
    """SmolLM2-135M: 134.5M parameters (docs/pipelines.md); the converted directory's config when it exists."""
    path = Path.home() / ".cache/align/models/SmolLM2-135M-Instruct/config.json"
    config = json.loads(path.read_text()) if path.is_file() else {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
        "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
    assert sum(p.numel for p in ModelShape.from_config(config).params()) == 134_515_008
