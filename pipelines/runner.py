"""Run a pipeline: for each stage, decide (from the manifest) whether to skip, resume or (re)start it, run it
through the executor (a Ray task, or this process), and record the outcome atomically.

A stage's identity is the hash of the part of the config it depends on, the content hashes of the data files it
reads (and, for the base, of the model's files), and the identities of the stages before it. Rerunning the same
command therefore skips every finished stage whose artifacts still have the content hashes recorded when it
finished, and which was made from the artifacts its upstream stages hold now; a stage left running or failed
resumes from its checkpoints; a changed stage is restarted and, through the chained hashes, so is every stage
after it. Nothing is deleted: a restarted stage's directory is moved to ``<stage>.old-<n>/``. The run directory is
locked while a run owns it (``pipelines.lock``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from align.config.compose import redacted
from align.config.run import RunConfig, stage_config
from align.durable import fsync_dir, write_text_durable

from .executors import Executor, make_executor
from .lock import RunLock
from .manifest import HashCache, Manifest, config_hash, hash_path, now, write_json_atomic
from .stage_cache import StageCache

Log = Callable[[str], None]
DATA_KEYS = ("sft", "preferences", "preferences_eval", "prompts", "eval_prompts")


class StageFailed(RuntimeError):
    pass


def stage_digests(cfg: RunConfig, hashes: HashCache | None = None) -> dict[str, str]:
    """Each stage's identity (its config, its data files' contents, and the stages before it). The base's includes
    the content of the model directory (digests cached by size and modification time: ``HashCache``)."""
    hashes = hashes or HashCache()
    digests: dict[str, str] = {}
    for stage in cfg.pipeline.stages:
        scfg = stage_config(cfg, stage)
        files = {k: hash_path(v, hashes) for k, v in scfg.get("data", {}).items()
                 if k in DATA_KEYS and isinstance(v, str) and Path(v).exists()}
        if stage == "base" and cfg.model.path and Path(cfg.model.path).is_dir():
            files["model"] = hash_path(cfg.model.path, hashes)
        if stage == "base" and cfg.gguf_path and Path(cfg.gguf_path).is_file():
            files["gguf"] = hash_path(cfg.gguf_path, hashes)
        digests[stage] = config_hash({"stage": stage, "config": scfg, "files": files}, list(digests.values()))
    hashes.save()
    return digests


def write_config(cfg: RunConfig, run_dir: Path) -> None:
    """``config.yaml``: the resolved config, with every value from an environment interpolation (a W&B key in
    ``${oc.env:WANDB_API_KEY}``) written as ``<from env: NAME>``; the running stages get the real value."""
    from omegaconf import OmegaConf

    write_text_durable(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redacted(cfg.raw))))


def run_pipeline(cfg: RunConfig, log: Log = print, executor: Executor | None = None,
                 report: bool = True) -> Manifest:
    """Run (or finish) ``cfg``'s pipeline in ``cfg.run_dir``; returns the final manifest. The run directory is
    locked for the duration (``RunDirBusy`` when another run holds it; nothing is touched then)."""
    run_dir = Path(cfg.run_dir).resolve()
    lock = RunLock(run_dir)
    note = lock.acquire()
    try:
        if note:
            log(f"[run] {note}")
        return _run_locked(cfg, run_dir, lock, log, executor, report)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, run_dir: Path, lock: RunLock, log: Log, executor: Executor | None,
                report: bool) -> Manifest:
    hashes = HashCache()
    digests = stage_digests(cfg, hashes)  # reads every input before anything in the run directory changes
    write_config(cfg, run_dir)
    manifest = Manifest.load(run_dir)
    manifest.owner = dict(lock.owner)
    lock.on_heartbeat = manifest.heartbeat
    manifest.pipeline = cfg.pipeline.name
    # stages of another pipeline or an earlier version of this one stay on disk, but leave the manifest's order
    manifest.stages = {s: manifest.stages[s] for s in cfg.pipeline.stages if s in manifest.stages} | {
        s: r for s, r in manifest.stages.items() if s not in cfg.pipeline.stages}
    manifest.save()
    cache = StageCache(cfg.run.stage_cache) if cfg.run.stage_cache else None
    stages = cfg.pipeline.stages
    total_start = time.perf_counter()
    try:
        executor = executor or make_executor(cfg)
        for i, stage in enumerate(stages):
            digest = digests[stage]
            rec = manifest.stages.get(stage, {})
            upstream = {s: manifest.stages[s].get("artifact_hashes", {}) for s in stages[:i]}
            later = ", ".join(stages[i + 1:]) or "none"
            changed_upstream = [s for s, h in (rec.get("upstream") or {}).items() if upstream.get(s, h) != h]
            if rec.get("config_hash") == digest and changed_upstream:
                moved = archive_stage(run_dir, stage)
                log(f"[{stage}] the artifacts of {', '.join(changed_upstream)} changed since it ran"
                    f"{_moved(moved, run_dir)}: restarting it")
                rec = {}
            elif rec.get("status") == "done" and rec.get("config_hash") == digest:
                problems = artifact_problems(run_dir, rec, hashes)
                if not problems:
                    log(f"[{stage}] done earlier with the same config: skipped")
                    continue
                moved = archive_artifacts(run_dir, stage, rec, [name for name, _ in problems])
                log(f"[{stage}] finished earlier, but {'; '.join(why for _, why in problems)}"
                    f"{_moved(moved, run_dir)}: running it again (from its checkpoints)")
            elif rec.get("config_hash") and rec["config_hash"] != digest:
                moved = archive_stage(run_dir, stage)
                changed = _what_changed(rec.get("config"), redacted(stage_config(cfg, stage)))
                log(f"[{stage}] {changed} since the last run"
                    f"{_moved(moved, run_dir)}: restarting it, and the stages after it ({later})")
                rec = {}
            elif rec.get("status") in ("running", "failed"):
                log(f"[{stage}] {rec['status']} in an earlier run: resuming from its last checkpoint")
            if cache is not None and _restore_cached(cache, stage, digest, run_dir, upstream, hashes):
                entry = cache.record(stage, digest)
                manifest.stages[stage] = {**entry, "reused_from": str(cache.path(stage, digest))}
                manifest.save()
                log(f"[{stage}] reused from the stage cache ({cache.path(stage, digest)})")
                continue
            attempts = int(rec.get("attempts", 0)) + 1
            manifest.stages[stage] = {"status": "running", "config_hash": digest, "upstream": upstream,
                                      "config": redacted(stage_config(cfg, stage)),  # no secret from ${oc.env:...}
                                      "started": now(), "attempts": attempts,
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
                raise StageFailed(f"stage {stage!r} failed: {exc}\n({_rerun_hint(exc)}; details in "
                                  f"{manifest.path})") from exc
            # the base stage's own record is not written yet: it takes the base from its result
            base = result if stage == "base" else manifest.stages.get("base", {})
            manifest.update(stage, status="done", finished=now(), seconds=round(time.perf_counter() - start, 1),
                            metrics=_clean(result["metrics"]), artifacts=result["artifacts"],
                            artifact_hashes=hash_artifacts(run_dir, result["artifacts"], hashes),
                            inputs=result["inputs"], device=result.get("device"),
                            base={"path": base.get("artifacts", {}).get("model_dir"),
                                  "fingerprint": base.get("inputs", {}).get("model/config.json")})
            hashes.save()
            if cache is not None:
                cache.publish(stage, digest, run_dir, manifest.stages[stage])
            log(f"[{stage}] done in {manifest.stages[stage]['seconds']} s")
    finally:
        if executor is not None:
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


# ------------------------------------------------------------------------------------------------ artifacts
def _artifact_path(run_dir: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else run_dir / path


def hash_artifacts(run_dir: Path, artifacts: dict, hashes: HashCache | None = None) -> dict[str, str]:
    """Content hashes of a stage's artifacts (files or directories; checkpoints excluded)."""
    return {name: hash_path(_artifact_path(run_dir, value), hashes) for name, value in artifacts.items()
            if isinstance(value, str) and _artifact_path(run_dir, value).exists()}


def artifact_problems(run_dir: Path, rec: dict, hashes: HashCache | None = None) -> list[tuple[str, str]]:
    """(artifact, what is wrong) for each artifact of a finished stage that is missing or whose content no
    longer matches the hash recorded when the stage finished (a truncated or edited file)."""
    problems = []
    recorded = rec.get("artifact_hashes") or {}
    for name, value in (rec.get("artifacts") or {}).items():
        if not isinstance(value, str):
            continue
        path = _artifact_path(run_dir, value)
        if not path.exists():
            problems.append((name, f"{value} is missing"))
        elif name in recorded and hash_path(path, hashes) != recorded[name]:
            problems.append((name, f"{value} changed on disk since (its content hash differs)"))
    return problems


def archive_stage(run_dir: Path, stage: str) -> Path | None:
    """Move ``<stage>/`` (outputs, checkpoints) aside to ``<stage>.old-<n>/`` instead of deleting it."""
    source = run_dir / stage
    if not source.exists():
        return None
    target = _free_archive(run_dir, stage)
    os.replace(source, target)
    fsync_dir(run_dir)
    return target


def archive_artifacts(run_dir: Path, stage: str, rec: dict, names: list[str]) -> Path | None:
    """Move the named artifacts of ``stage`` (those inside the run directory) into ``<stage>.old-<n>/``, keeping
    the stage's checkpoints in place so that it resumes."""
    target = None
    stage_dir = (run_dir / stage).resolve()
    for name in names:
        path = _artifact_path(run_dir, rec["artifacts"][name]).resolve()
        if not path.exists() or stage_dir not in path.parents:  # only what the stage itself wrote
            continue
        target = target or _free_archive(run_dir, stage)
        destination = target / path.relative_to(stage_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    if target is not None:
        fsync_dir(run_dir)
    return target


def _free_archive(run_dir: Path, stage: str) -> Path:
    n = 1
    while (run_dir / f"{stage}.old-{n}").exists():
        n += 1
    return run_dir / f"{stage}.old-{n}"


def _moved(moved: Path | None, run_dir: Path) -> str:
    return f" (its earlier files are kept in {moved.relative_to(run_dir)}/)" if moved is not None else ""


def _restore_cached(cache: StageCache, stage: str, digest: str, run_dir: Path, upstream: dict,
                    hashes: HashCache) -> bool:
    """Copy a finished stage in from the stage cache when it was made from the same upstream artifacts and its
    files arrive intact."""
    try:
        entry = cache.record(stage, digest)
    except (OSError, ValueError):
        return False
    if entry.get("upstream", upstream) != upstream:
        return False
    archive_stage(run_dir, stage)
    if not cache.restore(stage, digest, run_dir):
        return False
    recorded = entry.get("artifact_hashes") or {}
    current = hash_artifacts(run_dir, entry.get("artifacts") or {}, hashes)
    return all(current.get(name) == value for name, value in recorded.items())


def _rerun_hint(exc: BaseException) -> str:
    """What to do after a failed stage: a rerun resumes a crash, but not a mistake in the config, data or code."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps the stage's exception
    if isinstance(cause, (ValueError, TypeError, KeyError, ImportError, FileNotFoundError, NotImplementedError,
                          PermissionError)):
        return ("this will fail again as it is: fix its cause, then rerun the same command (finished stages are "
                "kept and skipped)")
    return "rerun the same command to resume it from its last checkpoint"


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
