"""The whole run's config (``python -m align.run``): every Hydra group as a typed, frozen dataclass.

``load_run_config(mapping)`` turns the merged YAML + overrides into a ``RunConfig`` and checks the combinations
that no single group can see (stages that need an earlier stage, DeepSpeed with the RL stages, real models with
the embedded task's data, ...). Nothing heavy is imported: validation runs before any model, data or Ray.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .build import UnknownKeyError, as_dict, build, convert, suggest, unknown_key
from .data import DataConfig
from .embedded import EmbeddedBaseConfig, EmbeddedTaskConfig
from .errors import ConfigError
from .methods import DPOConfig, RewardConfig, SFTConfig, _finite
from .rl import RLConfig
from .trainer import LoopConfig, OptimizerConfig

StageName = Literal["base", "sft", "rm", "dpo", "ppo", "grpo", "rloo", "eval"]
TRAINING_STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rloo")
RL_STAGES = ("ppo", "grpo", "rloo")
POLICY_STAGES = ("dpo", "ppo", "grpo", "rloo")
# role names are fixed by the pipeline (they name the adapters on disk); users configure everything else
ROLE_FIELDS = frozenset({"adapter", "policy", "reference", "reward_adapter", "value", "algo"})
# loop fields that come from elsewhere: the seed from run.seed, DeepSpeed from the deepspeed group
LOOP_EXCLUDED = frozenset({"seed", "deepspeed"})


# ------------------------------------------------------------------------------------------------ groups
@dataclass(frozen=True)
class PipelineSpec:
    """``pipeline=<name>``: the ordered stages. Each later stage reads the artifacts of the earlier ones."""

    name: str = "dpo"
    stages: tuple[StageName, ...] = ("base", "sft", "dpo", "eval")


@dataclass(frozen=True)
class ModelSpec:
    """``model.path``: a local transformers model directory; null builds (once, cached) the embedded task's tiny
    base. ``gguf_file``: a GGUF model file instead (absolute, or relative to ``model.path``), converted once into
    a transformers directory under the align cache by the base stage (``python -m align.convert`` does the same
    by hand). ``target_modules``: the layers adapters wrap ('all-linear', a list of names, or a regex). ``device``:
    'auto' (a GPU when the stage's process sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'.
    ``attn_implementation``: transformers' attention kernel; 'auto' keeps the model's default (SDPA), 'eager' is
    the plain-matmul path (faster for short bf16 sequences on CPU, O(T^2) memory), 'flash_attention_2' needs the
    flash-attn package and a GPU."""

    name: str = "embedded"
    path: str | None = None
    gguf_file: str | None = None
    quantization: Literal["none", "nf4", "int8"] = "none"
    dtype: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    target_modules: str | list[str] = "all-linear"
    embedded: EmbeddedBaseConfig = field(default_factory=EmbeddedBaseConfig)


@dataclass(frozen=True)
class DataSpec:
    """Where each stage's data lives. null: the embedded task's split of that kind (only with the embedded base).
    ``sft``: SFT rows; ``preferences``: pairs for the reward model (and DPO with ``trainer.dpo.pairs=dataset``);
    ``preferences_eval``: held-out pairs; ``prompts``: RL / on-policy pair prompts; ``eval_prompts``: held-out
    prompts of the final evaluation. ``sft_eval_rows``/``rm_eval_rows``: rows of the training file held out when
    there is no separate eval file. ``allow_hub``: a name that is no local path may be a Hugging Face Hub dataset
    (downloaded, needs network); false (default): it is refused, and the Hugging Face libraries run offline."""

    name: str = "embedded"
    sft: str | None = None
    preferences: str | None = None
    preferences_eval: str | None = None
    prompts: str | None = None
    eval_prompts: str | None = None
    max_length: int = 128
    max_prompt_length: int = 64
    on_bad_rows: Literal["error", "skip"] = "error"
    cache_dir: str | None = None
    sft_eval_rows: int = 200
    rm_eval_rows: int = 500
    embedded: EmbeddedTaskConfig = field(default_factory=EmbeddedTaskConfig)
    allow_hub: bool = False


@dataclass(frozen=True)
class DeepSpeedSpec:
    """``deepspeed=zero2|zero2_offload|zero3|zero3_offload|none``: the DeepSpeed JSON every training stage (SFT, RM,
    DPO, PPO, GRPO, RLOO) trains through (relative paths are read from the repository's ``configs/deepspeed/``)."""

    name: str = "none"
    config: str | None = None


@dataclass(frozen=True)
class ResourcesSpec:
    """What each stage asks Ray for. ``num_cpus`` null: every CPU of the machine (torch uses that many threads).
    ``num_gpus`` null: one GPU when the cluster has any, else none (Ray hides GPUs from a task that asks for none).
    ``num_workers`` > 1: the training stages run as that many Ray Train workers on the DeepSpeed back-end.
    ``max_retries``: how often a stage whose process died is restarted (it resumes from its checkpoint)."""

    num_cpus: int | None = None
    num_gpus: float | None = None
    memory_gb: float | None = None
    num_workers: int = 1
    max_retries: int = 1


@dataclass(frozen=True)
class RunSpec:
    """``run.dir``: the run directory (default ``runs/<pipeline>``). ``stage_cache``: a directory of finished
    stages shared between runs (sweeps use it so trials reuse the stages they share)."""

    dir: str | None = None
    name: str | None = None
    seed: int = 0
    stage_cache: str | None = None

    def __post_init__(self) -> None:  # before the stages copy the seed (which would name trainer.sft.seed)
        if self.seed < 0:
            raise ConfigError("run.seed", self.seed, "an integer >= 0")


@dataclass(frozen=True)
class RaySpec:
    """``ray.enabled=false`` runs the stages in this process (debugging, or inside a sweep trial). ``address``:
    an existing cluster (``RAY_ADDRESS`` works too); null starts a local Ray sized for the machine."""

    enabled: bool = True
    address: str | None = None
    num_cpus: int | None = None


@dataclass(frozen=True)
class TrackingSpec:
    """``wandb``: auto (offline unless ``WANDB_API_KEY`` or ``WANDB_MODE=online``), off, offline or online.
    ``group``: the W&B group (default: the run's name; a sweep puts all its trials in one group)."""

    wandb: Literal["auto", "off", "offline", "online"] = "auto"
    project: str = "align"
    group: str | None = None


@dataclass(frozen=True)
class EvalSpec:
    """The final evaluation: one sample per held-out prompt from the trained policy and from its reference,
    scored by ``reward`` ('auto': the ground-truth scorer on the embedded task, the reward model when an 'rm'
    stage runs, else 'none'; or a reward function). 'none' scores no samples: the evaluation then reports the KL,
    lengths and samples, and -- as always when held-out pairs exist (``data.preferences_eval``) -- the policy's
    preference accuracy and implicit-reward margin on up to ``pairs`` of them."""

    prompts: int = 1000
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 1
    reward: str | list[dict] | dict = "auto"
    pairs: int = 500


# ------------------------------------------------------------------------------------------------ stages
@dataclass(frozen=True)
class SFTExtras:
    pass


@dataclass(frozen=True)
class RMExtras:
    """``init``: the reward adapter starts 'fresh' or as a copy of the 'sft' adapter (InstructGPT)."""

    init: Literal["fresh", "sft"] = "fresh"


@dataclass(frozen=True)
class DPOExtras:
    """``pairs``: 'onpolicy' samples ``pair_samples`` responses per prompt from the SFT policy and keeps the best
    and worst under ``pair_reward`` (a reward function, or 'model': the rm stage's reward model, which must run
    before dpo) as chosen/rejected (the DPO paper's protocol); 'dataset' trains on ``data.preferences``.

    ``rounds`` > 1: iterative (online) DPO. Each round samples fresh on-policy pairs from the current policy (round
    1: the SFT adapter) and trains the policy further on them with a fresh DPO trainer; ``max_steps`` and
    ``pair_prompts`` are per round. Rounds (and ``round_reference``, ``kl_budget``) are for on-policy pairs: with
    ``pairs=dataset`` the stage is one pass of ``max_steps`` over ``data.preferences`` (an explicit
    ``trainer.dpo.rounds`` > 1 there is refused by ``compose_run_config``). ``round_reference``: every round's frozen
    reference is the SFT adapter ('sft'), or the policy as it was at the end of the previous round ('previous'; round
    1: the SFT adapter).

    ``kl_budget`` (nats per response, null = off; rounds > 1): before each round after the first, the policy's KL to
    the SFT policy is measured on samples (``pipelines.dpo_rounds``); the round runs only if that KL plus the last
    round's increase stays within the budget, so the stage ends near the budget whatever the seed moves."""

    pairs: Literal["onpolicy", "dataset"] = "onpolicy"
    pair_prompts: int = 2000
    pair_samples: int = 4
    pair_reward: str | list[dict] | dict = "ground_truth"
    pair_max_new_tokens: int = 64
    rounds: int = 1
    round_reference: Literal["sft", "previous"] = "sft"
    kl_budget: float | None = None

    def __post_init__(self) -> None:
        for key, low in (("pair_prompts", 1), ("pair_samples", 2), ("pair_max_new_tokens", 1), ("rounds", 1)):
            if getattr(self, key) < low:
                why = " (the best and the worst of them make a pair)" if key == "pair_samples" else ""
                raise ConfigError(f"trainer.dpo.{key}", getattr(self, key), f"an integer >= {low}{why}")
        if self.kl_budget is not None and not (_finite(self.kl_budget) and self.kl_budget > 0):
            raise ConfigError("trainer.dpo.kl_budget", self.kl_budget,
                              "a finite number > 0 (nats per response), or null for no budget")


@dataclass(frozen=True)
class RLExtras:
    """``reward``: 'model' (the rm stage's adapter + head) or a reward function's name ('ground_truth')."""

    reward: str | list[dict] | dict = "model"


METHOD_CLASSES: dict[str, tuple[type, type]] = {
    "sft": (SFTConfig, SFTExtras), "rm": (RewardConfig, RMExtras), "dpo": (DPOConfig, DPOExtras),
    "ppo": (RLConfig, RLExtras), "grpo": (RLConfig, RLExtras), "rloo": (RLConfig, RLExtras),
}


@dataclass(frozen=True)
class StageTrainer:
    """One stage's trainer settings, written flat under ``trainer.<stage>``: the loop's keys (``max_steps``,
    ``micro_batch_size``, ...), ``optimizer.*``, the method's keys (``beta``, ``kl.coef``, ...), the stage's own
    keys (``pairs``, ``reward``, ...) and ``adapter.*`` (overrides of the ``adapter`` group for this stage)."""

    loop: LoopConfig
    optimizer: OptimizerConfig
    method: Any
    extras: Any
    adapter: dict


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def stage_keys(stage: str) -> set[str]:
    method, extras = METHOD_CLASSES[stage]
    return ((_fields(LoopConfig) - LOOP_EXCLUDED) | (_fields(method) - ROLE_FIELDS) | _fields(extras)
            | {"optimizer", "adapter"})


def build_stage(stage: str, mapping: Any, seed: int, deepspeed: str | None) -> StageTrainer:
    key = f"trainer.{stage}"
    mapping = dict(mapping or {})
    valid = stage_keys(stage)
    for name in mapping:
        if name not in valid:
            raise unknown_key(f"{key}.{name}", valid)
    method_cls, extras_cls = METHOD_CLASSES[stage]
    loop_keys, method_keys = _fields(LoopConfig) - LOOP_EXCLUDED, _fields(method_cls) - ROLE_FIELDS
    loop = build(LoopConfig, {**{k: v for k, v in mapping.items() if k in loop_keys}, "seed": seed,
                              "deepspeed": deepspeed if stage in TRAINING_STAGES else None}, key)
    optimizer = build(OptimizerConfig, mapping.get("optimizer"), f"{key}.optimizer")
    method_args = {k: v for k, v in mapping.items() if k in method_keys}
    extras = build(extras_cls, {k: v for k, v in mapping.items() if k in _fields(extras_cls)}, key)
    if stage in RL_STAGES:
        method_args["algo"] = stage
        if extras.reward != "model":
            method_args["reward_adapter"] = None
            method_args.setdefault("value_init", "fresh")
    method = build(method_cls, method_args, key)
    adapter = convert(dict, mapping.get("adapter") or {}, f"{key}.adapter")
    return StageTrainer(loop=loop, optimizer=optimizer, method=method, extras=extras, adapter=adapter)


# ------------------------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class RunConfig:
    pipeline: PipelineSpec
    model: ModelSpec
    data: DataSpec
    adapter: dict
    trainer: dict[str, StageTrainer]
    deepspeed: DeepSpeedSpec
    resources: ResourcesSpec
    run: RunSpec
    ray: RaySpec
    tracking: TrackingSpec
    eval: EvalSpec
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def embedded(self) -> bool:
        return self.model.path is None and self.model.gguf_file is None

    @property
    def gguf_path(self) -> str | None:
        """``model.gguf_file`` resolved against ``model.path``; None without a GGUF file."""
        if self.model.gguf_file is None:
            return None
        return os.path.join(self.model.path or "", os.path.expanduser(self.model.gguf_file))

    @property
    def run_dir(self) -> str:
        """``run.dir``, else ``runs/<pipeline>``; under a W&B sweep agent each W&B run gets a directory of its own."""
        if self.run.dir:
            return self.run.dir
        sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
        if sweep and run:
            return os.path.join("runs", f"wandb-{sweep}", run)
        return os.path.join("runs", self.pipeline.name)

    @property
    def eval_reward(self) -> Any:
        """What scores the evaluation: ``eval.reward``, where 'auto' is the ground truth on the embedded task, the
        reward model when an 'rm' stage runs, and 'none' (no scored samples) otherwise."""
        if self.eval.reward != "auto":
            return self.eval.reward
        if self.embedded:
            return "ground_truth"
        return "model" if "rm" in self.pipeline.stages else "none"

    def adapter_settings(self, stage: str) -> dict:
        """The adapter group merged with ``trainer.<stage>.adapter`` overrides, targets filled from the model."""
        own = self.trainer[stage].adapter if stage in self.trainer else {}
        settings = dict(own) if "method" in own else {**self.adapter, **own}  # a method: a whole spec
        if settings.get("target_modules") is None and "target_modules" in settings:
            settings["target_modules"] = self.model.target_modules
        return settings


TOP_LEVEL = ("pipeline", "model", "data", "adapter", "trainer", "deepspeed", "resources", "run", "ray", "tracking",
             "eval")
SPEC_CLASSES = {"pipeline": PipelineSpec, "model": ModelSpec, "data": DataSpec, "deepspeed": DeepSpeedSpec,
                "resources": ResourcesSpec, "run": RunSpec, "ray": RaySpec, "tracking": TrackingSpec,
                "eval": EvalSpec}


def load_run_config(mapping: dict) -> RunConfig:
    """Typed, validated config from the merged mapping. Raises ``ConfigError`` naming the dotted key."""
    for name in mapping:
        if name not in TOP_LEVEL:
            raise unknown_key(str(name), TOP_LEVEL)
    specs = {name: build(cls, mapping.get(name), name) for name, cls in SPEC_CLASSES.items()}
    seed = specs["run"].seed
    trainer_map = mapping.get("trainer") or {}
    if not isinstance(trainer_map, dict):
        raise ConfigError("trainer", trainer_map, "a mapping of stage -> trainer settings")
    for name in trainer_map:
        if name not in METHOD_CLASSES:
            raise unknown_key(f"trainer.{name}", METHOD_CLASSES)
    ds = specs["deepspeed"].config
    trainer = {name: build_stage(name, trainer_map.get(name), seed, ds) for name in METHOD_CLASSES}
    adapter = convert(dict, mapping.get("adapter") or {}, "adapter")
    cfg = RunConfig(adapter=adapter, trainer=trainer, raw=mapping, **specs)
    validate(cfg)
    return cfg


def adapter_config(settings: dict, key: str = "adapter"):
    """The engine's config object for an adapter group mapping (``method`` + the method's fields)."""
    from align.adapters.registry import METHODS

    settings = dict(settings)
    method = str(settings.pop("method", "lora"))
    names = {m.lower(): m for m in METHODS}
    names.setdefault("bottleneck", "ALIGN_BOTTLENECK")
    names.update({"dora": "LORA", "rslora": "LORA"})  # LoRA with use_dora / use_rslora set below
    if method.lower() not in names:
        raise ConfigError(f"{key}.method", method, f"one of {sorted(names)}{suggest(method.lower(), names)}")
    cls = METHODS[names[method.lower()]].config_cls
    if method.lower() in ("dora", "rslora"):
        cls = METHODS["LORA"].config_cls
        settings.setdefault("use_dora" if method.lower() == "dora" else "use_rslora", True)
    settings = {k: v for k, v in settings.items() if v is not None or k != "target_modules"}
    try:
        return build(cls, settings, key)
    except UnknownKeyError as exc:
        if key == "adapter":
            raise
        # Hydra merges a mapping given on the command line into the stage's default spec: keys of another
        # method (trainer.rm.adapter's LoRA r, lora_alpha) stay behind
        raise UnknownKeyError(exc.key, exc.value, f"{exc.allowed} ({method} has no such key; "
                              f"'{key}={{method: {method}}}' is merged into the default {key} of "
                              "configs/trainer/default.yaml, which keeps its other keys: replace the whole "
                              f"spec with '~{key}' '+{key}={{method: {method}}}')") from None


def validate(cfg: RunConfig) -> None:
    """Combinations no single group can check."""
    stages = cfg.pipeline.stages
    if not stages or stages[0] != "base":
        raise ConfigError("pipeline.stages", list(stages), "a list starting with 'base' (it provides the model)")
    if len(set(stages)) != len(stages):
        raise ConfigError("pipeline.stages", list(stages), "each stage at most once")
    for i, stage in enumerate(stages[1:], 1):  # a stage that reads another's artifacts comes after it
        needed = None
        if stage == "rm" and cfg.trainer["rm"].extras.init == "sft":
            needed, hint = "sft", ""
        elif stage in RL_STAGES and cfg.trainer[stage].extras.reward == "model":
            needed, hint = "rm", f" or trainer.{stage}.reward=ground_truth"
        if needed is not None and needed not in stages[:i]:
            raise ConfigError("pipeline.stages", list(stages),
                              f"the stage {stage!r} after ['{needed}'] (it reads their artifacts){hint}")
    if cfg.gguf_path is not None and not os.path.isfile(cfg.gguf_path):
        raise ConfigError("model.gguf_file", cfg.model.gguf_file, "a GGUF model file (absolute, or relative to "
                          f"model.path); {cfg.gguf_path} does not exist")
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.model.device == "cpu":
        raise ConfigError("model.attn_implementation", "flash_attention_2",
                          "'auto', 'sdpa' or 'eager' with model.device=cpu (flash-attention kernels run on GPUs only)")
    if "eval" in stages and stages[-1] != "eval":
        raise ConfigError("pipeline.stages", list(stages), "'eval' as the last stage")
    policy = [s for s in stages if s in POLICY_STAGES]
    if len(policy) > 1:
        raise ConfigError("pipeline.stages", list(stages), f"at most one of {POLICY_STAGES} (got {policy})")
    for stage in TRAINING_STAGES:
        key = f"trainer.{stage}.adapter" if cfg.trainer[stage].adapter else "adapter"
        adapter_config(cfg.adapter_settings(stage), key)
        if stage in POLICY_STAGES and stage in stages and cfg.trainer[stage].adapter and "sft" in stages:
            raise ConfigError(f"trainer.{stage}.adapter", cfg.trainer[stage].adapter,
                              "no overrides when an 'sft' stage runs first: the policy starts as a copy of the SFT "
                              "adapter (set adapter.* or trainer.sft.adapter.* instead)")
    if not cfg.embedded:
        needed = {"sft": "sft", "rm": "preferences", "ppo": "prompts", "grpo": "prompts", "rloo": "prompts"}
        if "dpo" in stages:
            needed["dpo"] = "prompts" if cfg.trainer["dpo"].extras.pairs == "onpolicy" else "preferences"
        for stage, key in needed.items():
            if stage in stages and getattr(cfg.data, key) is None:
                raise ConfigError(f"data.{key}", None, f"a local file for the {stage!r} stage: the embedded task's "
                                  "data only fits the embedded base (model.path=null)")
        if "eval" in stages and cfg.data.eval_prompts is None:
            raise ConfigError("data.eval_prompts", None, "a prompts file for the 'eval' stage, or remove 'eval' "
                              "from pipeline.stages")
    if cfg.resources.num_workers > 1 and cfg.deepspeed.config is None:
        raise ConfigError("resources.num_workers", cfg.resources.num_workers,
                          "1 unless a DeepSpeed config is chosen (deepspeed=zero2|zero3|...): several workers "
                          "train through the DeepSpeed back-end")
    if cfg.deepspeed.config is not None:
        for stage in RL_STAGES:
            if stage in stages and cfg.trainer[stage].method.separate_value_optimizer:
                raise ConfigError(f"trainer.{stage}.separate_value_optimizer", True,
                                  "false with DeepSpeed: one engine updates the policy and value adapters and the "
                                  "value head with one optimizer (and one global gradient-norm clip); or "
                                  "deepspeed=none")
        if cfg.model.quantization != "none" and _zero_stage(cfg.deepspeed.config) == 3:
            raise ConfigError("deepspeed", cfg.deepspeed.name,
                              f"zero2 or zero2_offload with model.quantization={cfg.model.quantization}: ZeRO-3 "
                              "partitions the frozen base's packed 4-bit/8-bit storage, whose gathered weights no "
                              "longer match bitsandbytes' quantization state; ZeRO-2 replicates the quantized base "
                              "on every rank and partitions the adapters' gradients and optimizer state "
                              "(or model.quantization=none for ZeRO-3)")
        for stage in TRAINING_STAGES:  # the stages that train through DeepSpeed
            method, key = trained_adapter_method(cfg, stage)
            if stage in stages and method == "adalora":
                raise ConfigError(key, method, f"another method with DeepSpeed: the {stage!r} stage would "
                                  "train an AdaLoRA adapter, whose rank allocation does not run under "
                                  "DeepSpeed; or deepspeed=none")
    for stage in RL_STAGES:
        if stage in stages and cfg.trainer[stage].loop.precision != "fp32":
            raise ConfigError(f"trainer.{stage}.precision", cfg.trainer[stage].loop.precision,
                              "'fp32' for the RL stages (bf16 is not wired into the RL loop yet)")
    _check_rewards(cfg, stages)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.model.device):
        raise ConfigError("model.device", cfg.model.device, "auto, cpu, cuda or cuda:N")
    _check_ranges(cfg)
    _check_paths(cfg)


def _check_ranges(cfg: RunConfig) -> None:
    """Counts, sizes and limits that are nonsense on their own (a negative CPU count, a held-out split of -5
    rows), refused before anything runs rather than inside the stage that uses them."""
    integers = [("eval.prompts", cfg.eval.prompts, 1), ("eval.max_new_tokens", cfg.eval.max_new_tokens, 1),
                ("eval.pairs", cfg.eval.pairs, 0), ("data.sft_eval_rows", cfg.data.sft_eval_rows, 0),
                ("data.rm_eval_rows", cfg.data.rm_eval_rows, 0),
                ("resources.max_retries", cfg.resources.max_retries, 0),
                ("resources.num_workers", cfg.resources.num_workers, 1)]
    for key, value, low in integers:
        if value < low:
            raise ConfigError(key, value, f"an integer >= {low}")
    if not cfg.eval.temperature > 0:
        raise ConfigError("eval.temperature", cfg.eval.temperature, "a finite number > 0")
    optional = [("resources.num_cpus", cfg.resources.num_cpus, 1, "an integer >= 1, or null for every CPU"),
                ("ray.num_cpus", cfg.ray.num_cpus, 1, "an integer >= 1, or null for every CPU"),
                ("resources.num_gpus", cfg.resources.num_gpus, 0, "a number >= 0, or null for one GPU when "
                 "the cluster has any")]
    for key, value, low, allowed in optional:
        if value is not None and value < low:
            raise ConfigError(key, value, allowed)
    if cfg.resources.memory_gb is not None and not cfg.resources.memory_gb > 0:
        raise ConfigError("resources.memory_gb", cfg.resources.memory_gb, "a number > 0, or null for no reservation")
    d = cfg.data  # the limits every stage's data is prepared with (data.max_length, data.max_prompt_length, ...)
    DataConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length, on_bad_rows=d.on_bad_rows,
               cache_dir=d.cache_dir)


# the data each stage reads (DPO's depends on trainer.dpo.pairs, eval's held-out pairs on eval.pairs)
STAGE_DATA = {"sft": ("sft",), "rm": ("preferences", "preferences_eval"), "ppo": ("prompts",),
              "grpo": ("prompts",), "rloo": ("prompts",), "eval": ("eval_prompts",)}
DATA_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".parquet", ".txt", ".gz", ".bz2", ".xz", ".zst"})
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def data_keys_read(cfg: RunConfig) -> dict[str, str]:
    """{data key: the first stage that reads it} for the pipeline's stages."""
    read: dict[str, str] = {}
    for stage in cfg.pipeline.stages:
        keys = STAGE_DATA.get(stage, ())
        if stage == "dpo":
            pairs = "prompts" if cfg.trainer["dpo"].extras.pairs == "onpolicy" else "preferences"
            keys = (pairs, "preferences_eval")
        if stage == "eval" and cfg.eval.pairs > 0:
            keys = (*keys, "preferences_eval")
        for key in keys:
            read.setdefault(key, stage)
    return read


def looks_like_path(value: str) -> bool:
    """A value that can only mean a local path: it starts with '/', '.' or '~', ends in a data file's extension, or
    has more parts than a Hub dataset's 'owner/name'. A bare name or 'owner/name' may be a Hub dataset, which is
    not for this check to judge (the data layer decides when it reads it)."""
    if value.startswith(("/", ".", "~")) or os.path.isabs(value):
        return True
    if os.path.splitext(value)[1].lower() in DATA_SUFFIXES:
        return True
    separated = "/" in value or (os.sep != "/" and os.sep in value)
    return separated and not _HUB_NAME.fullmatch(value)


def _check_paths(cfg: RunConfig) -> None:
    """What the stages will read exists (checked now, not when a stage starts hours later), and the run's
    directories can be directories."""
    for key, stage in data_keys_read(cfg).items():
        value = getattr(cfg.data, key)
        if value is None or not looks_like_path(value):
            continue  # the embedded task's file, or a dataset name the data layer resolves
        if not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"data.{key}", value, f"an existing data file or datasets directory (the {stage!r} "
                              f"stage reads it); {os.path.abspath(os.path.expanduser(value))} does not exist: "
                              "check the path")
    path = cfg.model.path
    if path is not None and cfg.model.gguf_file is None and not os.path.isdir(os.path.expanduser(path)):
        what = "is a file, not a directory" if os.path.exists(os.path.expanduser(path)) else "does not exist"
        raise ConfigError("model.path", path, f"a local transformers model directory; {path} {what} (a GGUF file "
                          "goes in model.gguf_file)")
    for key, value in (("run.dir", cfg.run_dir), ("run.stage_cache", cfg.run.stage_cache)):
        blocker = _file_in_the_way(value) if value else None
        if blocker is not None:
            raise ConfigError(key, value, f"a directory path; {blocker} is an existing file: remove it or choose "
                              f"another {key}")


def _file_in_the_way(path: str) -> Path | None:
    """The existing non-directory at ``path`` or at one of its parents (which would stop it being created)."""
    full = Path(path).expanduser().absolute()
    for candidate in (full, *full.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _zero_stage(config: str | None) -> int | None:
    """The ZeRO stage a DeepSpeed JSON sets (a path, absolute or under configs/deepspeed/); None when unreadable
    (the back-end reports that file when it starts)."""
    import json

    if config is None:
        return None
    path = Path(config)
    if not path.is_absolute() and not path.is_file():
        path = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / config
    try:
        return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def trained_adapter_method(cfg: RunConfig, stage: str) -> tuple[str, str]:
    """(method, the key that sets it) of the adapter ``stage`` trains: a policy, or a reward model with
    ``init=sft``, starts as a copy of the SFT adapter when an 'sft' stage runs before it."""
    stages = cfg.pipeline.stages
    after_sft = "sft" in stages and stage in stages and stages.index("sft") < stages.index(stage)
    from_sft = stage in POLICY_STAGES or stage == "rm" and cfg.trainer["rm"].extras.init == "sft"
    source = "sft" if after_sft and from_sft else stage
    key = f"trainer.{source}.adapter" if cfg.trainer[source].adapter else "adapter"
    return str(cfg.adapter_settings(source).get("method", "lora")).lower(), f"{key}.method"


def _check_rewards(cfg: RunConfig, stages: tuple[str, ...]) -> None:
    """Rewards must exist (built-in names and parameters, user functions importable), and a learned reward needs
    the rm stage before its user."""
    uses: list[tuple[str, Any]] = []
    if "dpo" in stages and cfg.trainer["dpo"].extras.pairs == "onpolicy":
        uses.append(("trainer.dpo.pair_reward", cfg.trainer["dpo"].extras.pair_reward))
    uses += [(f"trainer.{s}.reward", cfg.trainer[s].extras.reward) for s in RL_STAGES if s in stages]
    if "eval" in stages:
        uses.append(("eval.reward", cfg.eval_reward))
    for key, spec in uses:
        if spec == "none" and key == "eval.reward":  # held-out pairs, KL and samples without scores
            continue
        if spec == "model":
            if key == "trainer.dpo.pair_reward" and not ("rm" in stages and stages.index("rm") < stages.index("dpo")):
                raise ConfigError(key, spec, "a reward function (ground_truth, length, path/to/file.py:function, "
                                  "...), or 'model' with an 'rm' stage before 'dpo' in pipeline.stages to rank the "
                                  "on-policy pairs with the reward model (e.g. 'pipeline.stages=[base,sft,rm,dpo,"
                                  "eval]')")
            if "rm" not in stages:
                raise ConfigError(key, spec, "a reward function, or 'model' with an 'rm' stage in pipeline.stages")
            continue
        from reward.functions import check_reward_spec, spec_names

        if not cfg.embedded and "ground_truth" in spec_names(spec):
            raise ConfigError(key, spec, "a reward for real data: the ground-truth scorer only knows the embedded "
                              "task ('model' for the reward model, a built-in rule, or your own function as "
                              "path/to/file.py:function" + (", or trainer.dpo.pairs=dataset)" if "dpo" in key else ")"))
        try:
            check_reward_spec(spec, key)
        except ValueError as exc:
            raise ConfigError(key, spec, f"a reward that can be built ({exc})") from None


def stage_config(cfg: RunConfig, stage: str) -> dict:
    """The part of the config a stage's result depends on (hashed into its identity in the manifest)."""
    data = as_dict(cfg.data)
    base = {"model": {k: v for k, v in as_dict(cfg.model).items() if k != "name"},
            "data.embedded": data["embedded"]}
    if stage == "base":
        return base
    limits = {k: data[k] for k in ("max_length", "max_prompt_length", "on_bad_rows")}
    out: dict = {"seed": cfg.run.seed, "limits": limits}
    if stage in cfg.trainer:  # under the user's own keys, so a change is reported as trainer.dpo.beta
        st = as_dict(cfg.trainer[stage])
        loop = {k: v for k, v in st["loop"].items() if k not in ("progress", "seed", "deepspeed")}
        method = {k: v for k, v in st["method"].items() if k not in ROLE_FIELDS}
        out[f"trainer.{stage}"] = {**loop, **method, **_identity_extras(stage, st["extras"]),
                                   "optimizer": st["optimizer"]}
        out["adapter"] = cfg.adapter_settings(stage)
        if stage in TRAINING_STAGES:  # the DeepSpeed back-end and its ranks shape the training
            out["deepspeed"] = cfg.deepspeed.config
            out["num_workers"] = cfg.resources.num_workers
    files = {"sft": ("sft",), "rm": ("preferences", "preferences_eval", "rm_eval_rows"),
             "dpo": ("preferences", "preferences_eval", "prompts"), "ppo": ("prompts",), "grpo": ("prompts",),
             "rloo": ("prompts",), "eval": ("eval_prompts",)}
    out["data"] = {k: data[k] for k in files.get(stage, ())}
    if stage == "sft":
        out["data"]["sft_eval_rows"] = data["sft_eval_rows"]
    if stage == "eval":
        out["eval"] = as_dict(cfg.eval)
    return out


def _identity_extras(stage: str, extras: dict) -> dict:
    """The stage's own keys that shape its result. A one-round DPO stage (``rounds=1``, or any DPO on a dataset's
    pairs) leaves out ``rounds``, ``round_reference`` and ``kl_budget`` (which then change nothing), and an unset
    ``kl_budget`` is left out too, so identities stay the ones they had before iterative DPO and the budget existed:
    finished runs and stage caches are still recognised."""
    if stage != "dpo":
        return extras
    if extras.get("rounds") == 1 or extras.get("pairs") == "dataset":
        unused = ("rounds", "round_reference", "kl_budget")
    else:
        unused = ("kl_budget",) if extras.get("kl_budget") is None else ()
    return {k: v for k, v in extras.items() if k not in unused}
