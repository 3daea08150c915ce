"""A run's report: training curves per stage, a reward–KL frontier for sweeps, ``report.md`` and a short summary.

Everything is read from the run directory the pipeline runner leaves behind::

    <run>/manifest.json          stages in pipeline order, each with status, seconds, final metrics, reuse
    <run>/<stage>/metrics.jsonl  one JSON object per logged step ({"step", "time", "<metric>": number, ...})
    <run>/eval/result.json       the final policy-vs-reference evaluation

Missing files, empty logs, truncated lines and non-finite values are skipped, never fatal: a report can be
written for a run that is still going or that failed half-way. Plots use matplotlib's ``Figure`` with the
Agg canvas directly (no pyplot), so no GUI backend is touched and no global figure state is kept.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from pipelines.manifest import Manifest

PLOTS = "plots"
REPORT = "report.md"
RL_STAGES = ("ppo", "grpo", "rloo")
RL_CURVES = ("reward/score_mean", "kl", "entropy")
MAX_PANELS = 6
MAX_KEY_METRICS = 4
EXAMPLES = 3
EXAMPLE_CHARS = 300

# The final metrics shown first in the stages table, by stage; the rest of the row is filled with eval/* ones.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "base": ("perplexity", "eval/perplexity", "eval/nll"),
    "sft": ("eval/nll", "eval/perplexity", "eval/loss"),
    "rm": ("eval/accuracy", "eval/margin", "eval/loss"),
    "dpo": ("eval/accuracy", "eval/margin", "eval/nll", "eval/loss"),
    "eval": ("win_rate", "policy_score_mean", "reference_score_mean", "pairs_accuracy", "kl_to_reference"),
    **{rl: ("reward/score_mean", "kl", "entropy", "response_length") for rl in RL_STAGES},
}
# Logged every step but rarely what a reader wants to see in a one-line summary.
NOISY = {"step", "time", "train/lr", "train/grad_norm", "kl_coef"}

Series = dict[str, list[tuple[float, float]]]
ROUND_KEY = re.compile(r"round-(\d+)/(.+)")  # a metric of one round of a stage trained in rounds


# --------------------------------------------------------------------------------------------- reading


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_series(path: str | Path) -> Series:
    """Each numeric metric of a ``metrics.jsonl`` as sorted ``(step, value)`` pairs, finite values only.

    Unreadable lines are skipped; a missing or empty file gives ``{}``. When a step is logged twice (a
    stage resumed or retried) the later line wins, so the curve shows the attempt that finished.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    by_key: dict[str, dict[float, float]] = {}
    for index, line in enumerate(path.read_text(errors="replace").splitlines()):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step", index)
        if not _finite(step):
            continue
        for key, value in row.items():
            if key not in ("step", "time") and _finite(value):
                by_key.setdefault(key, {})[float(step)] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _stage_dirs(run_dir: Path, manifest: Manifest) -> list[str]:
    """Stages in pipeline order (the manifest's), then any other directory holding a ``metrics.jsonl``."""
    stages = list(manifest.stages)
    extra = sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl")
                   if p.parent.name not in stages and ".old-" not in p.parent.name)  # not archived stages
    return stages + [name for name in extra if name != PLOTS]


# --------------------------------------------------------------------------------------------- plots


def _panels(stage: str, series: Series) -> list[tuple[str, list[str]]]:
    """(title, keys drawn on it) per subplot: loss, eval/* (with train/* of the same name), RL curves."""
    panels: list[tuple[str, list[str]]] = []
    used: set[str] = set()

    def add(title: str, keys: Iterable[str]) -> None:
        keys = [k for k in keys if k in series and k not in used]
        if keys and len(panels) < MAX_PANELS:
            panels.append((title, keys))
            used.update(keys)

    add("loss", ["train/loss", "eval/loss"])
    if stage in RL_STAGES or any(key in series for key in RL_CURVES):
        for key in RL_CURVES:
            add(key, [key])
    for key in sorted(k for k in series if k.startswith("eval/")):
        name = key.split("/", 1)[1]
        add(name, [f"train/{name}", key])
    if len(panels) <= 1:  # nothing but the loss: show the method's own training curves instead
        for key in sorted(k for k in series if k.startswith("train/") and k not in NOISY):
            add(key.split("/", 1)[1], [key])
    if not panels:  # an unfamiliar log: whatever is numeric
        for key in sorted(k for k in series if k not in NOISY):
            add(key, [key])
    return panels


def _save_png(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def _plot_stage(stage: str, series: Series, path: Path) -> Path | None:
    panels = _panels(stage, series)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(stage)
    return _save_png(fig, path)


def plot_stage_curves(run_dir: str | Path) -> list[Path]:
    """One ``plots/<stage>.png`` per stage whose ``metrics.jsonl`` has something to draw; their paths."""
    run_dir = Path(run_dir)
    paths = []
    for stage in _stage_dirs(run_dir, Manifest.load(run_dir)):
        series = read_series(run_dir / stage / "metrics.jsonl")
        path = _plot_stage(stage, series, run_dir / PLOTS / f"{stage}.png") if series else None
        if path is not None:
            paths.append(path)
    return paths


def pareto_front(points: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The points no other point beats on both axes (lower KL and higher reward), by increasing KL."""
    front: list[Mapping[str, Any]] = []
    for point in sorted(points, key=lambda p: (p["kl"], -p["reward"])):
        if not front or point["reward"] > front[-1]["reward"]:
            front.append(point)
    return front


def series_fronts(points: Iterable[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
    """Each series' own Pareto front (``series`` of a point; None for points without one), in first-seen order."""
    points = [p for p in points if _finite(p.get("kl")) and _finite(p.get("reward"))]
    names = dict.fromkeys(p.get("series") for p in points)
    return {name: pareto_front([p for p in points if p.get("series") == name]) for name in names}


def plot_frontier(points: list[dict], path: str | Path, *, ylabel: str = "mean reward",
                  title: str = "reward vs KL to reference") -> Path:
    """A reward–KL scatter for a sweep, one labelled dot per ``{"label", "kl", "reward"}``, frontier joined.

    Points with a ``series`` (a sweep's arm: DPO, PPO, ...) get one colour and marker per series, each series' own
    Pareto front joined by a solid line, and a legend; the front over all points is the dashed grey line."""
    path = Path(path)
    points = [p for p in points if _finite(p.get("kl")) and _finite(p.get("reward"))]
    series = list(dict.fromkeys(p.get("series") for p in points))
    several = series != [None] and bool(points)
    fig = Figure(figsize=(7.5, 5.5) if several else (6, 4.5), layout="constrained")
    ax = fig.subplots()
    if points:
        markers = "osD^vP*Xh<>"
        fronts = series_fronts(points)
        for number, name in enumerate(series):
            members = [p for p in points if p.get("series") == name]
            color = f"C{number % 10}"
            ax.scatter([p["kl"] for p in members], [p["reward"] for p in members], zorder=3, color=color,
                       marker=markers[number % len(markers)], label=name if several else None)
            if several and len(fronts[name]) > 1:
                ax.plot([p["kl"] for p in fronts[name]], [p["reward"] for p in fronts[name]], "-", color=color,
                        alpha=0.6)
        for point in points:
            ax.annotate(str(point.get("label", "")), (point["kl"], point["reward"]), textcoords="offset points",
                        xytext=(4, 4), fontsize="x-small" if several else "small")
        front = pareto_front(points)
        ax.plot([p["kl"] for p in front], [p["reward"] for p in front], "--", color="grey", alpha=0.5,
                label="frontier (all)" if several else "frontier")
        if several:
            ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
    kls = [p["kl"] for p in points]
    log_x = bool(kls) and min(kls) > 0 and max(kls) / min(kls) > 20  # a wide range: low-KL points stay apart
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("KL to reference (nats per response" + (", log scale)" if log_x else ")"))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both" if log_x else "major")
    return _save_png(fig, path)


# --------------------------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 4) -> str:
    """A metric for a table: integers as such, floats to ``digits`` significant figures, others verbatim."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e6):
        return str(int(value))
    return f"{value:.{digits}g}"


def _fixed(value: Any, decimals: int = 3) -> str:
    return f"{value:.{decimals}f}" if _finite(value) else "n/a"


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if _finite(value) else "n/a"


def _duration(seconds: Any) -> str:
    if not _finite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _last_values(series: Series) -> dict[str, float]:
    return {key: points[-1][1] for key, points in series.items() if points}


def key_metrics(stage: str, metrics: Mapping[str, Any], limit: int = MAX_KEY_METRICS) -> dict[str, Any]:
    """Up to ``limit`` of a stage's final metrics: the stage's preferred ones, then eval/*, then the rest."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in NOISY}
    kind = stage if stage in KEY_METRICS else next((rl for rl in RL_STAGES if stage.startswith(rl)), stage)
    order = [k for k in KEY_METRICS.get(kind, ()) if k in numeric]
    order += sorted(k for k in numeric if k.startswith("eval/") and k not in order)
    order += [k for k in numeric if k not in order]
    return {key: numeric[key] for key in order[:limit]}


def _status(record: Mapping[str, Any]) -> str:
    status = str(record.get("status", "pending"))
    if record.get("reused_from"):
        status += f" (reused from `{record['reused_from']}`)"
    return status


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _stages_table(run_dir: Path, manifest: Manifest) -> list[str]:
    lines = ["| stage | status | seconds | key metrics |", "|---|---|---:|---|"]
    for stage, record in manifest.stages.items():
        metrics = record.get("metrics") or _last_values(read_series(run_dir / stage / "metrics.jsonl"))
        shown = ", ".join(f"{k} {_num(v)}" for k, v in key_metrics(stage, metrics).items()) or "-"
        seconds = _fixed(record.get("seconds"), 1) if _finite(record.get("seconds")) else "-"
        lines.append(f"| {stage} | {_md_cell(_status(record))} | {seconds} | {_md_cell(shown)} |")
    errors = [(s, r["error"]) for s, r in manifest.stages.items() if r.get("status") == "failed" and r.get("error")]
    for stage, error in errors:
        lines += ["", f"**{stage} failed:** {_md_cell(_truncate(str(error), EXAMPLE_CHARS))}"]
    return lines


def _rounds_section(manifest: Manifest) -> list[str]:
    """A table per stage that trained in rounds (iterative DPO's ``round-<r>/<key>`` metrics); none otherwise."""
    lines: list[str] = []
    for stage, record in manifest.stages.items():
        rounds: dict[int, dict[str, Any]] = {}
        for key, value in (record.get("metrics") or {}).items():
            match = ROUND_KEY.fullmatch(key)
            if match:
                rounds.setdefault(int(match[1]), {})[match[2]] = value
        if not rounds:
            continue
        metrics = record.get("metrics") or {}
        with_kl = any("kl_to_sft" in m for m in rounds.values())
        lines += [f"## {stage} rounds", "",
                  "Held-out accuracy and margin: the implicit reward beta*log(pi/pi_ref) against each round's own "
                  "reference." + (" KL to SFT: nats per response on samples of the round's policy (measured "
                                  "before the next round, for the KL budget)." if with_kl else ""), "",
                  "| round | pairs | held-out accuracy | margin | eval loss | train loss | seconds |"
                  + (" KL to SFT |" if with_kl else ""),
                  "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_kl else "")]
        for number, m in sorted(rounds.items()):
            if "train_pairs" not in m and "seconds" not in m:
                continue  # only measured (a KL), never trained
            lines.append(f"| {number} | {_num(m.get('train_pairs'))} | {_percent(m.get('eval/rewards/accuracy'))} | "
                         f"{_fixed(m.get('eval/rewards/margin'))} | {_fixed(m.get('eval/loss'))} | "
                         f"{_fixed(m.get('train/loss'))} | {_fixed(m.get('seconds'), 1)} |"
                         + (f" {_fixed(m.get('kl_to_sft'))} |" if with_kl else ""))
        trained, planned = metrics.get("rounds_trained"), metrics.get("rounds")
        if _finite(trained) and _finite(planned) and trained < planned:
            lines += ["", f"Stopped after round {_num(trained)} of {_num(planned)}: the KL to SFT plus the last "
                          f"round's increase ({_fixed(metrics.get('kl_projected'))} nats) would pass the KL budget "
                          f"of {_num(metrics.get('kl_budget'))} nats."]
        lines.append("")
    return lines


def _truncate(text: str, limit: int = EXAMPLE_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks in ``text``, so the block cannot be closed early."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _example_block(index: int, example: Mapping[str, Any], policy: str, reference: str) -> list[str]:
    body = "\n".join([
        f"PROMPT: {_truncate(str(example.get('prompt', '')))}",
        "",
        f"POLICY ({policy}, score {_fixed(example.get('policy_score'))}): {_truncate(str(example.get('policy', '')))}",
        "",
        f"REFERENCE ({reference}, score {_fixed(example.get('reference_score'))}): "
        f"{_truncate(str(example.get('reference', '')))}",
    ])
    fence = _fence(body)
    return [f"**Example {index}**", "", f"{fence}text", body, fence, ""]


def _eval_section(result: Mapping[str, Any]) -> list[str]:
    if not result:
        return ["## Evaluation", "", "No evaluation result (`eval/result.json`) yet.", ""]
    policy, reference = str(result.get("policy", "policy")), str(result.get("reference", "reference"))
    scored = "win_rate" in result
    lines = ["## Evaluation", "",
             f"`{policy}` against `{reference}` on {result.get('prompts', '?')} prompts, "
             + (f"scored by {result.get('reward', 'the reward')}." if scored else
                "not scored (eval.reward=none: no reward model or function was given)."), "",
             "| | policy | reference |", "|---|---:|---:|"]
    if scored:
        lines.append(f"| mean score | {_fixed(result.get('policy_score_mean'))} ± "
                     f"{_fixed(result.get('policy_score_std'))} | {_fixed(result.get('reference_score_mean'))} ± "
                     f"{_fixed(result.get('reference_score_std'))} |")
    lines.append(f"| mean length | {_fixed(result.get('policy_length'), 1)} | "
                 f"{_fixed(result.get('reference_length'), 1)} |")
    if "pairs_accuracy" in result:
        lines.append(f"| held-out pairs: chosen more likely | {_percent(result.get('pairs_policy_logp_accuracy'))} | "
                     f"{_percent(result.get('pairs_reference_logp_accuracy'))} |")
    lines.append("")
    if scored:
        lines.append(f"- **win-rate:** {_percent(result.get('win_rate'))} ({result.get('wins', '?')} wins / "
                     f"{result.get('ties', '?')} ties / {result.get('losses', '?')} losses)")
    lines.append(f"- **KL to reference:** {_fixed(result.get('kl_to_reference'))} nats per response")
    if "pairs_accuracy" in result:
        lines.append(f"- **held-out preference accuracy:** {_percent(result.get('pairs_accuracy'))} of "
                     f"{result.get('pairs', '?')} pairs ranked right by the implicit reward beta*log(pi/pi_ref), "
                     f"mean margin {_fixed(result.get('pairs_margin'))} (chosen {_fixed(result.get('pairs_chosen_reward'))}, "
                     f"rejected {_fixed(result.get('pairs_rejected_reward'))})")
    lines.append("")
    examples = [e for e in result.get("examples") or [] if isinstance(e, Mapping)][:EXAMPLES]
    if examples:
        lines += ["### Examples", ""]
        for index, example in enumerate(examples, 1):
            lines += _example_block(index, example, policy, reference)
    return lines


# --------------------------------------------------------------------------------------------- report


def write_report(run_dir: str | Path) -> Path:
    """Draw the stage curves and write ``<run>/report.md`` (atomically); its path."""
    run_dir = Path(run_dir)
    manifest = Manifest.load(run_dir)
    plots = plot_stage_curves(run_dir)
    lines = [f"# {manifest.pipeline or 'pipeline'} run — {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Run directory: `{run_dir}`" + ("; resolved config: [config.yaml](config.yaml)"
                                              if (run_dir / "config.yaml").is_file() else ""), "",
             "## Stages", "", *_stages_table(run_dir, manifest), "", *_rounds_section(manifest)]
    lines += _eval_section(_read_json(run_dir / "eval" / "result.json"))
    if plots:
        lines += ["## Training curves", ""]
        lines += [f"![{p.stem}]({PLOTS}/{p.name})\n" for p in plots]
    path = run_dir / REPORT
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path


def summary_lines(run_dir: str | Path) -> list[str]:
    """A few printable lines for the end of a run: the stages with status and time, then the evaluation."""
    run_dir = Path(run_dir)
    manifest = Manifest.load(run_dir)
    stages = " | ".join(f"{stage} {_status(rec)} {_duration(rec.get('seconds'))}".replace("`", "")
                        for stage, rec in manifest.stages.items())
    total = sum(r["seconds"] for r in manifest.stages.values() if _finite(r.get("seconds")))
    lines = [f"{manifest.pipeline or 'pipeline'} run {run_dir} ({_duration(total)} of stage time)",
             f"stages: {stages or 'none'}"]
    result = _read_json(run_dir / "eval" / "result.json")
    if result:
        parts = []
        if "win_rate" in result:
            parts += [f"win-rate {_percent(result.get('win_rate'))} ({result.get('wins', '?')}/"
                      f"{result.get('ties', '?')}/{result.get('losses', '?')} W/T/L)",
                      f"score {_fixed(result.get('policy_score_mean'))} vs {_fixed(result.get('reference_score_mean'))}"]
        if "pairs_accuracy" in result:
            parts.append(f"held-out pair accuracy {_percent(result.get('pairs_accuracy'))} "
                         f"(margin {_fixed(result.get('pairs_margin'))})")
        parts.append(f"KL {_fixed(result.get('kl_to_reference'))} nats")
        lines.append("eval: " + " | ".join(parts))
    if (run_dir / REPORT).is_file():
        lines.append(f"report: {run_dir / REPORT}")
    return lines
