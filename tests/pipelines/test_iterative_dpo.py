"""Iterative (online) DPO, ``trainer.dpo.rounds=2``, on the tiny embedded base in this process: each round samples
its pairs from the policy the previous round left (with its own seed and prompts), trains it further against the
reference ``round_reference`` names, and a run broken in round 2 and rerun skips round 1 and ends with the adapter
of a run that never stopped. Spies record what ``sample_preference_pairs`` and ``build_dpo_trainer`` were given
(adapter names and their weights at that moment); weights are compared with the adapters the rounds saved.

The adapters have dropout (``adapter.lora_dropout=0.1``) so that training draws from the global RNG: a rerun that
did not give round 2 the RNG an uninterrupted run gives it would end with other weights."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.adapters.peft_format import PREFIX, WEIGHTS_FILE
from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from align.config.run import stage_config
from pipelines.manifest import Manifest
from pipelines.runner import StageFailed, run_pipeline

from .tiny import TINY as TINY_OVERRIDES

TINY = [*TINY_OVERRIDES, "tracking.wandb=off", "ray.enabled=false", "adapter.lora_dropout=0.1"]
ROUNDS = ["pipeline.stages=[base,sft,dpo]", "trainer.dpo.rounds=2", "trainer.dpo.pair_prompts=16",
          "trainer.dpo.max_steps=4", "trainer.dpo.save_every=2", "trainer.dpo.kl_budget=null"]


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


def _run(run_dir: Path, *overrides: str) -> Manifest:
    return run_pipeline(compose_run_config([*TINY, f"run.dir={run_dir}", *overrides]), log=lambda _: None)


@dataclass
class Calls:
    samples: list[dict] = field(default_factory=list)  # sample_preference_pairs: adapter, its weights, prompts, seed
    trainers: list[dict] = field(default_factory=list)  # build_dpo_trainer: round, reference and policy weights
    resumed: list[tuple[str, bool, int]] = field(default_factory=list)  # Trainer.resume: round, resumed, step


def _weights(model, name: str | None) -> dict[str, torch.Tensor] | None:
    """An adapter's tensors under the keys its saved file uses; None for the bare base or a missing adapter."""
    if name is None or name not in model.adapter_names:
        return None
    return {PREFIX + k: v.detach().clone() for k, v in model.adapter_state_dict(name).items()}


def saved(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / WEIGHTS_FILE))


def same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> bool:
    return a is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def spying():
    import align.trainers.dpo as dpo_module
    import reward.pairs as pairs_module
    from align.trainers.loop import Trainer

    calls = Calls()
    real_sample, real_build, real_resume = (pairs_module.sample_preference_pairs, dpo_module.build_dpo_trainer,
                                            Trainer.resume)

    def sample(model, adapter, tok, prompts, reward_fn, **kwargs):
        calls.samples.append({"adapter": adapter, "weights": _weights(model, adapter), "prompts": list(prompts),
                              "seed": kwargs["seed"]})
        return real_sample(model, adapter, tok, prompts, reward_fn, **kwargs)

    def build(model, train, held, pad, method, loop, optim, out_dir, tracker=None, **kwargs):
        calls.trainers.append({"round": Path(out_dir).name, "reference": method.reference,
                               "reference_weights": _weights(model, method.reference),
                               "policy_weights": _weights(model, method.policy)})
        return real_build(model, train, held, pad, method, loop, optim, out_dir, tracker, **kwargs)

    def resume(self):
        resumed = real_resume(self)
        calls.resumed.append((self.out_dir.name, resumed, self.step))
        return resumed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pairs_module, "sample_preference_pairs", sample)
        mp.setattr(dpo_module, "build_dpo_trainer", build)
        mp.setattr(Trainer, "resume", resume)
        yield calls


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """base + sft, finished; each DPO run starts from a copy (the copy skips them)."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    _run(run_dir, "pipeline.stages=[base,sft]")
    return run_dir


def _copy(sft_run: Path, target: Path) -> Path:
    shutil.copytree(sft_run, target)
    return target


@pytest.fixture(scope="module")
def previous_run(sft_run, tmp_path_factory) -> tuple[Path, Calls]:
    """An uninterrupted two-round run with round_reference=previous, and what its spies saw."""
    run_dir = _copy(sft_run, tmp_path_factory.mktemp("previous") / "run")
    with spying() as calls:
        _run(run_dir, *ROUNDS, "trainer.dpo.round_reference=previous")
    return run_dir, calls


def _prompts(run_dir: Path) -> list:
    from align.data import load_prompts

    data_dir = Path(Manifest.load(run_dir).stages["base"]["artifacts"]["data_dir"])
    return load_prompts(str(data_dir / "prompts.jsonl"), "data.prompts")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ layout, metrics
def test_each_round_has_its_pairs_checkpoints_and_adapter_and_the_last_is_the_stages(previous_run):
    run_dir, _ = previous_run
    dpo = run_dir / "dpo"
    for number in (1, 2):
        round_dir = dpo / f"round-{number}"
        assert (round_dir / "pairs.jsonl").is_file() and (round_dir / "adapter" / WEIGHTS_FILE).is_file()
        assert sorted(p.name for p in (round_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert not (dpo / "pairs.jsonl").exists() and not (dpo / "checkpoints").exists()
    assert (dpo / "adapter" / WEIGHTS_FILE).read_bytes() == (dpo / "round-2" / "adapter" / WEIGHTS_FILE).read_bytes()
    assert not same(saved(dpo / "round-1" / "adapter"), saved(dpo / "round-2" / "adapter"))  # round 2 trained
    record = Manifest.load(run_dir).stages["dpo"]
    assert record["status"] == "done"
    assert record["artifacts"]["adapter"] == "dpo/adapter"
    assert record["artifacts"]["round-2/pairs"] == "dpo/round-2/pairs.jsonl"
    metrics = record["metrics"]
    for number in (1, 2):
        pairs = len(_rows(dpo / f"round-{number}" / "pairs.jsonl"))
        assert metrics[f"round-{number}/train_pairs"] == pairs > 0
        assert 0.0 <= metrics[f"round-{number}/eval/rewards/accuracy"] <= 1.0
        assert metrics[f"round-{number}/seconds"] >= 0
    # the one-round keys hold the last round's numbers
    assert metrics["train_pairs"] == metrics["round-2/train_pairs"]
    assert metrics["eval/rewards/accuracy"] == metrics["round-2/eval/rewards/accuracy"]
    report = (run_dir / "report.md").read_text()
    assert "## dpo rounds" in report
    assert f"| 1 | {metrics['round-1/train_pairs']} |" in report and f"| 2 | {metrics['round-2/train_pairs']} |" in report
    steps = [(row["step"], row["round"]) for row in _rows(dpo / "metrics.jsonl") if "train/loss" in row]
    assert steps == [(s, 1) for s in (1, 2, 3, 4)] + [(s, 2) for s in (5, 6, 7, 8)]  # one curve across rounds


# ------------------------------------------------------------------------------------------------ sampling
def test_round_2_samples_its_own_prompts_from_the_round_1_policy(previous_run):
    run_dir, calls = previous_run
    first, second = calls.samples
    sft = saved(run_dir / "sft" / "adapter")
    round_1 = saved(run_dir / "dpo" / "round-1" / "adapter")
    assert first["adapter"] == "sft" and same(first["weights"], sft)
    assert second["adapter"] == "policy" and same(second["weights"], round_1) and not same(second["weights"], sft)
    assert (first["seed"], second["seed"]) == (11, 1011)  # run.seed 0: + 11, + 1000 per round
    prompts = _prompts(run_dir)
    assert first["prompts"] == prompts[:16] and second["prompts"] == prompts[16:32]
    rows_1, rows_2 = (_rows(run_dir / "dpo" / f"round-{n}" / "pairs.jsonl") for n in (1, 2))
    assert rows_1 != rows_2
    assert {r["prompt"] for r in rows_2} <= set(prompts[16:32])


def test_round_1_samples_the_pairs_of_one_round_dpo(previous_run, sft_run, tmp_path):
    """rounds=1 keeps the old layout and identity, and its pairs are round 1's of a two-round run."""
    run_dir = _copy(sft_run, tmp_path / "run")
    manifest = _run(run_dir, *[o for o in ROUNDS if "rounds=" not in o])
    dpo = run_dir / "dpo"
    assert (dpo / "pairs.jsonl").is_file() and (dpo / "adapter").is_dir() and not list(dpo.glob("round-*"))
    assert (dpo / "pairs.jsonl").read_bytes() == (previous_run[0] / "dpo" / "round-1" / "pairs.jsonl").read_bytes()
    assert "rounds" not in manifest.stages["dpo"]["config"]["trainer.dpo"]
    assert not any(key.startswith("round-") for key in manifest.stages["dpo"]["metrics"])


# ------------------------------------------------------------------------------------------------ references
def test_previous_reference_is_the_round_1_policy(previous_run):
    run_dir, calls = previous_run
    sft = saved(run_dir / "sft" / "adapter")
    round_1 = saved(run_dir / "dpo" / "round-1" / "adapter")
    first, second = calls.trainers
    assert (first["round"], first["reference"]) == ("round-1", "sft") and same(first["reference_weights"], sft)
    assert second["round"] == "round-2" and second["reference"] == "reference"
    assert same(second["reference_weights"], round_1) and not same(second["reference_weights"], sft)
    assert same(second["policy_weights"], round_1)  # the policy goes on from where round 1 left it
    result = json.loads((run_dir / "dpo" / "round-2" / "result.json").read_text())
    assert (result["reference"], result["sampled_from"]) == ("round-1", "round-1")


def test_sft_reference_stays_the_sft_adapter(sft_run, tmp_path):
    run_dir = _copy(sft_run, tmp_path / "run")
    with spying() as calls:
        _run(run_dir, *ROUNDS)  # round_reference=sft is the default
    sft = saved(run_dir / "sft" / "adapter")
    round_1 = saved(run_dir / "dpo" / "round-1" / "adapter")
    assert [(c["round"], c["reference"]) for c in calls.trainers] == [("round-1", "sft"), ("round-2", "sft")]
    assert all(same(c["reference_weights"], sft) for c in calls.trainers)
    assert same(calls.trainers[1]["policy_weights"], round_1) and not same(round_1, sft)
    assert calls.samples[1]["adapter"] == "policy" and same(calls.samples[1]["weights"], round_1)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("crash_step", [0, 2], ids=["before-round-2-trains", "after-its-step-2-checkpoint"])
def test_a_crash_in_round_2_resumes_there_and_ends_like_an_unbroken_run(previous_run, sft_run, tmp_path, crash_step):
    """Round 2's trainer raises when it would take step ``crash_step`` + 1 (save_every=2: after step 2 there is a
    checkpoint to resume from; before step 1 there is none)."""
    from align.trainers.loop import Trainer

    run_dir = _copy(sft_run, tmp_path / "run")
    real_step = Trainer.train_step

    def crashing(self):
        if self.out_dir.name == "round-2" and self.step == crash_step:
            raise RuntimeError("injected crash in round 2")
        return real_step(self)

    overrides = (*ROUNDS, "trainer.dpo.round_reference=previous")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", crashing)
        with pytest.raises(StageFailed, match="injected crash in round 2"):
            _run(run_dir, *overrides)
    dpo = run_dir / "dpo"
    assert (dpo / "round-1" / "adapter").is_dir() and not (dpo / "round-2" / "adapter").exists()
    assert not (dpo / "adapter").exists()
    before = {p: p.read_bytes() for p in (dpo / "round-1" / "pairs.jsonl", dpo / "round-2" / "pairs.jsonl",
                                           dpo / "round-1" / "adapter" / WEIGHTS_FILE)}

    with spying() as calls:
        manifest = _run(run_dir, *overrides)
    assert manifest.stages["dpo"]["status"] == "done" and manifest.stages["dpo"]["attempts"] == 2
    assert [c["round"] for c in calls.trainers] == ["round-2"]  # round 1 is not trained again
    assert calls.samples == []  # no round's pairs are sampled again
    assert calls.resumed == [("round-2", crash_step > 0, crash_step)]
    assert all(path.read_bytes() == content for path, content in before.items())
    unbroken = previous_run[0] / "dpo"
    assert (dpo / "round-2" / "pairs.jsonl").read_bytes() == (unbroken / "round-2" / "pairs.jsonl").read_bytes()
    final, expected = saved(dpo / "adapter"), saved(unbroken / "adapter")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert manifest.stages["dpo"]["metrics"]["round-1/train_pairs"] == len(_rows(dpo / "round-1" / "pairs.jsonl"))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("overrides", "expected"), [
    (["trainer.dpo.rounds=0"], "an integer >= 1"),
    (["trainer.dpo.rounds=2", "trainer.dpo.pairs=dataset"], "1 with trainer.dpo.pairs=dataset"),
])
def test_rounds_that_cannot_run_are_refused_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        compose_run_config(overrides)
    assert info.value.key == "trainer.dpo.rounds"
    assert expected in str(info.value)


def test_round_reference_takes_sft_or_previous():
    with pytest.raises(ConfigError) as info:
        compose_run_config(["trainer.dpo.round_reference=base"])
    assert info.value.key == "trainer.dpo.round_reference" and "'previous'" in str(info.value)
    extras = compose_run_config(["trainer.dpo.rounds=3", "trainer.dpo.round_reference=previous"]).trainer["dpo"].extras
    assert (extras.rounds, extras.round_reference) == (3, "previous")
    defaults = compose_run_config([]).trainer["dpo"].extras
    assert (defaults.rounds, defaults.round_reference, defaults.kl_budget) == (4, "sft", 2.0)


def test_one_round_keeps_the_stage_identity_it_had_before_rounds():
    """A finished one-round dpo stage (or a stage cache entry) is still recognised: the identity leaves out the
    round keys while rounds=1, whatever round_reference says; more rounds are another stage."""
    one = stage_config(compose_run_config(["trainer.dpo.rounds=1"]), "dpo")
    assert not {"rounds", "round_reference", "kl_budget"} & set(one["trainer.dpo"])
    assert stage_config(compose_run_config(["trainer.dpo.rounds=1", "trainer.dpo.round_reference=previous",
                                            "trainer.dpo.kl_budget=null"]), "dpo") == one
    two = stage_config(compose_run_config(["trainer.dpo.rounds=2"]), "dpo")
    assert two["trainer.dpo"]["rounds"] == 2 and two["trainer.dpo"]["round_reference"] == "sft"


# ------------------------------------------------------------------------------------------------ KL budget
def test_the_projection_adds_the_last_rounds_increase():
    from pipelines.dpo_rounds import projected_kl

    assert projected_kl([0.0, 0.5]) == 1.0  # round 1 moved 0.5: round 2 is expected to end near 1.0
    assert projected_kl([0.0, 0.5, 1.2]) == pytest.approx(1.9)
    assert projected_kl([0.0, 0.5, 0.4]) == 0.4  # a round that lowered the KL is not projected to lower it again


def test_the_kl_of_the_sft_policy_to_itself_is_zero(tmp_path):
    from pipelines.context import StageContext
    from pipelines.stages import sampled_kl

    run_dir = tmp_path / "run"
    _run(run_dir, "pipeline.stages=[base,sft]")
    ctx = StageContext("dpo", compose_run_config([*TINY, f"run.dir={run_dir}"]), run_dir, Manifest.load(run_dir))
    model, tok = ctx.load_model(("sft",))
    prompts = ["review of the film", "the acting was"]
    assert sampled_kl(model, tok, "sft", "sft", prompts, 12, seed=3) == 0.0
    assert sampled_kl(model, tok, "sft", None, prompts, 12, seed=3) != 0.0  # the SFT adapter moved the base


def test_a_kl_budget_stops_the_rounds_and_a_rerun_makes_the_same_decision(tmp_path):
    tight, loose = tmp_path / "tight", tmp_path / "loose"
    three = [*ROUNDS, "trainer.dpo.rounds=3"]
    manifest = _run(loose, *three, "trainer.dpo.kl_budget=1e6")
    metrics = manifest.stages["dpo"]["metrics"]
    kl = [json.loads((loose / "dpo" / f"round-{r}" / "kl.json").read_text())["kl_to_sft"] for r in (1, 2)]
    assert metrics["rounds_trained"] == 3 and [metrics["round-1/kl_to_sft"], metrics["round-2/kl_to_sft"]] == kl
    assert all(k > 0 for k in kl) and not (loose / "dpo" / "round-3" / "kl.json").exists()  # nothing after it

    # a budget below twice round 1's KL: round 1 runs (nothing is measured before it), round 2 would pass it
    manifest = _run(tight, *three, f"trainer.dpo.kl_budget={1.5 * kl[0]}")
    metrics = manifest.stages["dpo"]["metrics"]
    assert metrics["rounds_trained"] == 1 and metrics["kl_projected"] == pytest.approx(2 * kl[0])
    assert json.loads((tight / "dpo" / "round-1" / "kl.json").read_text())["kl_to_sft"] == kl[0]  # same round 1
    assert not (tight / "dpo" / "round-2").exists()
    assert same(saved(tight / "dpo" / "adapter"), saved(tight / "dpo" / "round-1" / "adapter"))
    assert same(saved(tight / "dpo" / "adapter"), saved(loose / "dpo" / "round-1" / "adapter"))
    assert "Stopped after round 1 of 3" in (tight / "report.md").read_text()

    # room for round 2 (twice round 1's KL) but not for round 3 (round 2's KL plus its increase)
    before_2, before_3 = 2 * kl[0], kl[1] + max(kl[1] - kl[0], 0.0)
    assert before_3 > before_2  # round 2 moved the policy further than round 1 did
    middle = tmp_path / "middle"
    kept = _run(middle, *three, f"trainer.dpo.kl_budget={(before_2 + before_3) / 2}").stages["dpo"]["metrics"]
    assert kept["rounds_trained"] == 2 and kept["kl_projected"] == pytest.approx(before_3)
    assert not (middle / "dpo" / "round-3").exists()
    assert same(saved(middle / "dpo" / "adapter"), saved(loose / "dpo" / "round-2" / "adapter"))

    # the stage run again over its own files (as a resumed attempt): the kept KL decides, nothing is measured again
    from pipelines.context import StageContext
    from pipelines.dpo_rounds import run_dpo_rounds

    stamp = (tight / "dpo" / "round-1" / "kl.json").stat().st_mtime_ns
    shutil.rmtree(tight / "dpo" / "adapter")
    cfg = compose_run_config([*TINY, f"run.dir={tight}", *three, f"trainer.dpo.kl_budget={1.5 * kl[0]}"])
    again = run_dpo_rounds(StageContext("dpo", cfg, tight, Manifest.load(tight)))
    assert again.metrics["rounds_trained"] == 1 and again.metrics["kl_projected"] == metrics["kl_projected"]
    assert (tight / "dpo" / "round-1" / "kl.json").stat().st_mtime_ns == stamp
    assert same(saved(tight / "dpo" / "adapter"), saved(tight / "dpo" / "round-1" / "adapter"))


def test_a_kl_budget_is_part_of_the_stage_identity_only_when_set():
    without = stage_config(compose_run_config(["trainer.dpo.rounds=2", "trainer.dpo.kl_budget=null"]), "dpo")
    assert "kl_budget" not in without["trainer.dpo"]
    assert stage_config(compose_run_config(["trainer.dpo.rounds=2", "trainer.dpo.kl_budget=2"]),
                        "dpo")["trainer.dpo"]["kl_budget"] == 2.0
    with pytest.raises(ConfigError) as info:
        compose_run_config(["trainer.dpo.kl_budget=0"])
    assert info.value.key == "trainer.dpo.kl_budget" and "> 0" in str(info.value)
