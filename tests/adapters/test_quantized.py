"""Adapters on bitsandbytes 4-bit (NF4) and 8-bit bases: training, the CPU repack trap, merging, parameter counts.

The trap (see /work/shared/STACK.md): on CPUs with AVX-512 bf16, a ``Linear4bit`` called in eval mode on an input
that does not require grad repacks its weight for an inference kernel without autograd; every later call, training
included, silently drops the gradient. ``AdapterModel`` switches the repack off and undoes one that already
happened (``base_layers.unpack_4bit``).

The repack reshapes the block scales to (out, in / 64) and tiles outputs by 32, so it needs in_features % 64 == 0
and out_features % 32 == 0: the default tiny Llama (hidden 32) cannot repack, hence ``REPACKABLE`` sizes below.
"""

import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16  # noqa: E402

from align.adapters import AdapterError, AdapterModel, LoraConfig, parameter_report  # noqa: E402
from align.adapters import base_layers as bl  # noqa: E402
from align.models import quantize_linear_layers, tiny_llama  # noqa: E402

AVX512BF16 = bool(has_avx512bf16())
REPACKABLE = {"hidden_size": 64, "intermediate_size": 128}  # q/o 64x64, k/v 64->32, MLP 64<->128: all repackable


# ------------------------------------------------------------------------------------------------------ helpers
def quantized_llama(mode: str, **sizes) -> LlamaForCausalLM:
    return quantize_linear_layers(tiny_llama(**sizes), mode)


def with_adapter(base: nn.Module, config: LoraConfig, seed: int = 0) -> AdapterModel:
    """Wrap ``base`` and add active adapter 'a'; the seed fixes the adapter's initial weights."""
    model = AdapterModel(base)
    torch.manual_seed(seed)
    model.add_adapter("a", config)
    model.set_active("a")
    return model


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss


def adapter_grads(model: AdapterModel, input_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """One training-mode backward of the LM loss; the adapter's gradients by name."""
    model.train()
    model.zero_grad()
    lm_loss(model, input_ids).backward()
    return {name: p.grad for name, p in model.named_adapter_parameters("a")}


def quantized_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every quantized layer's stored weight and its scales, keyed by path (wrappers looked through)."""
    state = {}
    for path, m in model.named_modules():
        if bl.is_4bit(m):
            scales = m.weight.quant_state.absmax
        elif bl.is_8bit(m):
            scales = m.state.SCB if m.state.SCB is not None else m.weight.SCB
        else:
            continue
        state[path.removesuffix(".base_layer")] = (m.weight.data.clone(), scales.clone())
    return state


def is_repacked(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def repacked_paths(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if bl.is_4bit(m) and is_repacked(m)]


def raw_linear4bit(d_in: int = 64, d_out: int = 64) -> nn.Module:
    """A bare bitsandbytes NF4 layer, every setting as bitsandbytes chose it."""
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(3))
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer)
    return layer.to("cpu")


def input_grad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    layer.train()
    x.grad = None
    with warnings.catch_warnings():  # a repacked layer warns that its kernel has no autograd: that is the point
        warnings.simplefilter("ignore")
        layer(x).sum().backward()
    return x.grad


def eval_no_grad_pass(module: nn.Module, x: torch.Tensor) -> None:
    module.eval()
    with torch.no_grad():
        module(x)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("train", [True, False])
def test_lora_backward_on_quantized_base_in_train_and_eval_mode(mode, train, input_ids):
    """RL trainers put the model in eval mode and still train; in eval mode bitsandbytes' int8 layer returns a
    view made inside its autograd Function, which must not be changed in place. Gradients reach both LoRA
    matrices of every adapted layer (B is nudged off zero so A gets a gradient too)."""
    model = with_adapter(quantized_llama(mode), LoraConfig(r=4, init_lora_weights=False))
    model.train(train)
    lm_loss(model, input_ids).backward()
    grads = [p.grad for p in model.adapter_parameters("a")]
    assert len(grads) == 28 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------- 1. training
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_lora_trains_on_quantized_base_and_leaves_it_untouched(mode, input_ids):
    """20 AdamW steps (lr 1e-2) on one batch, labels = inputs. Measured: nf4 4.858 -> 4.27, int8 4.862 -> 4.27
    (a dense base gives the same 4.27); we ask for a drop of at least 0.4 nats."""
    base = quantized_llama(mode)
    stored = quantized_state(base)
    assert len(stored) == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays dense
    model = with_adapter(base, LoraConfig(r=8))
    model.train()
    optimizer = torch.optim.AdamW(model.adapter_parameters("a"), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = lm_loss(model, input_ids)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = lm_loss(model, input_ids).item()

    assert losses[0] == pytest.approx(4.86, abs=0.01)  # ~ln(128) = 4.852: a random tiny model is near uniform
    assert final < losses[0] - 0.4
    after = quantized_state(base)  # wrapped in place
    assert after.keys() == stored.keys()
    for path, (weight, scales) in stored.items():
        assert torch.equal(after[path][0], weight), path
        assert torch.equal(after[path][1], scales), path
    adapter_ids = {id(p) for p in model.adapter_parameters("a")}
    assert all(p.grad is None and not p.requires_grad for p in model.parameters() if id(p) not in adapter_ids)


def test_quantizing_keeps_eval_mode_and_unrepackable_layers_off_the_inference_kernel(input_ids):
    """tiny_llama() is in eval mode; the bitsandbytes layers replacing its Linears must be too (a fresh module
    starts in train mode, and bitsandbytes computes differently in each). Layers reading the hidden size 32 cannot
    be repacked (in_features < 64): an eval no-grad pass on the bare quantized base must run them on the plain path
    instead of crashing in the repack. down_proj (64 -> 32) fits and keeps bitsandbytes' own setting, as a model
    loaded through transformers would."""
    base = quantize_linear_layers(tiny_llama(), "nf4")
    assert not any(m.training for m in base.modules())
    flags = {path.rsplit(".", 1)[-1]: bool(m.support_avx512bf16_for_cpu)
             for path, m in base.named_modules() if bl.is_4bit(m)}
    assert flags == {"q_proj": False, "k_proj": False, "v_proj": False, "o_proj": False, "gate_proj": False,
                     "up_proj": False, "down_proj": AVX512BF16}
    with torch.no_grad():
        base.train()  # the plain path: never repacks
        plain_logits = base(input_ids).logits
        base.eval()
        logits = base(input_ids).logits
    expected = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"] if AVX512BF16 else []
    assert repacked_paths(base) == expected
    # Only down_proj's bf16 inference kernel differs from the plain path: measured 1.0e-4 at logits of size 0.37.
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------------- 2. the trap
@pytest.mark.parametrize("rollout", ["forward", "generate"])
def test_adapter_gradients_survive_an_eval_no_grad_rollout(rollout, input_ids):
    """Adapters only on q_proj/v_proj, so gradients must also cross unadapted 4-bit layers (o_proj, MLP).
    The gradients after a no-grad eval pass are bit-identical to a fresh model's (measured max diff 0.0)."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: A gets grads
    model = with_adapter(quantized_llama("nf4", **REPACKABLE), config)
    model.eval()
    with torch.no_grad():
        if rollout == "generate":
            out = model.generate(input_ids, max_new_tokens=4, do_sample=False)
            assert out.shape == (2, 16)
        else:
            model(input_ids)
    assert repacked_paths(model) == []

    grads = adapter_grads(model, input_ids)
    expected = adapter_grads(with_adapter(quantized_llama("nf4", **REPACKABLE), config), input_ids)
    assert len(grads) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0)


@pytest.mark.skipif(not AVX512BF16, reason="bitsandbytes repacks 4-bit weights for its inference kernel only on CPUs "
                    "with AVX-512 bf16; this CPU lacks it, so the trap cannot happen here")
def test_raw_linear4bit_loses_the_input_gradient_after_an_eval_no_grad_pass():
    """The trap itself, on a bare bitsandbytes layer with bitsandbytes' settings; unpack_4bit gets it back."""
    layer = raw_linear4bit()
    assert layer.support_avx512bf16_for_cpu  # set by bitsandbytes from the CPU's features
    x = torch.randn(3, 64, requires_grad=True)
    expected = input_grad(layer, x).clone()

    eval_no_grad_pass(layer, torch.randn(3, 64))
    assert is_repacked(layer)
    assert input_grad(layer, x) is None  # silently lost

    bl.unpack_4bit(layer)
    assert not is_repacked(layer)
    restored = input_grad(layer, x)
    # The repack rounds the block scales through bf16 and the inverse re-quantizes them: not bit-exact.
    # Measured relative error 8e-4; bf16 alone allows 2^-9 = 2e-3 per scale.
    assert (restored - expected).norm() / expected.norm() < 1e-2


def test_raw_linear4bit_without_the_repack_keeps_the_input_gradient():
    """What bitsandbytes does on CPUs without AVX-512 bf16, and what our guard sets: gradients survive."""
    layer = raw_linear4bit()
    layer.support_avx512bf16_for_cpu = False
    x = torch.randn(3, 64, requires_grad=True)
    expected = input_grad(layer, x).clone()
    eval_no_grad_pass(layer, torch.randn(3, 64))
    assert not is_repacked(layer)
    torch.testing.assert_close(input_grad(layer, x), expected, rtol=0, atol=0)


def test_wrapping_an_already_repacked_base_restores_its_gradients(input_ids):
    """The rollout happened before AdapterModel existed. Wrapping unpacks every 4-bit layer: the 4-bit codes come
    back exactly, the scales within bf16 rounding (see above), so gradients match a never-repacked model to ~0.3%
    (measured max relative error per tensor 2.9e-3)."""
    base = quantized_llama("nf4", **REPACKABLE)
    codes = {path: weight for path, (weight, _) in quantized_state(base).items()}
    if AVX512BF16:
        eval_no_grad_pass(base, input_ids)
    else:  # no AVX-512 bf16: no repack by itself; do what it would have done
        for m in base.modules():
            if bl.is_4bit(m):
                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    assert len(repacked_paths(base)) == 14

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = with_adapter(base, config)
    assert repacked_paths(model) == []
    assert all(torch.equal(weight, codes[path]) for path, (weight, _) in quantized_state(base).items())

    grads = adapter_grads(model, input_ids)
    expected = adapter_grads(with_adapter(quantized_llama("nf4", **REPACKABLE), config), input_ids)
    assert len(grads) == 2 * 2 * 2
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert (grad - expected[name]).norm() / expected[name].norm() < 1e-2, name


# ------------------------------------------------------------------------------------------------- 3. merging
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_merge_onto_quantized_base_needs_dequantize(mode, input_ids):
    """Logits are compared in training mode (no dropout anywhere, so deterministic): there bitsandbytes multiplies by
    the dequantized weight, the very numbers merge writes. (In eval mode the int8 path also quantizes activations,
    1.3e-3 away.) Measured: merged vs adapter 3.3e-7, unmerged vs quantized base 1.5e-7, at logits of size 0.44
    moved 0.53 by the adapter; fp32 summation order explains 1e-7, so atol 1e-5 leaves a 30x margin."""
    model = with_adapter(quantized_llama(mode), LoraConfig(r=4, init_lora_weights=False))
    model.train()
    with torch.no_grad():
        adapter_logits = model(input_ids).logits
        with model.disabled():
            base_logits = model(input_ids).logits
        assert (adapter_logits - base_logits).abs().max() > 0.1  # the adapter matters

        with pytest.raises(AdapterError, match="dequantize"):
            model.merge("a")
        assert model.merged_adapter is None
        assert all(bl.is_quantized(layer.base_layer) for layer in model.layers_of("a").values())

        model.merge("a", dequantize=True)
        assert {type(layer.base_layer) for layer in model.layers_of("a").values()} == {nn.Linear}
        assert not any(p.requires_grad for layer in model.layers_of("a").values()
                       for p in layer.base_layer.parameters())
        torch.testing.assert_close(model(input_ids).logits, adapter_logits, rtol=0, atol=1e-5)

        model.unmerge()
        with model.disabled():
            torch.testing.assert_close(model(input_ids).logits, base_logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- 4, 5. counting
def test_parameter_report_counts_a_7b_llama_like_peft():
    """Llama-2-7B shapes on the meta device (no memory). Base: embeddings + untied head 2 x 32000 x 4096 =
    262,144,000; per layer 4 x 4096^2 (attention) + 3 x 4096 x 11008 (MLP) + 2 x 4096 (norms) = 202,383,360,
    x 32 = 6,476,267,520; final norm 4,096: 6,738,415,616. LoRA r=8 on q, v: 32 x 2 x 8 x (4096 + 4096) =
    4,194,304. All 6,742,609,920; 4,194,304 / 6,742,609,920 = 0.0622%, PEFT's figure for this set-up."""
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = AdapterModel(base)
    model.add_adapter("a", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    report = model.parameter_report()
    assert (report.trainable, report.total) == (4_194_304, 6_742_609_920)
    assert str(report) == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_parameter_report_counts_quantized_weights_logically(mode):
    """Tiny Llama (vocab 128, hidden 32, MLP 64, 2 layers, 4 heads / 2 kv heads of 8): per layer q, o 32x32 = 1,024
    each, k, v 32x16 = 512 each, MLP 3 x 32 x 64 = 6,144, norms 64: 9,280; x 2 = 18,560; embeddings + untied head
    2 x 128 x 32 = 8,192; final norm 32. Total 26,784, whatever the storage (NF4 packs two weights per byte).
    LoRA r=4 on all 7 linears per layer: 4 x [(32+32) x 2 + (32+16) x 2 + (32+64) x 3] = 2,048 per layer, 4,096."""
    base = quantized_llama(mode)
    assert parameter_report(base).total == parameter_report(tiny_llama()).total == 26_784
    stored = sum(p.numel() for p in base.parameters())
    assert stored == (26_784 - 18_432 // 2 if mode == "nf4" else 26_784)  # NF4 storage: half of the 18,432 weights

    model = with_adapter(base, LoraConfig(r=4))
    report = model.parameter_report()
    assert (report.trainable, report.total) == (4_096, 30_880)
    dense = with_adapter(tiny_llama(), LoraConfig(r=4)).parameter_report()
    assert (dense.trainable, dense.total) == (report.trainable, report.total)
