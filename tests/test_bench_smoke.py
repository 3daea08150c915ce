"""Smoke test of the measurements in ``scripts/bench_dpo.py`` on a tiny model: each one runs and returns the
expected keys with sane values. No timing is asserted (speed lives in the benchmark scripts, docs/benchmarks.md)."""

import math

import pytest

from scripts import bench_dpo  # light: each measurement imports what it needs (align, or trl and peft)
from scripts.bench_common import Comparison

SETTINGS = {"model": "tiny", "steps": 1, "warmup": 1, "batch": 2, "prompt_len": 8, "response_len": 8, "lr": 1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_measurements_run_the_same_setup(precompute):
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    ours = bench_dpo.dpo_ours(precompute=precompute, **SETTINGS)
    theirs = bench_dpo.dpo_trl(precompute=precompute, **SETTINGS)  # also checks TRL tokenized our exact ids
    for result in (ours, theirs):
        assert result["s_per_step"] > 0 and result["tokens_per_s"] > 0 and result["setup_s"] > 0
        assert result["tokens_per_step"] == 2 * (8 + 8 + 8)  # pairs x (prompt + chosen + rejected)
        assert math.isclose(result["first_loss"], math.log(2), abs_tol=1e-4)  # policy = reference at step 1
        assert (result["precompute_s"] is not None) == precompute
        assert result["precompute_s"] is None or result["precompute_s"] > 0
    assert ours["trainable_params"] == theirs["trainable_params"] > 0  # the same LoRA on both sides


@pytest.mark.slow
def test_sft_and_matmul_measurements_and_the_report():
    sft = bench_dpo.sft_ours(**SETTINGS)
    assert sft["s_per_step"] > 0 and sft["tokens_per_step"] == 2 * 2 * (8 + 8) and sft["trainable_params"] > 0
    bf16 = bench_dpo.sft_ours(**SETTINGS, precision="bf16")
    assert bf16["s_per_step"] > 0 and bf16["trainable_params"] == sft["trainable_params"]
    assert bench_dpo.dpo_ours(precompute=True, precision="bf16", **SETTINGS)["s_per_step"] > 0
    rm = bench_dpo.rm_ours(**SETTINGS)
    assert rm["s_per_step"] > 0 and rm["tokens_per_step"] == 2 * (8 + 8 + 8)
    assert rm["trainable_params"] == sft["trainable_params"]  # the same LoRA; the head is not counted
    assert math.isclose(rm["first_loss"], math.log(2), abs_tol=0.05)  # B = 0: chosen and rejected score alike
    peak = bench_dpo.matmul_peak(size=64, iters=2)
    assert peak["float32_gflops"] > 0 and peak["bfloat16_gflops"] > 0

    # the report formats medians, ratios and MFU from results shaped like the children's (made-up numbers)
    def run(s: float, rss: float, precompute: float | None) -> dict:
        return {"s_per_step": s, "tokens_per_s": 1536 / s, "peak_rss_mib": rss, "precompute_s": precompute,
                "trainable_params": 1000}

    results = {"dpo": {("5m", mode): Comparison([run(0.1, 800, 1.0)], [run(0.2, 1000, 2.0)])
                       for mode in bench_dpo.MODES},
               "sft": {"5m": [run(0.1, 700, None)]}, "rm": {"5m": [run(0.1, 700, None)]},
               "bf16": {"5m": {"SFT": [run(0.1, 700, None)]}}, "peaks": [{**peak, "float32_gflops": 100.0}], "minutes": 1.0}
    args = bench_dpo.parse(["--model", "5m"])
    text = bench_dpo.report(results, args, {**_machine(), "date": "2026-01-01"})
    assert "2.00 (met)" in text and "0.80 (met)" in text  # tokens/s ours/TRL, RSS ours/TRL
    assert "| 5m | RM |" in text and "| 5m | SFT |" in text and "| 5m | SFT, bf16 (of the bf16 peak) |" in text


def _machine() -> dict:
    return {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "cuda": None, "torch": "x"}


def test_step_flops_by_hand():
    """H=2, L=1, I=4, V=10, S=4, one sequence with 2 response positions, 3 LoRA weights:
    N_body = 4*4 + 3*2*4 = 40, N_head = 20, T_seq = 4, T_out = 2;
    F = 2*40*4 + 4*1*2*4*4 + 2*20*2 = 320 + 128 + 80 = 528; policy = 2*528 + 6*3*4 = 1128; + F = 1656.
    A reward model scores no tokens with the output head: F = 448, step = 2*448 + 72 = 968."""
    spec = bench_dpo.BenchModel("t", hidden=2, layers=1, heads=1, intermediate=4, vocab=10)
    assert bench_dpo.step_flops(spec, 3, sequences=1, seq_len=4, response_len=2, reference_forward=False) == 1128
    assert bench_dpo.step_flops(spec, 3, sequences=1, seq_len=4, response_len=2, reference_forward=True) == 1656
    assert bench_dpo.step_flops(spec, 3, sequences=1, seq_len=4, response_len=0, reference_forward=False) == 968
