"""``python -m align.run [--cfg job] [group=option ...] [key=value ...]``: run a pipeline.

With no argument it runs ``pipeline=dpo`` (base -> sft -> dpo -> eval) on the embedded task on CPU, in
``runs/dpo``. Rerunning the same command skips finished stages and resumes a broken one. Examples::

    python -m align.run pipeline=ppo
    python -m align.run trainer.dpo.beta=0.2 run.dir=runs/beta02
    python -m align.run model=llama model.path=/models/Llama-3-8B data=files data.sft=... data.preferences=...
    python -m align.run --cfg job            # the resolved config and the batch arithmetic, then exit
"""

from __future__ import annotations

import sys

from align.config.errors import ConfigError

USAGE = __doc__


def describe_batches(cfg) -> list[str]:
    """Per training stage: rows per optimizer step and how they are made (workers x micro-batches x rows), and for
    RL the prompts, samples per prompt, minibatches and optimizer steps per iteration."""
    workers = cfg.resources.num_workers if cfg.deepspeed.config else 1
    lines = []
    for stage in cfg.pipeline.stages:
        if stage not in cfg.trainer:
            continue
        st = cfg.trainer[stage]
        loop = st.loop
        if stage in ("ppo", "grpo", "rloo"):
            m = st.method
            samples = m.samples_per_step
            minibatches = -(-samples // m.minibatch_size)
            prompts, rows = m.rollout.prompts_per_step, m.minibatch_size  # per rank
            if workers > 1:  # every rank rolls out its share; a global minibatch is one per rank
                prompts = f"{workers * prompts} ({workers} worker(s) x {prompts})"
                rows = f"{workers} x {rows}"
            lines.append(f"{stage}: {loop.max_steps} iterations x {prompts} prompts x "
                         f"{m.rollout.group_size} samples per prompt = {workers * samples} samples per iteration; "
                         f"{m.ppo_epochs} epochs x {minibatches} minibatches of {rows} = "
                         f"{m.ppo_epochs * minibatches} optimizer steps per iteration")
            continue
        unit = {"sft": "rows", "rm": "pairs", "dpo": "pairs"}[stage]
        per_step = workers * loop.micro_batch_size * loop.grad_accum_steps
        rounds = st.extras.rounds if stage == "dpo" and st.extras.pairs == "onpolicy" else 1
        lines.append(f"{stage}: {loop.max_steps} steps x {per_step} {unit} per step ({workers} worker(s) x "
                     f"{loop.grad_accum_steps} micro-batch(es) x {loop.micro_batch_size} {unit}) = "
                     f"{loop.max_steps * per_step} {unit}"
                     + (f" per round, x {rounds} rounds = {rounds * loop.max_steps * per_step} {unit}"
                        + (f" at most (fewer within the KL budget of {st.extras.kl_budget} nats)"
                           if st.extras.kl_budget is not None else "")
                        if rounds > 1 else ""))
    return lines


def parse_args(argv: list[str]) -> tuple[list[str], str | None]:
    overrides, show = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg in ("--cfg", "-c"):  # --cfg job (Hydra's spelling); the value is optional
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            show = "job"
            if nxt in ("job", "all"):
                show, i = nxt, i + 1
            i += 1
            continue
        if arg.startswith("--cfg="):
            show = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError("argument", arg, "key=value overrides, group=option, --cfg job or --help")
        elif "=" not in arg and not arg.startswith("~"):
            raise ConfigError("argument", arg, "key=value (e.g. pipeline=ppo or trainer.dpo.beta=0.2)")
        else:
            overrides.append(arg)
        i += 1
    return overrides, show


def check_data_sources(cfg) -> None:
    """Refuse, before anything starts, a data key of a stage that names no local path but a Hub dataset while
    ``data.allow_hub`` is false (``DataError`` naming the key, e.g. ``data.sft='my_sft_data'``)."""
    from align.config.run import stage_config
    from align.data.sources import check_hub_name

    for stage in cfg.pipeline.stages:
        for key, value in stage_config(cfg, stage).get("data", {}).items():
            if isinstance(value, str):
                check_hub_name(value, f"data.{key}", cfg.data.allow_hub)


def main(argv: list[str] | None = None) -> int:
    from align.config.compose import compose_mapping, redacted
    from align.config.run import load_run_config
    from align.offline import default_offline

    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides, show = parse_args(argv)
        mapping = compose_mapping(overrides)
        # before validation imports the Hugging Face libraries, which read HF_HUB_OFFLINE once, at import
        default_offline(allow_hub=(mapping.get("data") or {}).get("allow_hub") is True)
        cfg = load_run_config(mapping)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if show is not None:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.create(redacted(cfg.raw))), end="")
        print("# derived batch arithmetic")
        for line in describe_batches(cfg):
            print(f"#   {line}")
        from align.models.memory_plan import describe_memory

        for line in describe_memory(cfg):  # per rank, predicted from the config (docs/pipelines.md)
            print(f"#   {line}")
        print(f"# run directory: {cfg.run_dir}")
        return 0
    from align.data.errors import DataError

    try:
        check_data_sources(cfg)
    except DataError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from pipelines.runner import StageFailed, run_pipeline

    try:
        run_pipeline(cfg)
    except ConfigError as exc:  # found once the run starts: run.dir owned by another run
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
