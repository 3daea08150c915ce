"""From a ``RunConfig`` to the memory prediction of each training stage (``align.models.memory``): the base's
shape (its config.json, or the embedded base's config), the roles each stage holds, its micro-batch and its
precision / DeepSpeed setup, and the ``--cfg job`` lines. Stdlib only at import, like ``memory``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .memory import (
    RL_STAGES,
    TRAINING_STAGES,
    ModelShape,
    Role,
    Setup,
    StageMemory,
    Unpredictable,
    Workload,
    Zero,
    predict,
)


def embedded_shape(embedded) -> ModelShape:
    """The embedded base's shape from ``model.embedded`` (``align.models.embedded`` builds it with tied
    embeddings and the task tokenizer's vocabulary)."""
    from align.data.synthetic.lexicon import all_words
    from align.data.synthetic.tokenizer import SPECIAL_TOKENS

    e = embedded
    return ModelShape(len(SPECIAL_TOKENS) + len(all_words()), e.hidden_size, e.num_layers, e.intermediate_size,
                      e.num_heads, e.num_kv_heads, e.hidden_size // e.num_heads, tie_word_embeddings=True)


def run_shape(cfg) -> ModelShape:
    """The base's shape: the embedded config, or ``model.path``'s config.json (nothing is loaded)."""
    if cfg.model.gguf_file is not None:
        raise Unpredictable("model.gguf_file: a GGUF model's shape is known once the base stage has converted it; "
                            "point model.path at the converted directory to see it here")
    if cfg.model.path is None:
        return embedded_shape(cfg.model.embedded)
    path = Path(os.path.expanduser(cfg.model.path)) / "config.json"
    if not path.is_file():
        raise Unpredictable(f"model.path={cfg.model.path} has no config.json: the model's shape is unknown "
                            "without loading it")
    try:
        return ModelShape.from_config(json.loads(path.read_text()), str(path))
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, a key missing: Unpredictable is a ValueError too
        if isinstance(exc, Unpredictable):
            raise
        raise Unpredictable(f"{path}: not a transformers config this can read ({type(exc).__name__}: {exc})") from None


def stage_roles(cfg, stage: str) -> list[Role]:
    """The adapters a stage holds, as ``pipelines/stages.py`` loads and creates them: the policy (and the reward
    model with ``init=sft``, the value model with ``value_init=reward``) starts as a copy of the adapter before it;
    DPO holds the frozen reward model when it ranks the on-policy pairs (``pair_reward=model``)."""
    stages, settings = cfg.pipeline.stages, cfg.adapter_settings

    def before(name: str) -> bool:
        return name in stages and stages.index(name) < stages.index(stage)

    rm_from_sft = cfg.trainer["rm"].extras.init == "sft"
    if stage == "sft":
        return [Role("sft", settings("sft"), True)]
    if stage == "rm":
        if rm_from_sft:
            return [Role("sft", settings("sft"), False), Role("reward", settings("sft"), True, "score")]
        return [Role("reward", settings("rm"), True, "score")]
    has_sft = before("sft")
    roles = [Role("sft", settings("sft"), False)] if has_sft else []
    policy = Role("policy", settings("sft") if has_sft else settings(stage), True)
    st = cfg.trainer[stage]
    reward = settings("sft") if rm_from_sft else settings("rm")
    if stage == "dpo":  # the reward model ranks the on-policy pairs with pair_reward=model: loaded, frozen
        ranks_by_model = st.extras.pairs == "onpolicy" and st.extras.pair_reward == "model" and before("rm")
        return [*roles, *([Role("reward", reward, False, "score")] if ranks_by_model else []), policy]
    if st.extras.reward == "model" and before("rm"):
        roles.append(Role("reward", reward, False, "score"))
    roles.append(policy)
    if st.method.uses_value:
        value = reward if st.method.value_init == "reward" else settings(stage)
        roles.append(Role("value", value, True, "value"))
    return roles


def stage_workload(cfg, stage: str) -> Workload:
    """SFT: micro_batch_size rows; RM and DPO: 2 x micro_batch_size (chosen and rejected in one forward); all of
    data.max_length tokens (batches are padded to their longest row: the worst case). RL: minibatch_size rows of
    max_prompt_length + max_new_tokens, logits at the new tokens; generation rows as ``generate_rollout`` batches."""
    st, data = cfg.trainer[stage], cfg.data
    chunk = getattr(st.method, "chunk_size", 4096)
    if stage in RL_STAGES:
        m, rollout = st.method, st.method.rollout
        tokens = data.max_prompt_length + rollout.max_new_tokens
        return Workload(m.minibatch_size, tokens, m.minibatch_size * rollout.max_new_tokens,
                        min(rollout.generation_batch_size, m.samples_per_step), tokens, chunk)
    rows = st.loop.micro_batch_size * (1 if stage == "sft" else 2)
    return Workload(rows, data.max_length, rows * (data.max_length - 1), chunk_size=chunk)


def read_deepspeed(path: str) -> dict:
    """A DeepSpeed JSON as given, or from the repository's configs/deepspeed/ (as the stages resolve it)."""
    candidate = Path(path)
    if not candidate.is_file():
        from align.config.compose import config_dir

        candidate = config_dir() / "deepspeed" / path
    if not candidate.is_file():
        raise Unpredictable(f"deepspeed.config={path}: no such file")
    try:
        return json.loads(candidate.read_text())
    except ValueError as exc:
        raise Unpredictable(f"deepspeed.config={path}: not JSON ({exc})") from None


def stage_setup(cfg, stage: str) -> Setup:
    st = cfg.trainer[stage]
    if st.loop.deepspeed is None:
        return Setup(cfg.model.quantization, cfg.model.dtype, st.loop.precision, st.optimizer.name)
    zero = Zero.from_json(cfg.deepspeed.name, read_deepspeed(st.loop.deepspeed))
    return Setup(cfg.model.quantization, cfg.model.dtype, st.loop.precision, "adamw", cfg.resources.num_workers,
                 zero)


def predict_stage(cfg, stage: str, shape: ModelShape | None = None) -> StageMemory:
    shape = shape if shape is not None else run_shape(cfg)
    return predict(stage, shape, stage_roles(cfg, stage), stage_workload(cfg, stage), stage_setup(cfg, stage))


def describe_memory(cfg) -> list[str]:
    """One line per training stage of the pipeline (``--cfg job``); 'not predicted (why)' where it cannot be."""
    stages = [s for s in cfg.pipeline.stages if s in TRAINING_STAGES]
    try:
        shape = run_shape(cfg)
    except Unpredictable as exc:
        return [f"memory {s}: not predicted ({exc})" for s in stages]
    lines = []
    for stage in stages:
        try:
            lines.append(predict_stage(cfg, stage, shape).line())
        except Unpredictable as exc:
            lines.append(f"memory {stage}: not predicted ({exc})")
    return lines
