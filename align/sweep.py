"""``python -m align.sweep sweep=<name> [sweep.key=value ...] [key=value ...]``: a hyper-parameter sweep, one pipeline
run per trial, on Ray Tune.

The sweep file (``configs/sweep/<name>.yaml``) names the pipeline, the dotted keys to vary and the metric, or several
*arms* (one pipeline and its own keys each, e.g. DPO's beta next to PPO's KL target), whose trials are drawn on one
reward-KL picture. Every trial's config is composed and validated before anything starts. Stages that every trial
shares (same stage identity, e.g. the base and SFT) run once, first, and so do the stages every trial of one arm
shares (the reward model of a PPO arm); trials then find them in the sweep's stage cache instead of recomputing
them. Trials run in Ray Tune (``max_concurrent`` at a time) and are tracked in W&B in one group named after the
sweep. At the end a results table (``results.csv``, ``results.md``) and a reward-KL plot (``frontier.png``, one
series per arm) are written to the sweep directory and the best trial is named. Rerunning the command finishes what
is missing: each trial's run directory skips its finished stages.

    python -m align.sweep sweep=dpo_beta
    python -m align.sweep sweep=dpo_beta sweep.max_concurrent=2 run.dir=runs/my-sweep trainer.dpo.max_steps=200
    python -m align.sweep sweep=frontier
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


ARM_FIELDS = ("pipeline", "parameters", "overrides")


@dataclass(frozen=True)
class Arm:
    """One pipeline and the keys it varies; a sweep without ``arms`` is one arm named after the sweep."""

    name: str
    pipeline: str
    parameters: dict
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trial:
    index: int
    arm: Arm
    values: dict  # dotted key -> value of this trial


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
    arms: dict = field(default_factory=dict)  # name -> {pipeline, parameters, overrides}

    def __post_init__(self) -> None:
        if self.arms and self.parameters:
            raise ConfigError("sweep.parameters", self.parameters, "no top-level parameters when sweep.arms is set "
                                                                    "(each arm names its own)")
        if not self.arms and not self.parameters:
            raise ConfigError("sweep.parameters", self.parameters, "at least one dotted key with values (or "
                                                                    "sweep.arms: name -> {pipeline, parameters})")
        if not isinstance(self.arms, dict):
            raise ConfigError("sweep.arms", self.arms, "a mapping: arm name -> {pipeline, parameters, overrides}")
        for name, arm in self.arms.items():
            if not isinstance(arm, dict) or not arm.get("parameters"):
                raise ConfigError(f"sweep.arms.{name}", arm, "a mapping with parameters (dotted key -> values) and "
                                                              "optionally pipeline and overrides")
            unknown = sorted(set(arm) - set(ARM_FIELDS))
            if unknown:
                raise ConfigError(f"sweep.arms.{name}.{unknown[0]}", arm[unknown[0]],
                                  f"one of the arm fields {list(ARM_FIELDS)}{suggest(unknown[0], ARM_FIELDS)}")
            if not isinstance(arm.get("overrides", []), list) or not all(
                    isinstance(o, str) and "=" in o for o in arm.get("overrides", [])):
                raise ConfigError(f"sweep.arms.{name}.overrides", arm.get("overrides"), "a list of key=value strings")
            if not isinstance(arm.get("pipeline", self.pipeline), str):
                raise ConfigError(f"sweep.arms.{name}.pipeline", arm.get("pipeline"), "a pipeline name")
        for arm in self.arm_list():
            where = f"sweep.arms.{arm.name}.parameters" if self.arms else "sweep.parameters"
            for key, values in arm.parameters.items():
                if isinstance(values, dict):
                    if self.method != "random" or not {"low", "high"} <= set(values):
                        raise ConfigError(f"{where}.{key}", values, "a list of values (grid), or "
                                          "{low, high, log} with sweep.method=random")
                elif not isinstance(values, list) or not values:
                    raise ConfigError(f"{where}.{key}", values, "a non-empty list of values")
        for key in ("num_samples", "max_concurrent"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sweep.{key}", getattr(self, key), "an integer >= 1")

    def arm_list(self) -> list[Arm]:
        if not self.arms:
            return [Arm(self.name, self.pipeline, dict(self.parameters))]
        return [Arm(name, arm.get("pipeline", self.pipeline), dict(arm["parameters"]),
                    tuple(arm.get("overrides", ()))) for name, arm in self.arms.items()]

    def keys(self) -> list[str]:
        """Every swept key, in order of first appearance."""
        return list(dict.fromkeys(k for arm in self.arm_list() for k in arm.parameters))


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


def expand_trials(spec: SweepSpec) -> list[Trial]:
    """Every trial, arm by arm: the grid's combinations (times num_samples), or random draws."""
    rng = random.Random(spec.seed)
    trials: list[Trial] = []
    for arm in spec.arm_list():
        keys = list(arm.parameters)
        if spec.method == "grid":
            combos = list(itertools.product(*(arm.parameters[k] for k in keys)))
            draws = [dict(zip(keys, combo)) for _ in range(spec.num_samples) for combo in combos]
        else:
            draws = []
            for _ in range(spec.num_samples):
                draw = {}
                for key in keys:
                    values = arm.parameters[key]
                    if isinstance(values, list):
                        draw[key] = rng.choice(values)
                    elif values.get("log"):
                        draw[key] = math.exp(rng.uniform(math.log(values["low"]), math.log(values["high"])))
                    else:
                        draw[key] = rng.uniform(values["low"], values["high"])
                draws.append(draw)
        trials += [Trial(len(trials) + i, arm, draw) for i, draw in enumerate(draws)]
    return trials


def trial_overrides(spec: SweepSpec, common: list[str], trial: Trial, sweep_dir: Path) -> list[str]:
    """A trial's run overrides: its pipeline, the sweep's and its arm's overrides, the command line's, its values,
    then its place in the sweep (the last five, which the shared-stage runs replace)."""
    index = trial.index
    return [f"pipeline={trial.arm.pipeline}", *spec.overrides, *trial.arm.overrides, *common,
            *(f"{k}={_fmt(v)}" for k, v in trial.values.items()),
            f"run.dir={sweep_dir / 'trials' / f'trial-{index:03d}'}", f"run.stage_cache={sweep_dir / 'stage_cache'}",
            f"run.name={spec.name}-trial-{index:03d}", f"tracking.group={spec.name}", "ray.enabled=false"]


def hub_wanted(spec: SweepSpec, common: list[str]) -> bool:
    """Whether a trial sets ``data.allow_hub=true`` (read from the merged YAML, before anything is validated)."""
    from align.config.compose import compose_mapping

    return any((compose_mapping(trial_overrides(spec, common, t, Path("."))).get("data") or {}).get("allow_hub")
               is True for t in expand_trials(spec))


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


def shared_plan(trials: list[Trial], configs: list) -> list[tuple[str, int, list[str]]]:
    """What to compute once before the trials: ``(who, first trial, stages)``, first the stages every trial shares,
    then, per arm of two or more trials, the further stages all of that arm's trials share."""
    common = shared_stages(configs)
    plan = [("all", 0, common)] if common else []
    for name in dict.fromkeys(t.arm.name for t in trials):
        members = [i for i, t in enumerate(trials) if t.arm.name == name]
        if len(members) < 2:
            continue
        stages = shared_stages([configs[i] for i in members])
        if stages[len(common):] and stages[:len(common)] == common:
            plan.append((name, members[0], stages))
    return plan


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


# the eval stage's numbers each trial's row carries
RESULT_METRICS = ("win_rate", "wins", "ties", "losses", "policy_score_mean", "reference_score_mean", "kl_to_reference",
                  "seconds")


def run_sweep(spec: SweepSpec, common: list[str], sweep_dir: Path, log=print) -> list[dict]:
    import ray
    from ray import tune

    from align.config.compose import compose_run_config
    from pipelines.runner import run_pipeline

    trials = expand_trials(spec)
    overrides = [trial_overrides(spec, common, t, sweep_dir) for t in trials]
    configs = [compose_run_config(o) for o in overrides]  # every trial validated before anything runs
    plan = shared_plan(trials, configs)
    arms = spec.arm_list()
    what = "; ".join(f"{a.name} ({a.pipeline}): {', '.join(a.parameters)}" for a in arms) if spec.arms else \
        ", ".join(spec.parameters)
    common_stages = plan[0][2] if plan and plan[0][0] == "all" else []
    log(f"sweep {spec.name}: {len(trials)} trials over {what}; shared stages: {', '.join(common_stages) or 'none'}"
        + "".join(f"; arm {who} also shares: {', '.join(stages[len(common_stages):])}"
                  for who, _, stages in plan if who != "all"))
    for who, first, stages in plan:  # run once; trials reuse them from the stage cache
        tag = "shared" if who == "all" else f"shared-{who}"
        prefix = overrides[first][:-5] + [f"run.dir={sweep_dir / tag}", f"run.stage_cache={sweep_dir / 'stage_cache'}",
                                          f"run.name={spec.name}-{tag}", f"tracking.group={spec.name}",
                                          "ray.enabled=false", f"pipeline.stages=[{','.join(stages)}]"]
        run_pipeline(compose_run_config(prefix), log=lambda line, tag=tag: log(f"[{tag}] {line}"), report=False)
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
    keys = spec.keys()
    rows = []
    for result in grid:
        trial = trials[result.config["index"]]
        metrics = result.metrics or {}
        row = {"trial": f"trial-{trial.index:03d}", **({"arm": trial.arm.name} if spec.arms else {}),
               **{k: trial.values.get(k) for k in keys},
               **{k: metrics.get(k) for k in RESULT_METRICS},
               "error": str(result.error)[:200] if result.error else ""}
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    write_results(spec, rows, sweep_dir, log)
    return rows


def write_results(spec: SweepSpec, rows: list[dict], sweep_dir: Path, log=print) -> None:
    """results.csv, results.md (the table, the best trial, per arm too) and frontier.png (one series per arm)."""
    from pipelines.report import plot_frontier

    columns = list(dict.fromkeys(c for row in rows for c in row))
    with (sweep_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    arms = {arm.name: arm for arm in spec.arm_list()}
    lines = [f"# Sweep {spec.name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    groups = [(None, rows)] + ([(name, [r for r in rows if r.get("arm") == name]) for name in arms] if spec.arms
                               else [])
    for name, members in groups:
        scored = [r for r in members if isinstance(r.get(spec.metric), (int, float))]
        if not scored:
            continue
        best = (max if spec.mode == "max" else min)(scored, key=lambda r: r[spec.metric])
        keys = arms[best["arm"]].parameters if spec.arms else spec.parameters
        head = f"Best trial ({spec.mode} {spec.metric})" if name is None else f"Best of arm {name}"
        lines += ["", f"{head}: **{best['trial']}** "
                  f"({', '.join(f'{k}={best[k]}' for k in keys)}; {spec.metric} {_cell(best[spec.metric])})"]
    points = []
    for row in rows:
        if not isinstance(row.get("kl_to_reference"), (int, float)):
            continue
        keys = arms[row["arm"]].parameters if spec.arms else spec.parameters
        point = {"label": ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys),
                 "kl": row["kl_to_reference"], "reward": row.get("policy_score_mean")}
        if spec.arms:
            point["series"] = row["arm"]
        points.append(point)
    if points:
        plot_frontier(points, sweep_dir / "frontier.png", ylabel="mean score of the policy (eval reward)",
                      title=f"{spec.name}: reward vs KL to the reference")
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
