"""The run config (configs/ composed by Hydra, typed by align.config.run) and the ``align.run`` command line: no
models are built, only the config is composed and checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from align.run import main, parse_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _outside_a_sweep(monkeypatch):
    """A W&B sweep agent's environment changes the default run directory; these tests run outside one."""
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def _error(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compose_run_config(overrides)
    return info.value


# ------------------------------------------------------------------------------------------------ defaults
def test_default_compose_is_the_dpo_pipeline_with_the_trainer_defaults():
    cfg = compose_run_config([])
    assert cfg.pipeline.name == "dpo"
    assert cfg.pipeline.stages == ("base", "sft", "dpo", "eval")
    assert cfg.embedded and cfg.run_dir == os.path.join("runs", "dpo")
    sft = cfg.trainer["sft"]
    assert (sft.loop.max_steps, sft.loop.micro_batch_size, sft.loop.eval_every, sft.loop.save_every) == (300, 16,
                                                                                                        100, 50)
    assert sft.optimizer.lr == 2.0e-3 and sft.optimizer.warmup_steps == 20
    rm = cfg.trainer["rm"]
    assert (rm.loop.max_steps, rm.loop.micro_batch_size) == (1500, 32)
    assert rm.optimizer.lr == 1.0e-3 and rm.extras.init == "fresh"
    dpo = cfg.trainer["dpo"]
    assert (dpo.method.beta, dpo.method.loss, dpo.method.rpo_alpha) == (0.1, "sigmoid", 1.0)
    assert (dpo.extras.pairs, dpo.extras.pair_prompts, dpo.extras.pair_samples) == ("onpolicy", 1000, 4)
    assert (dpo.extras.rounds, dpo.extras.round_reference, dpo.extras.kl_budget) == (4, "sft", 2.0)
    assert dpo.loop.max_steps == 75 and dpo.optimizer.lr == 1.0e-3 and dpo.optimizer.warmup_steps == 10
    ppo = cfg.trainer["ppo"]
    assert ppo.loop.max_steps == 150 and ppo.optimizer.schedule == "constant" and ppo.extras.reward == "model"
    assert (ppo.method.kl.coef, ppo.method.kl.adaptive, ppo.method.kl.target, ppo.method.kl.horizon) == (
        0.1, True, 4.0, 640.0)
    assert (ppo.method.rollout.prompts_per_step, ppo.method.rollout.group_size) == (64, 1)
    grpo = cfg.trainer["grpo"]
    assert grpo.extras.reward == "ground_truth" and grpo.method.algo == "grpo"
    assert (grpo.method.rollout.prompts_per_step, grpo.method.rollout.group_size) == (16, 4)
    assert (grpo.method.kl.coef, grpo.method.kl.estimator, grpo.method.kl.in_loss) == (0.05, "k3", True)
    # the seed comes from run.seed, DeepSpeed from the deepspeed group (none by default)
    assert all(st.loop.seed == 0 and st.loop.deepspeed is None for st in cfg.trainer.values())


def test_nested_overrides_arrive_typed():
    cfg = compose_run_config(["trainer.ppo.kl.coef=0.3", "trainer.dpo.optimizer.lr=5e-4", "run.seed=7"])
    coef, lr = cfg.trainer["ppo"].method.kl.coef, cfg.trainer["dpo"].optimizer.lr
    assert coef == 0.3 and type(coef) is float
    assert lr == 0.0005 and type(lr) is float
    assert type(cfg.raw["trainer"]["dpo"]["optimizer"]["lr"]) is float  # parsed as a number, not "5e-4"
    assert cfg.trainer["dpo"].loop.seed == 7 and cfg.run.seed == 7
    # the neighbours keep their defaults
    assert cfg.trainer["ppo"].method.kl.target == 4.0 and cfg.trainer["sft"].optimizer.lr == 2.0e-3


# ------------------------------------------------------------------------------------------------ bad keys
@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("traner.x=1", "traner", "trainer"),  # the first unknown part is the key the schema lacks
    ("trainer.dpo.betta=0.2", "trainer.dpo.betta", "beta"),
    ("trainer.ppo.kl.coeff=1", "trainer.ppo.kl.coeff", "coef"),
    ("model.pth=/x", "model.pth", "path"),
])
def test_unknown_keys_name_the_dotted_key_and_suggest_the_right_one(override, key, suggestion):
    error = _error([override])
    assert error.key == key
    assert f"unknown config key {key!r}" in str(error)
    assert f"did you mean {suggestion!r}?" in str(error)


def test_unknown_key_lists_the_valid_keys_at_its_depth():
    message = str(_error(["trainer.ppo.kl.coeff=1"]))
    assert "valid keys here are adaptive, coef, estimator, horizon, in_loss, target;" in message


@pytest.mark.parametrize(("override", "key", "expected"), [
    ("trainer.sft.max_steps=abc", "trainer.sft.max_steps", "an integer"),
    ("ray.enabled=maybe", "ray.enabled", "true or false"),
])
def test_wrong_types_name_the_key_and_the_expected_type(override, key, expected):
    error = _error([override])
    assert error.key == key
    assert str(error) == f"{key}={override.split('=')[1]!r}: expected {expected}"


def test_attention_implementation_is_typed_and_passed_to_the_loader(tmp_path):
    """model.attn_implementation: a typed choice (a bad one names the options) that load_base hands to
    transformers; 'auto' keeps the model's default."""
    from align.data.synthetic import build_tokenizer
    from align.models.loading import load_base
    from align.models.tiny import tiny_llama

    assert compose_run_config([]).model.attn_implementation == "auto"
    assert compose_run_config(["model.attn_implementation=eager"]).model.attn_implementation == "eager"
    error = _error(["model.attn_implementation=flash"])
    assert error.key == "model.attn_implementation" and "eager" in str(error)
    error = _error(["model.attn_implementation=flash_attention_2", "model.device=cpu"])
    assert error.key == "model.attn_implementation" and "GPUs only" in str(error)
    tokenizer = build_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_base(tmp_path, attn_implementation="eager")[0].config._attn_implementation == "eager"
    assert load_base(tmp_path)[0].config._attn_implementation == "sdpa"


def test_bad_group_option_lists_the_options_and_suggests_one():
    error = _error(["pipeline=dpoo"])
    assert error.key == "pipeline" and error.value == "dpoo"
    assert "['dpo', 'grpo', 'ppo', 'rloo', 'rm', 'sft']" in str(error)
    assert str(error).endswith("did you mean 'dpo'?")


def test_a_real_model_without_a_path_says_model_path_is_required():
    error = _error(["model=llama"])
    assert error.key == "model.path" and error.value == "???"
    assert "a local model directory" in str(error)


# ------------------------------------------------------------------------------------------------ combinations
@pytest.mark.parametrize(("overrides", "key", "fragment"), [
    (["resources.num_workers=2"], "resources.num_workers", "1 unless a DeepSpeed config is chosen"),
    (["deepspeed=zero3", "resources.num_workers=2", "pipeline=ppo", "trainer.ppo.separate_value_optimizer=true"],
     "trainer.ppo.separate_value_optimizer", "one engine updates the policy and value adapters"),
    (["deepspeed=zero3", "model.quantization=nf4"], "deepspeed", "zero2 or zero2_offload with model.quantization=nf4"),
    (["deepspeed=zero3_offload", "model.quantization=int8"], "deepspeed", "ZeRO-3 partitions the frozen base's"),
    (["model.path=/m"], "data.sft", "the embedded task's data only fits the embedded base"),
    (["pipeline.stages=[base,ppo,eval]"], "pipeline.stages", "the stage 'ppo' after ['rm']"),
    (["trainer.ppo.precision=bf16", "pipeline=ppo"], "trainer.ppo.precision", "'fp32' for the RL stages"),
    (["adapter.r=0"], "adapter.r", "positive"),
])
def test_impossible_combinations_name_the_key(overrides, key, fragment):
    error = _error(overrides)
    assert error.key == key
    assert fragment in str(error)


@pytest.mark.parametrize("deepspeed", ["zero2", "zero2_offload"])
def test_a_quantized_base_trains_under_zero2(deepspeed):
    """QLoRA under DeepSpeed: ZeRO-2 replicates the frozen NF4 base and partitions the adapters' state."""
    cfg = compose_run_config([f"deepspeed={deepspeed}", "model.quantization=nf4", "resources.num_workers=2"])
    assert cfg.model.quantization == "nf4" and cfg.deepspeed.config == f"{deepspeed}.json"


def test_rl_stage_needs_rm_unless_it_uses_a_reward_function():
    assert compose_run_config(["pipeline.stages=[base,sft,rm,ppo]"]).pipeline.stages == ("base", "sft", "rm", "ppo")
    error = _error(["pipeline.stages=[base,ppo,eval]"])
    assert "trainer.ppo.reward=ground_truth" in str(error)  # the way out is named
    cfg = compose_run_config(["pipeline.stages=[base,ppo,eval]", "trainer.ppo.reward=ground_truth"])
    assert cfg.pipeline.stages == ("base", "ppo", "eval")
    assert cfg.trainer["ppo"].method.reward_adapter is None and cfg.trainer["ppo"].method.value_init == "fresh"


def test_deepspeed_reaches_every_training_stage_of_an_rl_pipeline():
    for workers in ("1", "2"):
        cfg = compose_run_config(["deepspeed=zero3", "pipeline=ppo", f"resources.num_workers={workers}"])
        assert cfg.deepspeed.config == "zero3.json"
        assert [s for s, st in cfg.trainer.items() if st.loop.deepspeed] == ["sft", "rm", "dpo", "ppo", "grpo", "rloo"]


def test_ia3_adapter_group_keeps_the_reward_models_own_lora():
    cfg = compose_run_config(["adapter=ia3"])
    assert cfg.adapter_settings("sft")["method"] == "ia3"
    assert cfg.adapter_settings("dpo")["method"] == "ia3"
    assert cfg.adapter_settings("sft")["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    rm = cfg.adapter_settings("rm")
    assert rm == {"method": "lora", "r": 32, "lora_alpha": 64, "target_modules": "all-linear"}


# ------------------------------------------------------------------------------------------------ command line
def test_wandb_sweep_arguments_are_accepted_and_typed():
    # what a W&B sweep agent passes with ${args_no_hyphens}
    argv = ["trainer.dpo.beta=0.2", "trainer.dpo.optimizer.lr=0.0005", "trainer.dpo.max_steps=12", "run.dir=/tmp/x"]
    overrides, show = parse_args(argv)
    assert overrides == argv and show is None
    cfg = compose_run_config(overrides)
    beta, lr, steps = cfg.trainer["dpo"].method.beta, cfg.trainer["dpo"].optimizer.lr, cfg.trainer["dpo"].loop.max_steps
    assert (beta, lr, steps) == (0.2, 0.0005, 12)
    assert (type(beta), type(lr), type(steps)) == (float, float, int)
    assert cfg.run_dir == "/tmp/x"


def test_parse_args_rejects_flags_and_bare_words():
    assert parse_args(["--cfg", "job", "pipeline=ppo"]) == (["pipeline=ppo"], "job")
    assert parse_args(["pipeline=ppo", "--cfg"]) == (["pipeline=ppo"], "job")
    with pytest.raises(ConfigError, match="'--beta'"):
        parse_args(["--beta"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_args(["beta"])


def capture(capsys, *overrides: str) -> str:
    assert main(["--cfg", "job", "trainer.dpo.max_steps=10", "trainer.dpo.micro_batch_size=4",
                 "trainer.dpo.grad_accum_steps=2", *overrides]) == 0
    return capsys.readouterr().out


def test_cfg_job_prints_the_dpo_batch_arithmetic(capsys):
    rc = main(["--cfg", "job", "trainer.dpo.max_steps=10", "trainer.dpo.micro_batch_size=4",
               "trainer.dpo.grad_accum_steps=2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#   sft: 300 steps x 16 rows per step (1 worker(s) x 1 micro-batch(es) x 16 rows) = 4800 rows\n" in out
    assert ("#   dpo: 10 steps x 8 pairs per step (1 worker(s) x 2 micro-batch(es) x 4 pairs) = 80 pairs per round, "
            "x 4 rounds = 320 pairs at most (fewer within the KL budget of 2.0 nats)\n") in out
    assert "dpo: 10 steps x 8 pairs per step (1 worker(s) x 2 micro-batch(es) x 4 pairs) = 80 pairs\n" in \
        capture(capsys, "trainer.dpo.rounds=1")
    assert "# run directory: runs/dpo" in out
    assert "beta: 0.1" in out  # the resolved YAML comes first


def test_cfg_job_counts_deepspeed_workers(capsys):
    rc = main(["--cfg", "job", "deepspeed=zero2", "resources.num_workers=2", "trainer.dpo.max_steps=10",
               "trainer.dpo.micro_batch_size=4", "trainer.dpo.grad_accum_steps=2"])
    assert rc == 0
    assert "dpo: 10 steps x 16 pairs per step (2 worker(s) x 2 micro-batch(es) x 4 pairs) = 160 pairs per round" in (
        capsys.readouterr().out)


def test_cfg_job_prints_the_grpo_iteration_arithmetic(capsys):
    rc = main(["--cfg", "job", "pipeline=grpo", "trainer.grpo.max_steps=5", "trainer.grpo.rollout.prompts_per_step=6",
               "trainer.grpo.rollout.group_size=4", "trainer.grpo.minibatch_size=16", "trainer.grpo.ppo_epochs=3"])
    out = capsys.readouterr().out
    assert rc == 0
    # 6 prompts x 4 samples = 24 samples -> ceil(24 / 16) = 2 minibatches; 3 epochs x 2 = 6 optimizer steps
    assert ("#   grpo: 5 iterations x 6 prompts x 4 samples per prompt = 24 samples per iteration; "
            "3 epochs x 2 minibatches of 16 = 6 optimizer steps per iteration\n") in out
    assert "# run directory: runs/grpo" in out
    assert "#   dpo:" not in out and "#   sft: 300 steps" in out


def test_cfg_job_prints_the_global_rl_batch_of_several_workers(capsys):
    rc = main(["--cfg", "job", "pipeline=grpo", "deepspeed=zero3", "resources.num_workers=2",
               "trainer.grpo.max_steps=5", "trainer.grpo.rollout.prompts_per_step=6",
               "trainer.grpo.rollout.group_size=4", "trainer.grpo.minibatch_size=16", "trainer.grpo.ppo_epochs=3"])
    out = capsys.readouterr().out
    assert rc == 0
    # per rank as with one worker (24 samples, 2 minibatches of 16); globally twice the prompts and samples
    assert ("#   grpo: 5 iterations x 12 (2 worker(s) x 6) prompts x 4 samples per prompt = 48 samples per "
            "iteration; 3 epochs x 2 minibatches of 2 x 16 = 6 optimizer steps per iteration\n") in out
    assert "#   memory grpo (per rank, 2 ranks, fp32 base, DeepSpeed zero3 (ZeRO-3); trains policy" in out


def test_cfg_job_with_a_bad_key_returns_2(capsys):
    assert main(["--cfg", "job", "trainer.dpo.betta=0.2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("config error: unknown config key 'trainer.dpo.betta'")


def test_command_line_typo_exits_2_and_suggests_the_key():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "align.run", "trainer.dpo.bta=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'trainer.dpo.bta'" in proc.stderr
    assert "did you mean 'beta'?" in proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------------------------------------------ bad values up front
@pytest.mark.parametrize(("override", "key"), [
    ("trainer.sft.optimizer.lr=nan", "trainer.sft.optimizer.lr"),
    ("trainer.sft.optimizer.lr=inf", "trainer.sft.optimizer.lr"),
    ("trainer.sft.optimizer.weight_decay=nan", "trainer.sft.optimizer.weight_decay"),
    ("trainer.dpo.beta=nan", "trainer.dpo.beta"),  # a NaN adapter would be saved as done
    ("trainer.dpo.beta=-inf", "trainer.dpo.beta"),
    ("trainer.ppo.kl.coef=inf", "trainer.ppo.kl.coef"),
    ("resources.num_gpus=nan", "resources.num_gpus"),  # a float | None field says 'finite', not 'a number or null'
    ("eval.temperature=inf", "eval.temperature"),
])
def test_nan_and_inf_are_refused_for_every_float(override, key):
    error = _error([override])
    assert error.key == key
    assert "expected a finite number (nan and inf are not allowed here" in str(error)


def test_the_method_configs_refuse_nan_when_built_directly():
    """Code that builds the dataclasses itself (not through the YAML) gets the same refusal: comparisons with NaN
    are all false, so 'beta <= 0' let NaN through."""
    from align.config.methods import DPOConfig, RewardConfig
    from align.config.rl import KLConfig
    from align.config.trainer import OptimizerConfig

    nan = float("nan")
    for make, key in ((lambda: DPOConfig(beta=nan), "trainer.dpo.beta"),
                      (lambda: DPOConfig(rpo_alpha=nan), "trainer.dpo.rpo_alpha"),
                      (lambda: RewardConfig(center_rewards=nan), "trainer.reward.center_rewards"),
                      (lambda: OptimizerConfig(lr=nan), "trainer.optimizer.lr"),
                      (lambda: OptimizerConfig(weight_decay=float("inf")), "trainer.optimizer.weight_decay")):
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.key == key
    with pytest.raises(ConfigError, match=r"^trainer.rl.kl.coef=inf: expected a finite number >= 0"):
        KLConfig(coef=float("inf")).check("trainer.rl.kl")


@pytest.mark.parametrize(("overrides", "key", "expected"), [
    (["eval.prompts=-1"], "eval.prompts", "an integer >= 1"),
    (["eval.temperature=-3"], "eval.temperature", "a finite number > 0"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens", "an integer >= 1"),
    (["data.max_length=1", "data.max_prompt_length=5"], "data.max_length", "an integer >= 2"),
    (["data.max_length=4", "data.max_prompt_length=5"], "data.max_prompt_length", "less than data.max_length=4"),
    (["data.max_prompt_length=0"], "data.max_prompt_length", "an integer >= 1"),
    (["data.sft_eval_rows=-5"], "data.sft_eval_rows", "an integer >= 0"),
    (["data.rm_eval_rows=-1"], "data.rm_eval_rows", "an integer >= 0"),
    (["resources.num_cpus=-2"], "resources.num_cpus", "an integer >= 1, or null"),
    (["resources.num_gpus=-1"], "resources.num_gpus", "a number >= 0, or null"),
    (["resources.memory_gb=0"], "resources.memory_gb", "a number > 0, or null"),
    (["ray.num_cpus=0"], "ray.num_cpus", "an integer >= 1, or null"),
    (["trainer.dpo.pair_samples=1"], "trainer.dpo.pair_samples", "an integer >= 2"),
    (["trainer.dpo.pair_prompts=0"], "trainer.dpo.pair_prompts", "an integer >= 1"),
    (["run.seed=-1"], "run.seed", "an integer >= 0"),  # was reported as trainer.sft.seed
])
def test_out_of_range_values_name_the_key_the_user_typed(overrides, key, expected):
    error = _error(overrides)
    assert error.key == key
    assert expected in str(error)


def test_in_range_values_and_nulls_are_accepted():
    cfg = compose_run_config(["resources.num_cpus=2", "resources.num_gpus=0", "resources.memory_gb=1.5",
                              "data.sft_eval_rows=0", "trainer.dpo.pair_samples=2", "run.seed=3"])
    assert (cfg.resources.num_gpus, cfg.data.sft_eval_rows, cfg.trainer["dpo"].loop.seed) == (0.0, 0, 3)
    defaults = compose_run_config([])
    assert (defaults.resources.num_cpus, defaults.resources.num_gpus, defaults.resources.memory_gb) == (None,) * 3


def _real_files(tmp_path: Path, **missing: str) -> list[str]:
    """Overrides of a real-model dpo pipeline (prompts from data.prompts) whose files all exist, except the keys
    given in ``missing`` (key -> value)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    files = []
    for key in ("sft", "preferences", "prompts", "eval_prompts"):
        path = tmp_path / f"{key}.jsonl"
        path.write_text('{"prompt": "Q", "completion": "A"}\n')
        files.append(f"data.{key}={missing.get(key, path)}")
    return ["model=llama", f"model.path={model}", "data=files", *files, "trainer.dpo.pair_reward=length"]


def test_real_files_that_exist_pass(tmp_path):
    assert compose_run_config(_real_files(tmp_path)).data.sft == str(tmp_path / "sft.jsonl")


@pytest.mark.parametrize(("key", "value"), [
    ("sft", "/nonexistent/sft.jsonl"),
    ("prompts", "missing/prompts.jsonl"),
    ("eval_prompts", "./eval"),
    ("sft", "'~/no-such-dir-for-align/sft.jsonl'"),  # quoted: Hydra's grammar has no bare ~
    ("prompts", "prompts.csv"),  # a bare file name with a data extension is a path too
])
def test_missing_data_files_are_refused_at_start_up(tmp_path, key, value):
    error = _error(_real_files(tmp_path, **{key: value}))
    assert error.key == f"data.{key}" and error.value == value.strip("'")
    assert "does not exist: check the path" in str(error)


def test_data_the_pipeline_does_not_read_and_dataset_names_are_left_alone(tmp_path):
    # pairs=onpolicy reads data.prompts, not data.preferences; a bare name or owner/name may be a Hub dataset
    cfg = compose_run_config(_real_files(tmp_path, preferences="/nonexistent/prefs.jsonl", sft="owner/name"))
    assert cfg.data.preferences == "/nonexistent/prefs.jsonl" and cfg.data.sft == "owner/name"
    assert compose_run_config(_real_files(tmp_path, sft="imdb")).data.sft == "imdb"
    error = _error([*_real_files(tmp_path, preferences="/nonexistent/prefs.jsonl"), "trainer.dpo.pairs=dataset"])
    assert error.key == "data.preferences" and "the 'dpo' stage reads it" in str(error)
    error = _error(["data.preferences_eval=/nonexistent/held.jsonl"])  # the eval stage's held-out pairs
    assert error.key == "data.preferences_eval"
    assert compose_run_config(["data.preferences_eval=/nonexistent/held.jsonl", "eval.pairs=0",
                               "pipeline.stages=[base,sft,eval]"]).eval.pairs == 0


def test_model_path_must_be_a_directory(tmp_path):
    overrides = _real_files(tmp_path)
    error = _error([*overrides, f"model.path={tmp_path / 'nowhere'}"])
    assert error.key == "model.path" and "does not exist" in str(error)
    error = _error([*overrides, f"model.path={tmp_path / 'sft.jsonl'}"])
    assert error.key == "model.path" and "is a file, not a directory" in str(error)


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for value in (blocker, blocker / "sub"):
        error = _error([f"run.dir={value}"])
        assert error.key == "run.dir" and error.value == str(value)
        assert f"{blocker} is an existing file: remove it or choose another run.dir" in str(error)
    assert _error([f"run.stage_cache={blocker}"]).key == "run.stage_cache"
    assert compose_run_config([f"run.dir={tmp_path / 'new' / 'run'}"]).run_dir == str(tmp_path / "new" / "run")


def test_run_dir_that_is_a_file_exits_2_before_any_stage(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main([f"run.dir={blocker}", "ray.enabled=false"]) == 2
    assert capsys.readouterr().err.startswith(f"config error: run.dir='{blocker}': expected a directory path")
    assert blocker.read_text() == "x"
