"""``python -m align.sweep sweep=<name> [sweep.key=value ...] [key=value ...]``: a hyper-parameter sweep, one pipeline
run per trial, on Ray Tune.

The sweep file (``configs/sweep/<name>.yaml``) names the pipeline, the dotted keys to vary and the metric. Every
trial's config is composed and validated before anything starts. Stages that every trial shares (same stage
identity, e.g. the base and SFT of a DPO beta sweep) run once, first; trials then find them in the sweep's stage
cache instead of recomputing them. Trials run in Ray Tune (``max_concurrent`` at a time) and are tracked in W&B in
one group named after the sweep. At the end a results table (``results.csv``, ``results.md``) and a reward-KL
plot are written to the sweep directory and the best trial is named. Rerunning the command finishes what is
missing: each trial's run directory skips its finished stages.

    python -m align.sweep sweep=dpo_beta
    python -m align.sweep sweep=dpo_beta sweep.max_concurrent=2 run.dir=runs/my-sweep trainer.dpo.max_steps=200
"""

from __future__ import annotations

import csv
import itertools
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.config.build import build, suggest
from align.config.errors import ConfigError

USAGE = __doc__


@dataclass(frozen=True)
class SweepSpec:
    name: str
    pipeline: str = "dpo"
    method: Literal["grid", "random"] = "grid"
    num_samples: int = 1
    seed: int = 0
    metric: str = "win_rate"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = 1
    parameters: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.parameters:
            raise ConfigError("sweep.parameters", self.parameters, "at least one dotted key with values")
        for key, values in self.parameters.items():
            if isinstance(values, dict):
                if self.method != "random" or not {"low", "high"} <= set(values):
                    raise ConfigError(f"sweep.parameters.{key}", values, "a list of values (grid), or "
                                      "{low, high, log} with sweep.method=random")
            elif not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.parameters.{key}", values, "a non-empty list of values")
        for key in ("num_samples", "max_concurrent"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sweep.{key}", getattr(self, key), "an integer >= 1")


def sweep_options() -> list[str]:
    from align.config.compose import config_dir

    return sorted(p.stem for p in (config_dir() / "sweep").glob("*.yaml") if not p.name.endswith(".wandb.yaml"))


def load_sweep(name: str, changes: dict[str, Any]) -> SweepSpec:
    from omegaconf import OmegaConf

    from align.config.compose import config_dir

    options = sweep_options()
    if name not in options:
        raise ConfigError("sweep", name, f"one of {options}{suggest(name, options)}")
    data = OmegaConf.to_container(OmegaConf.load(config_dir() / "sweep" / f"{name}.yaml"), resolve=False)
    # the run-config overrides stay as written: composing them resolves ${oc.env:...} and keeps those values
    # out of every file and W&B config (align.config.compose); the sweep's own fields are resolved here
    overrides = data.pop("overrides", None)
    data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    if overrides is not None:
        data["overrides"] = overrides
    for key, value in changes.items():
        data[key] = value
    return build(SweepSpec, data, "sweep")


def _fmt(value: Any) -> str:
    return str(value).replace(" ", "")


def expand_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Each trial's {dotted key: value}: the grid's combinations (times num_samples), or random draws."""
    keys = list(spec.parameters)
    if spec.method == "grid":
        combos = list(itertools.product(*(spec.parameters[k] for k in keys)))
        return [dict(zip(keys, combo)) for _ in range(spec.num_samples) for combo in combos]
    rng = random.Random(spec.seed)
    trials = []
    for _ in range(spec.num_samples):
        trial = {}
        for key in keys:
            values = spec.parameters[key]
            if isinstance(values, list):
                trial[key] = rng.choice(values)
            elif values.get("log"):
                trial[key] = math.exp(rng.uniform(math.log(values["low"]), math.log(values["high"])))
            else:
                trial[key] = rng.uniform(values["low"], values["high"])
        trials.append(trial)
    return trials


def trial_overrides(spec: SweepSpec, common: list[str], trial: dict[str, Any], index: int, sweep_dir: Path) -> list[str]:
    return [f"pipeline={spec.pipeline}", *spec.overrides, *common, *(f"{k}={_fmt(v)}" for k, v in trial.items()),
            f"run.dir={sweep_dir / 'trials' / f'trial-{index:03d}'}", f"run.stage_cache={sweep_dir / 'stage_cache'}",
            f"run.name={spec.name}-trial-{index:03d}", f"tracking.group={spec.name}", "ray.enabled=false"]


def hub_wanted(spec: SweepSpec, common: list[str]) -> bool:
    """Whether a trial sets ``data.allow_hub=true`` (read from the merged YAML, before anything is validated)."""
    from align.config.compose import compose_mapping

    return any((compose_mapping(trial_overrides(spec, common, t, i, Path("."))).get("data") or {}).get("allow_hub")
               is True for i, t in enumerate(expand_trials(spec)))


def shared_stages(configs: list) -> list[str]:
    """The leading stages whose identity is the same in every trial."""
    from pipelines.runner import stage_digests

    digests = [stage_digests(cfg) for cfg in configs]
    shared = []
    for stage in configs[0].pipeline.stages:
        if all(d.get(stage) == digests[0][stage] for d in digests):
            shared.append(stage)
        else:
            break
    return shared


def _run_trial(config: dict) -> None:
    """A Ray Tune trainable: one pipeline run in this worker process, reporting the eval stage's metrics."""
    from ray import tune

    from align.config.compose import compose_run_config
    from pipelines.runner import run_pipeline

    cfg = compose_run_config(config["table"][config["index"]])
    manifest = run_pipeline(cfg, log=lambda line: print(f"[trial {config['index']}] {line}", flush=True))
    metrics = dict(manifest.stages.get("eval", {}).get("metrics", {}))
    # time this trial spent (stages reused from the stage cache cost it nothing)
    metrics["seconds"] = sum(r.get("seconds") or 0 for r in manifest.stages.values() if not r.get("reused_from"))
    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def run_sweep(spec: SweepSpec, common: list[str], sweep_dir: Path, log=print) -> list[dict]:
    import ray
    from ray import tune

    from align.config.compose import compose_run_config
    from pipelines.runner import run_pipeline

    trials = expand_trials(spec)
    overrides = [trial_overrides(spec, common, t, i, sweep_dir) for i, t in enumerate(trials)]
    configs = [compose_run_config(o) for o in overrides]  # every trial validated before anything runs
    shared = shared_stages(configs)
    log(f"sweep {spec.name}: {len(trials)} trials over {', '.join(spec.parameters)}; shared stages: "
        f"{', '.join(shared) or 'none'}")
    if shared:  # run once; trials reuse them from the stage cache
        prefix = overrides[0][:-5] + [f"run.dir={sweep_dir / 'shared'}", f"run.stage_cache={sweep_dir / 'stage_cache'}",
                                      f"run.name={spec.name}-shared", f"tracking.group={spec.name}",
                                      "ray.enabled=false", f"pipeline.stages=[{','.join(shared)}]"]
        run_pipeline(compose_run_config(prefix), log=lambda line: log(f"[shared] {line}"), report=False)
    cpus = configs[0].resources.num_cpus or 1
    from pipelines.executors import start_ray

    started = start_ray(configs[0], sweep_dir)
    try:
        tuner = tune.Tuner(
            tune.with_resources(_run_trial, {"cpu": cpus}),
            param_space={"index": tune.grid_search(list(range(len(trials)))), "table": overrides},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, num_samples=1),
            run_config=tune.RunConfig(name=spec.name, storage_path=str((sweep_dir / "tune").resolve()),
                                      verbose=0),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    rows = []
    for result in grid:
        index = result.config["index"]
        metrics = result.metrics or {}
        row = {"trial": f"trial-{index:03d}", **trials[index],
               **{k: metrics.get(k) for k in ("win_rate", "policy_score_mean", "kl_to_reference", "seconds")},
               "error": str(result.error)[:200] if result.error else ""}
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    write_results(spec, rows, sweep_dir, log)
    return rows


def write_results(spec: SweepSpec, rows: list[dict], sweep_dir: Path, log=print) -> None:
    from pipelines.report import plot_frontier

    columns = list(rows[0]) if rows else []
    with (sweep_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    scored = [r for r in rows if isinstance(r.get(spec.metric), (int, float))]
    best = (max if spec.mode == "max" else min)(scored, key=lambda r: r[spec.metric]) if scored else None
    lines = [f"# Sweep {spec.name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    if best is not None:
        lines += ["", f"Best trial ({spec.mode} {spec.metric}): **{best['trial']}** "
                      f"({', '.join(f'{k}={best[k]}' for k in spec.parameters)}; {spec.metric} {_cell(best[spec.metric])})"]
    points = [{"label": ", ".join(f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in spec.parameters),
               "kl": r.get("kl_to_reference"), "reward": r.get("policy_score_mean")} for r in scored
              if isinstance(r.get("kl_to_reference"), (int, float))]
    if points:
        plot_frontier(points, sweep_dir / "frontier.png")
        lines += ["", "![reward-KL frontier](frontier.png)"]
    (sweep_dir / "results.md").write_text("\n".join(lines) + "\n")
    for line in lines[2:]:
        log(line)
    log(f"results: {sweep_dir / 'results.md'}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    from align.offline import default_offline

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    name, changes, common, sweep_dir = None, {}, [], None
    try:
        for arg in argv:
            key, sep, value = arg.partition("=")
            if not sep:
                raise ConfigError("argument", arg, "sweep=<name>, sweep.<key>=<value> or key=value overrides")
            if key == "sweep":
                name = value
            elif key.startswith("sweep."):
                changes[key.split(".", 1)[1]] = _parse_value(value)
            elif key == "run.dir":
                sweep_dir = Path(value)
            else:
                common.append(arg)
        if name is None:
            raise ConfigError("sweep", None, f"sweep=<name>, one of {sweep_options()}")
        spec = load_sweep(name, changes)
        default_offline(allow_hub=hub_wanted(spec, common))  # before anything imports the Hugging Face libraries
        sweep_dir = (sweep_dir or Path("runs") / f"sweep-{spec.name}").resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        rows = run_sweep(spec, common, sweep_dir)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0 if rows and not any(r["error"] for r in rows) else 1


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


if __name__ == "__main__":
    raise SystemExit(main())
