"""On-policy DPO ranked by the learned reward model, ``trainer.dpo.pair_reward=model``, on the tiny embedded base in
this process: base -> sft -> rm -> dpo, one round and two (iterative DPO).

A spy keeps the token ids ``sample_preference_pairs`` sampled; the test then loads the rm stage's adapter and head
itself, scores every sample alone (one unpadded sequence through the plain transformers backbone) and checks that
each pair is the best and the worst of its prompt's samples with exactly those scores. Other spies check that the
frozen reward adapter never trains and is never the adapter of a DPO forward, and that it stays out of the
saved policy."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.adapters import AdapterModel
from align.adapters.peft_format import PREFIX, WEIGHTS_FILE
from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from align.models.heads import ScalarHead
from align.models.loading import load_base
from pipelines.manifest import Manifest
from pipelines.runner import run_pipeline, stage_digests

from .tiny import TINY as TINY_OVERRIDES

TINY = [*TINY_OVERRIDES, "tracking.wandb=off", "ray.enabled=false"]
RANKED = ["pipeline.stages=[base,sft,rm,dpo]", "trainer.dpo.pair_reward=model", "trainer.dpo.pair_prompts=8",
          "trainer.dpo.pair_max_new_tokens=16", "trainer.dpo.max_steps=2", "trainer.dpo.save_every=2"]
K = 4  # trainer.dpo.pair_samples (default)


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


def _run(run_dir: Path, *overrides: str) -> Manifest:
    return run_pipeline(compose_run_config([*TINY, f"run.dir={run_dir}", *overrides]), log=lambda _: None)


@dataclass
class Seen:
    samples: dict[int, object] = field(default_factory=dict)  # seed -> the Samples drawn with it
    prompts: dict[int, list] = field(default_factory=dict)  # seed -> its prompts
    logp_adapters: set = field(default_factory=set)  # every adapter a DPO log-prob forward ran under
    models: list[tuple[AdapterModel, dict]] = field(default_factory=list)  # (model, trainer.params) per trainer


@contextlib.contextmanager
def spying():
    import align.trainers.dpo as dpo_module
    import reward.pairs as pairs_module

    seen = Seen()
    real_sample, real_logps, real_build = (pairs_module.sample_ids, dpo_module.sequence_logps,
                                           dpo_module.build_dpo_trainer)

    def sample_ids(model, adapter, tok, prompts, **kwargs):
        drawn = real_sample(model, adapter, tok, prompts, **kwargs)
        seen.samples[kwargs["seed"]], seen.prompts[kwargs["seed"]] = drawn, list(prompts)
        return drawn

    def sequence_logps(model, batch, adapter, cfg):
        seen.logp_adapters.add(adapter)
        return real_logps(model, batch, adapter, cfg)

    def build(model, *args, **kwargs):
        trainer = real_build(model, *args, **kwargs)
        seen.models.append((model, trainer.params))
        return trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pairs_module, "sample_ids", sample_ids)
        mp.setattr(dpo_module, "sequence_logps", sequence_logps)
        mp.setattr(dpo_module, "build_dpo_trainer", build)
        yield seen


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory) -> Path:
    """base + sft + rm, finished; each DPO run starts from a copy (the copy skips them)."""
    run_dir = tmp_path_factory.mktemp("rm") / "run"
    _run(run_dir, "pipeline.stages=[base,sft,rm]")
    return run_dir


@pytest.fixture(scope="module")
def one_round(rm_run, tmp_path_factory) -> tuple[Path, Manifest, Seen]:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    shutil.copytree(rm_run, run_dir)
    with spying() as seen:
        manifest = _run(run_dir, *RANKED)
    return run_dir, manifest, seen


@pytest.fixture(scope="module")
def two_rounds(rm_run, tmp_path_factory) -> tuple[Path, Manifest, Seen]:
    run_dir = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(rm_run, run_dir)
    with spying() as seen:
        manifest = _run(run_dir, *RANKED, "trainer.dpo.rounds=2")
    return run_dir, manifest, seen


class RewardModel:
    """The rm stage's adapter + head, loaded here without the pipeline: one sequence at a time, no padding, the
    backbone's last hidden state at the last token."""

    def __init__(self, run_dir: Path) -> None:
        model_dir = Manifest.load(run_dir).stages["base"]["artifacts"]["model_dir"]
        base, _ = load_base(model_dir)
        self.model = AdapterModel(base).eval()
        self.model.load_adapter(run_dir / "rm" / "adapter", "rm")
        self.head = ScalarHead.load(run_dir / "rm" / "adapter")

    @torch.no_grad()
    def score(self, ids: list[int]) -> float:
        with self.model.use("rm"):
            hidden = self.model.model.model(input_ids=torch.tensor([ids])).last_hidden_state  # (1, T, H)
        return self.head(hidden[0, -1]).item()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_pairs(rows: list[dict], seen: Seen, first_seed: int, scorer: RewardModel) -> None:
    """Every row is the best and the worst of its prompt's K samples under the reward model, with its scores."""
    seeds = range(first_seed, first_seed + K)
    drawn = [seen.samples[s] for s in seeds]
    prompts = seen.prompts[first_seed]
    assert all(seen.prompts[s] == prompts for s in seeds)
    assert rows and len(rows) <= len(prompts)
    for row in rows:
        i = prompts.index(row["prompt"])
        scored = sorted((scorer.score(d.prompt_ids[i] + d.response_ids[i]), d.texts[i]) for d in drawn)
        (low, worst), (high, best) = scored[0], scored[-1]
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen_score"] == pytest.approx(high, abs=1e-5)
        assert row["rejected_score"] == pytest.approx(low, abs=1e-5)
        assert (row["chosen"], row["rejected"]) == (best, worst)


def _saved(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / WEIGHTS_FILE))


def _check_reward_adapter_frozen(run_dir: Path, seen: Seen, trainers: int) -> None:
    """Each trainer's model holds the reward adapter frozen, with the rm stage's weights after training; no trained
    parameter is one of it; no DPO forward ran under it; the saved policy has the SFT adapter's keys only."""
    rm = _saved(run_dir / "rm" / "adapter")
    assert len(seen.models) == trainers
    for model, params in seen.models:
        assert "reward" in model.adapter_names
        reward = model.adapter_parameters("reward")
        assert reward and not any(p.requires_grad for p in reward)
        assert not {id(p) for p in reward} & {id(p) for p in params.values()}
        weights = {PREFIX + k: v for k, v in model.adapter_state_dict("reward").items()}
        assert weights.keys() == rm.keys() and all(torch.equal(weights[k], rm[k]) for k in rm)
    assert seen.logp_adapters == {"policy", "sft"}
    assert _saved(run_dir / "dpo" / "adapter").keys() == _saved(run_dir / "sft" / "adapter").keys()


# ------------------------------------------------------------------------------------------------ one round
def test_pairs_are_ranked_by_the_reward_model_on_the_sampled_ids(one_round):
    run_dir, manifest, seen = one_round
    assert manifest.stages["dpo"]["status"] == "done"
    assert sorted(seen.samples) == [11, 12, 13, 14]  # run.seed 0 + 11, one seed per sample
    rows = _rows(run_dir / "dpo" / "pairs.jsonl")
    assert manifest.stages["dpo"]["metrics"]["train_pairs"] == len(rows)
    _check_pairs(rows, seen, 11, RewardModel(run_dir))


def test_the_reward_adapter_stays_frozen_inactive_and_out_of_the_policy(one_round):
    run_dir, _, seen = one_round
    _check_reward_adapter_frozen(run_dir, seen, trainers=1)


def test_the_reward_model_is_upstream_of_dpo(one_round):
    """The runner restarts dpo when an upstream stage's artifacts change: the rm stage is one of them, and a
    changed rm config changes dpo's identity."""
    _, manifest, _ = one_round
    record = manifest.stages["dpo"]
    assert record["upstream"]["rm"] == manifest.stages["rm"]["artifact_hashes"]
    assert record["config"]["trainer.dpo"]["pair_reward"] == "model"
    digests = stage_digests(compose_run_config([*TINY, *RANKED]))
    changed = stage_digests(compose_run_config([*TINY, *RANKED, "trainer.rm.max_steps=7"]))
    assert digests["sft"] == changed["sft"] and digests["rm"] != changed["rm"] and digests["dpo"] != changed["dpo"]


# ------------------------------------------------------------------------------------------------ two rounds
def test_each_round_ranks_its_pairs_with_the_reward_model(two_rounds):
    run_dir, manifest, seen = two_rounds
    assert manifest.stages["dpo"]["status"] == "done"
    assert sorted(seen.samples) == [11, 12, 13, 14, 1011, 1012, 1013, 1014]  # + 1000 per round
    scorer = RewardModel(run_dir)
    for number, first_seed in ((1, 11), (2, 1011)):
        _check_pairs(_rows(run_dir / "dpo" / f"round-{number}" / "pairs.jsonl"), seen, first_seed, scorer)
    _check_reward_adapter_frozen(run_dir, seen, trainers=2)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("stages", ["[base,sft,dpo,eval]", "[base,sft,dpo,rm,eval]"], ids=["no-rm", "rm-after"])
def test_pair_reward_model_needs_an_rm_stage_before_dpo(stages):
    with pytest.raises(ConfigError) as info:
        compose_run_config([f"pipeline.stages={stages}", "trainer.dpo.pair_reward=model"])
    assert info.value.key == "trainer.dpo.pair_reward"
    assert str(info.value).startswith("trainer.dpo.pair_reward='model': expected a reward function (ground_truth, ")
    assert "'model' with an 'rm' stage before 'dpo' in pipeline.stages" in str(info.value)


def test_pair_reward_model_is_accepted_after_an_rm_stage():
    cfg = compose_run_config(["pipeline.stages=[base,sft,rm,dpo,eval]", "trainer.dpo.pair_reward=model"])
    assert cfg.trainer["dpo"].extras.pair_reward == "model"
    # with pairs from a dataset the pair reward is unused, so nothing needs the rm stage
    compose_run_config(["trainer.dpo.pairs=dataset", "trainer.dpo.pair_reward=model"])
