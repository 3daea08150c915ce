"""align.sweep: sweep files with arms (several pipelines on one reward-KL picture), trial expansion, the stages
computed once, and the results table. The sweep itself runs end to end in test_pipeline_e2e.py (slow)."""

from __future__ import annotations

import csv

import pytest

from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from align.sweep import SweepSpec, expand_trials, load_sweep, shared_plan, trial_overrides, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_frontier_sweep_has_one_arm_per_method_with_its_own_pipeline_and_keys(tmp_path):
    spec = load_sweep("frontier", {})
    trials = expand_trials(spec)
    assert [t.index for t in trials] == list(range(19))
    assert [t.arm.name for t in trials] == ["dpo"] * 3 + ["dpo_iterative"] * 4 + ["ppo"] * 3 + ["grpo"] * 3 + \
        ["rloo"] * 3 + ["dpo_kl_budget"] * 3
    assert spec.keys() == ["trainer.dpo.beta", "trainer.ppo.kl.target", "trainer.grpo.kl.coef",
                           "trainer.rloo.kl.coef", "trainer.dpo.kl_budget"]
    configs = [compose_run_config(trial_overrides(spec, [], t, tmp_path)) for t in trials]
    assert [c.pipeline.name for c in configs] == ["dpo"] * 7 + ["ppo"] * 3 + ["grpo"] * 3 + ["rloo"] * 3 + ["dpo"] * 3
    one_round, iterative = configs[1].trainer["dpo"], configs[4].trainer["dpo"]
    assert (one_round.extras.rounds, one_round.loop.max_steps, one_round.extras.pair_prompts) == (1, 400, 2000)
    assert (iterative.extras.rounds, iterative.loop.max_steps, iterative.extras.pair_prompts) == (4, 100, 500)
    assert one_round.method.beta == iterative.method.beta == 0.1
    assert one_round.extras.kl_budget is None and iterative.extras.kl_budget is None
    budgeted = configs[17].trainer["dpo"]
    assert (budgeted.extras.rounds, budgeted.loop.max_steps, budgeted.extras.kl_budget) == (4, 75, 2.0)
    assert [c.trainer["ppo"].method.kl.target for c in configs[7:10]] == [1.0, 4.0, 12.0]
    assert configs[11].trainer["grpo"].method.kl.coef == 0.2 and configs[15].trainer["rloo"].method.kl.coef == 0.2
    assert configs[0].run_dir == str(tmp_path / "trials" / "trial-000")
    # base and SFT once for all; the PPO arm's reward model once for its three trials
    assert shared_plan(trials, configs) == [("all", 0, ["base", "sft"]), ("ppo", 7, ["base", "sft", "rm"])]


def test_command_line_overrides_win_over_an_arms_own(tmp_path):
    spec = load_sweep("frontier", {})
    trial = expand_trials(spec)[3]  # dpo_iterative, beta 0.05
    cfg = compose_run_config(trial_overrides(spec, ["trainer.dpo.rounds=3"], trial, tmp_path))
    assert cfg.trainer["dpo"].extras.rounds == 3 and cfg.trainer["dpo"].method.beta == 0.05


def test_a_sweep_without_arms_is_one_arm_named_after_it():
    spec = load_sweep("dpo_beta", {})
    trials = expand_trials(spec)
    assert [t.values for t in trials] == [{"trainer.dpo.beta": b} for b in (0.05, 0.1, 0.2, 0.5)]
    assert {(t.arm.name, t.arm.pipeline) for t in trials} == {("dpo_beta", "dpo")}


@pytest.mark.parametrize("fields, key, detail", [
    ({"parameters": {"trainer.dpo.beta": [0.1]}, "arms": {"a": {"parameters": {"trainer.dpo.beta": [0.2]}}}},
     "sweep.parameters", "no top-level parameters when sweep.arms is set"),
    ({"arms": {"a": {"pipeline": "dpo"}}}, "sweep.arms.a", "a mapping with parameters"),
    ({"arms": {"a": {"parameters": {"trainer.dpo.beta": [0.1]}, "pipelne": "ppo"}}}, "sweep.arms.a.pipelne",
     "did you mean 'pipeline'"),
    ({"arms": {"a": {"parameters": {"trainer.dpo.beta": []}}}}, "sweep.arms.a.parameters.trainer.dpo.beta",
     "a non-empty list of values"),
    ({"arms": {"a": {"parameters": {"trainer.dpo.beta": [0.1]}, "overrides": "rounds=2"}}},
     "sweep.arms.a.overrides", "a list of key=value strings"),
])
def test_bad_arms_are_refused_with_their_key(fields, key, detail):
    with pytest.raises(ConfigError) as info:
        SweepSpec(name="bad", **fields)
    assert str(info.value).startswith(key) and detail in str(info.value)


def test_results_of_an_arm_sweep_name_the_best_trial_of_each_arm(tmp_path):
    spec = SweepSpec(name="two", metric="policy_score_mean", arms={
        "dpo": {"pipeline": "dpo", "parameters": {"trainer.dpo.beta": [0.1, 0.5]}},
        "grpo": {"pipeline": "grpo", "parameters": {"trainer.grpo.kl.coef": [0.05]}}})
    rows = [
        {"trial": "trial-000", "arm": "dpo", "trainer.dpo.beta": 0.1, "trainer.grpo.kl.coef": None,
         "win_rate": 0.7, "policy_score_mean": 0.30, "kl_to_reference": 1.5, "error": ""},
        {"trial": "trial-001", "arm": "dpo", "trainer.dpo.beta": 0.5, "trainer.grpo.kl.coef": None,
         "win_rate": 0.6, "policy_score_mean": 0.20, "kl_to_reference": 0.5, "error": ""},
        {"trial": "trial-002", "arm": "grpo", "trainer.dpo.beta": None, "trainer.grpo.kl.coef": 0.05,
         "win_rate": 0.8, "policy_score_mean": 0.60, "kl_to_reference": 9.0, "error": ""},
    ]
    write_results(spec, rows, tmp_path, log=lambda line: None)
    with (tmp_path / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["arm"] for r in table] == ["dpo", "dpo", "grpo"]
    assert table[2]["trainer.dpo.beta"] == "" and table[2]["trainer.grpo.kl.coef"] == "0.05"
    md = (tmp_path / "results.md").read_text()
    assert "Best trial (max policy_score_mean): **trial-002** (trainer.grpo.kl.coef=0.05; policy_score_mean 0.6)" in md
    assert "Best of arm dpo: **trial-000** (trainer.dpo.beta=0.1; policy_score_mean 0.3)" in md
    assert "Best of arm grpo: **trial-002**" in md
    assert (tmp_path / "frontier.png").read_bytes()[:8] == PNG_MAGIC
