"""Run a pipeline: for each stage, decide (from the manifest) whether to skip, resume or (re)start it, run it
through the executor (a Ray task, or this process), and record the outcome atomically.

A stage's identity is the hash of the part of the config it depends on, the content hashes of the data files it
reads, and the identities of the stages before it. Rerunning the same command therefore skips every finished
stage; a stage left running or failed resumes from its checkpoints; a changed stage is restarted and, through
the chained hashes, so is every stage after it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from align.config.run import RunConfig, stage_config

from .executors import Executor, make_executor
from .manifest import Manifest, config_hash, hash_path, now, write_json_atomic
from .stage_cache import StageCache

Log = Callable[[str], None]
DATA_KEYS = ("sft", "preferences", "preferences_eval", "prompts", "eval_prompts")


class StageFailed(RuntimeError):
    pass


def stage_digests(cfg: RunConfig) -> dict[str, str]:
    """Each stage's identity (its config, its data files' contents, and the stages before it)."""
    digests: dict[str, str] = {}
    for stage in cfg.pipeline.stages:
        scfg = stage_config(cfg, stage)
        files = {k: hash_path(v) for k, v in scfg.get("data", {}).items()
                 if k in DATA_KEYS and isinstance(v, str) and Path(v).exists()}
        if stage == "base" and cfg.model.path and Path(cfg.model.path).is_dir():
            files["model"] = _weights_signature(Path(cfg.model.path))
        digests[stage] = config_hash({"stage": stage, "config": scfg, "files": files}, list(digests.values()))
    return digests


def _weights_signature(model_dir: Path) -> list:
    """Names, sizes and modification times of a model directory's files: new weights at the same path make a
    new base (hashing gigabytes of weights on every run would be too slow)."""
    return sorted((str(p.relative_to(model_dir)), p.stat().st_size, int(p.stat().st_mtime))
                  for p in model_dir.rglob("*") if p.is_file())


def write_config(cfg: RunConfig, run_dir: Path) -> None:
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(cfg.raw))
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "config.yaml")


def run_pipeline(cfg: RunConfig, log: Log = print, executor: Executor | None = None,
                 report: bool = True) -> Manifest:
    """Run (or finish) ``cfg``'s pipeline in ``cfg.run_dir``; returns the final manifest."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir)
    manifest = Manifest.load(run_dir)
    manifest.pipeline = cfg.pipeline.name
    digests = stage_digests(cfg)
    # stages of another pipeline or an earlier version of this one stay on disk, but leave the manifest's order
    manifest.stages = {s: manifest.stages[s] for s in cfg.pipeline.stages if s in manifest.stages} | {
        s: r for s, r in manifest.stages.items() if s not in cfg.pipeline.stages}
    manifest.save()
    cache = StageCache(cfg.run.stage_cache) if cfg.run.stage_cache else None
    executor = executor or make_executor(cfg)
    stages = cfg.pipeline.stages
    total_start = time.perf_counter()
    try:
        for i, stage in enumerate(stages):
            digest = digests[stage]
            rec = manifest.stages.get(stage, {})
            if manifest.is_done(stage, digest):
                log(f"[{stage}] done earlier with the same config: skipped")
                continue
            if rec.get("config_hash") and rec["config_hash"] != digest:
                later = ", ".join(stages[i + 1:]) or "none"
                log(f"[{stage}] {_what_changed(rec.get('config'), stage_config(cfg, stage))} since the last run: "
                    f"restarting it, and the stages after it ({later})")
                _clear_stage(run_dir / stage)
                rec = {}
            elif rec.get("status") in ("running", "failed"):
                log(f"[{stage}] {rec['status']} in an earlier run: resuming from its last checkpoint")
            if cache is not None and cache.restore(stage, digest, run_dir):
                entry = cache.record(stage, digest)
                manifest.stages[stage] = {**entry, "reused_from": str(cache.path(stage, digest))}
                manifest.save()
                log(f"[{stage}] reused from the stage cache ({cache.path(stage, digest)})")
                continue
            attempts = int(rec.get("attempts", 0)) + 1
            manifest.stages[stage] = {"status": "running", "config_hash": digest,
                                      "config": stage_config(cfg, stage), "started": now(), "attempts": attempts,
                                      "reused_from": None, "error": None}
            manifest.save()
            log(f"[{stage}] running (attempt {attempts})")
            start = time.perf_counter()
            try:
                result = executor.run(stage, cfg, run_dir)
            except BaseException as exc:
                manifest.update(stage, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                                seconds=round(time.perf_counter() - start, 1))
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise StageFailed(f"stage {stage!r} failed: {exc}\n(rerun the same command to resume it from its "
                                  f"last checkpoint; details in {manifest.path})") from exc
            # the base stage's own record is not written yet: it takes the base from its result
            base = result if stage == "base" else manifest.stages.get("base", {})
            manifest.update(stage, status="done", finished=now(), seconds=round(time.perf_counter() - start, 1),
                            metrics=_clean(result["metrics"]), artifacts=result["artifacts"],
                            inputs=result["inputs"], device=result.get("device"), base={"path": base.get("artifacts", {}).get("model_dir"),
                                                           "fingerprint": base.get("inputs", {})
                                                           .get("model/config.json")})
            if cache is not None:
                cache.publish(stage, digest, run_dir, manifest.stages[stage])
            log(f"[{stage}] done in {manifest.stages[stage]['seconds']} s")
    finally:
        executor.close()
        write_json_atomic(run_dir / "timings.json", {
            "total_seconds": round(time.perf_counter() - total_start, 1),
            **{s: manifest.stages.get(s, {}).get("seconds") for s in stages}})
        if report:  # also after a failure: the report shows what finished and the error
            from .report import summary_lines, write_report

            write_report(run_dir)
            for line in summary_lines(run_dir):
                log(line)
    return manifest


def _what_changed(old: dict | None, new: dict) -> str:
    """'trainer.loop.max_steps 6 -> 8' for the stage's own settings, or 'an earlier stage changed'."""
    from .context import flatten

    a, b = flatten(old or {}), flatten(new)
    changed = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not changed:
        return "an earlier stage or a data file changed"
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return "config changed (" + ", ".join(changed[:3]) + more + ")"


def _clean(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def _clear_stage(stage_dir: Path) -> None:
    """Remove a stale stage's outputs (checkpoints of another config must never be resumed)."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
