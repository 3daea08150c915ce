"""pipelines.report: stage curves, the reward–KL frontier, report.md and the end-of-run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.report import (
    key_metrics,
    pareto_front,
    plot_frontier,
    plot_stage_curves,
    read_series,
    series_fronts,
    summary_lines,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULT = {
    "policy": "dpo", "reference": "sft", "reward": "ground truth", "prompts": 300,
    "policy_score_mean": 0.742, "reference_score_mean": 0.315,
    "policy_score_std": 0.121, "reference_score_std": 0.208,
    "win_rate": 0.668, "wins": 198, "ties": 5, "losses": 97,
    "kl_to_reference": 3.214, "policy_length": 41.5, "reference_length": 37.4,
    "examples": [
        {"prompt": "Write a haiku about rivers.", "policy": "Water finds its way, stones remember the current.",
         "reference": "Rivers are long.", "policy_score": 0.91, "reference_score": 0.2},
        {"prompt": "Name a prime.", "policy": "Seven is prime. " * 40, "reference": "Nine.",
         "policy_score": 0.8, "reference_score": 0.0},
        {"prompt": "Say hi.", "policy": "Hi! ```not a fence```", "reference": "hello",
         "policy_score": 0.5, "reference_score": 0.4},
        {"prompt": "Fourth prompt", "policy": "FOURTH-EXAMPLE-NOT-SHOWN", "reference": "x",
         "policy_score": 0.1, "reference_score": 0.1},
    ],
}


def _record(status: str, seconds: float | None, metrics: dict | None = None, reused_from: str | None = None) -> dict:
    return {"status": status, "config_hash": "abc123", "metrics": metrics or {}, "seconds": seconds,
            "started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:01:00", "artifacts": {},
            "reused_from": reused_from, "attempts": 1}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    stages = {
        "base": _record("done", 2.5, {"perplexity": 31.25}),
        "sft": _record("done", 12.5, {"eval/nll": 1.875, "train/loss": 1.9, "train/lr": 1e-4}),
        "dpo": _record("done", 47.0, {"eval/accuracy": 0.8125, "eval/margin": 2.5, "train/loss": 0.41},
                       reused_from="/runs/old"),
        "eval": _record("running", None),
    }
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"version": 1, "pipeline": "dpo", "updated": "now",
                                                   "stages": stages}))
    (run / "config.yaml").write_text("pipeline: dpo\n")
    _jsonl(run / "sft" / "metrics.jsonl",
           [{"step": s, "time": 0.1 * s, "train/loss": 3.0 - 0.1 * s, "train/lr": 1e-4} for s in range(1, 11)]
           + [{"step": 5, "time": 1.0, "eval/nll": 2.0}, {"step": 10, "time": 2.0, "eval/nll": 1.875}])
    _jsonl(run / "dpo" / "metrics.jsonl",
           [{"step": s, "time": s, "train/loss": 0.69 - 0.02 * s, "train/accuracy": 0.5 + 0.03 * s,
             "train/margin": 0.2 * s} for s in range(1, 11)]
           + [{"step": 10, "time": 10.0, "eval/accuracy": 0.8125, "eval/margin": 2.5}])
    (run / "eval").mkdir()
    (run / "eval" / "result.json").write_text(json.dumps(RESULT))
    return run


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_stage_curves_one_png_per_logged_stage(run_dir):
    paths = plot_stage_curves(run_dir)
    assert [p.name for p in paths] == ["sft.png", "dpo.png"]  # pipeline order; base and eval have no log
    assert all(p.parent == run_dir / "plots" and _is_png(p) for p in paths)
    assert not list((run_dir / "plots").glob(".*tmp"))


def test_read_series_keeps_finite_values_sorted_by_step(run_dir):
    series = read_series(run_dir / "sft" / "metrics.jsonl")
    assert series["eval/nll"] == [(5.0, 2.0), (10.0, 1.875)]
    assert len(series["train/loss"]) == 10 and series["train/loss"][0] == (1.0, pytest.approx(2.9))
    assert "time" not in series and "step" not in series


def test_read_series_skips_nan_bad_lines_and_missing_files(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": NaN, "kl": 0.5}\n'
                    "not json\n"
                    '{"step": 2, "train/loss": 1.5, "kl": Infinity, "note": "text", "flag": true}\n'
                    "\n"
                    '{"step": 3, "train/loss": 1.25')  # a line cut off mid-write
    assert read_series(path) == {"train/loss": [(2.0, 1.5)], "kl": [(1.0, 0.5)]}
    assert read_series(tmp_path / "missing.jsonl") == {}
    path.write_text("")
    assert read_series(path) == {}


def test_later_line_wins_when_a_step_is_logged_twice(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _jsonl(path, [{"step": 1, "kl": 1.0}, {"step": 2, "kl": 2.0}, {"step": 1, "kl": 0.5}])
    assert read_series(path) == {"kl": [(1.0, 0.5), (2.0, 2.0)]}


def test_broken_logs_do_not_crash(run_dir):
    (run_dir / "sft" / "metrics.jsonl").write_text("")  # empty: nothing to draw
    (run_dir / "dpo" / "metrics.jsonl").write_text('{"step": 1, "train/loss": NaN}\n{"step": 2, "train/loss": 0.5}\n')
    _jsonl(run_dir / "ppo" / "metrics.jsonl",  # not in the manifest, RL keys, one all-NaN metric
           [{"step": s, "reward/score_mean": 0.1 * s, "kl": 0.01 * s, "entropy": float("nan")} for s in range(5)])
    paths = plot_stage_curves(run_dir)
    assert [p.name for p in paths] == ["dpo.png", "ppo.png"]
    assert all(_is_png(p) for p in paths)
    report = write_report(run_dir).read_text()
    assert "plots/sft.png" not in report and "plots/dpo.png" in report


def test_write_report_contents(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# dpo run — ")
    assert not list(run_dir.glob(".report.md*"))

    # stages table: status, seconds and the key metrics for each stage, in pipeline order
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | " in line]
    by_stage = {row.split(" | ")[0][2:]: row for row in rows}
    assert by_stage["base"] == "| base | done | 2.5 | perplexity 31.25 |"
    assert by_stage["sft"] == "| sft | done | 12.5 | eval/nll 1.875, train/loss 1.9 |"  # train/lr is noise
    assert by_stage["dpo"] == ("| dpo | done (reused from `/runs/old`) | 47.0 | "
                               "eval/accuracy 0.8125, eval/margin 2.5, train/loss 0.41 |")
    assert by_stage["eval"] == "| eval | running | - | - |"
    assert text.index("| base |") < text.index("| sft |") < text.index("| dpo |") < text.index("| eval |")

    # evaluation
    assert "66.8%" in text and "(198 wins / 5 ties / 97 losses)" in text
    assert "| mean score | 0.742 ± 0.121 | 0.315 ± 0.208 |" in text
    assert "| mean length | 41.5 | 37.4 |" in text
    assert "3.214 nats per response" in text
    assert "`dpo` against `sft` on 300 prompts, scored by ground truth." in text

    # examples: the first three, long ones truncated, embedded backticks cannot close the block
    assert "POLICY (dpo, score 0.910): Water finds its way, stones remember the current." in text
    assert "REFERENCE (sft, score 0.200): Rivers are long." in text
    assert ("Seven is prime. " * 40).strip() not in text
    long_line = next(line for line in text.splitlines() if line.startswith("POLICY (dpo, score 0.800)"))
    assert long_line.endswith(" …") and len(long_line.split(": ", 1)[1]) <= 302
    assert "FOURTH-EXAMPLE-NOT-SHOWN" not in text
    assert "````text" in text  # the example with ``` gets a longer fence

    # plots, linked relative to the report
    assert "![sft](plots/sft.png)" in text and "![dpo](plots/dpo.png)" in text
    assert _is_png(run_dir / "plots" / "sft.png")
    assert "[config.yaml](config.yaml)" in text


def test_write_report_without_eval_or_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"pipeline": "ppo", "stages": {
        "base": _record("done", 1.0), "sft": _record("failed", 3.0) | {"error": "CUDA out of memory"}}}))
    text = write_report(run).read_text()
    assert "| sft | failed | 3.0 | - |" in text
    assert "**sft failed:** CUDA out of memory" in text
    assert "No evaluation result" in text and "Training curves" not in text
    assert summary_lines(run)[1] == "stages: base done 1.0s | sft failed 3.0s"


def test_summary_lines(run_dir):
    lines = summary_lines(run_dir)
    assert 3 <= len(lines) <= 6
    assert lines[0].startswith("dpo run ") and "(1m02s of stage time)" in lines[0]  # 2.5 + 12.5 + 47
    assert lines[1] == ("stages: base done 2.5s | sft done 12.5s | dpo done (reused from /runs/old) 47.0s | "
                        "eval running -")
    assert lines[2] == "eval: win-rate 66.8% (198/5/97 W/T/L) | score 0.742 vs 0.315 | KL 3.214 nats"
    write_report(run_dir)
    assert summary_lines(run_dir)[-1] == f"report: {run_dir / 'report.md'}"


def test_key_metrics_prefers_the_stage_s_informative_metrics():
    metrics = {"train/lr": 1e-5, "train/loss": 0.3, "kl": 0.25, "reward/score_mean": 1.5, "entropy": 2.0,
               "response_length": 30.0, "policy/clip_frac": 0.1, "time": 5.0}
    assert list(key_metrics("grpo", metrics)) == ["reward/score_mean", "kl", "entropy", "response_length"]
    assert list(key_metrics("rm", {"train/loss": 0.1, "eval/loss": 0.4, "eval/accuracy": 0.9})) == \
        ["eval/accuracy", "eval/loss", "train/loss"]
    assert key_metrics("base", {}) == {}


def test_plot_frontier(tmp_path):
    points = [{"label": "beta=0.1", "kl": 8.0, "reward": 0.9}, {"label": "beta=0.5", "kl": 2.0, "reward": 0.6},
              {"label": "beta=1.0", "kl": 3.0, "reward": 0.5}, {"label": "broken", "kl": math.nan, "reward": 1.0}]
    path = plot_frontier(points, tmp_path / "sweep" / "frontier.png")
    assert path == tmp_path / "sweep" / "frontier.png" and _is_png(path)
    assert [p["label"] for p in pareto_front(points[:3])] == ["beta=0.5", "beta=0.1"]  # beta=1.0 is dominated
    assert _is_png(plot_frontier([], tmp_path / "empty.png"))


def test_frontier_of_several_methods_has_one_front_per_series(tmp_path):
    points = [{"series": "dpo", "label": "beta=0.5", "kl": 0.5, "reward": 0.2},
              {"series": "dpo", "label": "beta=0.1", "kl": 1.0, "reward": 0.3},
              {"series": "dpo", "label": "beta=0.03", "kl": 2.0, "reward": 0.25},  # dominated within dpo
              {"series": "ppo", "label": "target=1", "kl": 1.2, "reward": 0.35},
              {"series": "ppo", "label": "target=4", "kl": 4.0, "reward": 0.5},
              {"series": "grpo", "label": "coef=0.05", "kl": math.inf, "reward": 0.9}]  # not drawn
    fronts = series_fronts(points)
    assert list(fronts) == ["dpo", "ppo"]
    assert [p["label"] for p in fronts["dpo"]] == ["beta=0.5", "beta=0.1"]
    assert [p["label"] for p in fronts["ppo"]] == ["target=1", "target=4"]
    # the front over all methods: ppo's target=1 beats dpo's beta=0.1 at a little more KL, not at less
    assert [p["label"] for p in pareto_front(points[:5])] == ["beta=0.5", "beta=0.1", "target=1", "target=4"]
    assert _is_png(plot_frontier(points, tmp_path / "methods.png"))
