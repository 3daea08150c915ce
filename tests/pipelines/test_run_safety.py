"""Run safety: a rerun never loses finished work, one run owns a run directory, artifacts are verified before a
stage is skipped, and every write that costs work to lose is flushed. Each test is the probe that found the
problem (tiny embedded pipeline, in this process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from pipelines.lock import LOCK_FILE, RunDirBusy, RunLock
from pipelines.manifest import HashCache, Manifest
from pipelines.runner import stage_digests, write_config

from .test_runner import TINY, files_of, ran, run, said, skipped

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny dpo run; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(run_dir)
    return run_dir


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# ------------------------------------------------------------------------------------------------ lose nothing
def test_a_mistyped_data_path_touches_nothing(copy):
    """Rerunning a finished run with data.sft pointing nowhere deleted the finished sft/adapter and its
    checkpoints before the missing file was noticed."""
    sft_before, manifest_before = files_of(copy / "sft"), (copy / "manifest.json").read_bytes()
    with pytest.raises(ConfigError) as error:
        run(copy, "data.sft=/nonexistent/sft.jsonl")
    assert error.value.key == "data.sft"
    assert files_of(copy / "sft") == sft_before
    assert (copy / "manifest.json").read_bytes() == manifest_before
    assert not list(copy.glob("*.old-*"))


def test_touching_or_rewriting_files_keeps_every_identity(tmp_path, finished):
    """A touch of the model files or a copy without preserved times invalidated every stage (identity held
    mtimes); a change of content still does."""
    base_dir = Path(Manifest.load(finished).stages["base"]["artifacts"]["model_dir"])
    data_dir = Path(Manifest.load(finished).stages["base"]["artifacts"]["data_dir"])
    model, sft = tmp_path / "model", tmp_path / "sft.jsonl"
    import shutil

    shutil.copytree(base_dir, model)
    shutil.copyfile(data_dir / "sft.jsonl", sft)
    overrides = [*TINY, f"model.path={model}", f"data.sft={sft}", "pipeline.stages=[base,sft]",
                 f"run.dir={tmp_path / 'run'}"]
    hashes = HashCache(tmp_path / "hashes.json")
    before = stage_digests(compose_run_config(overrides), hashes)

    later = time.time() + 3600
    for path in [*model.rglob("*"), sft]:
        if path.is_file():
            path.write_bytes(path.read_bytes())  # a copy without preserved times: new mtime, same bytes
            os.utime(path, (later, later))
    assert stage_digests(compose_run_config(overrides), hashes) == before
    assert stage_digests(compose_run_config(overrides), HashCache(tmp_path / "other.json")) == before

    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    after = stage_digests(compose_run_config(overrides), hashes)
    assert after["base"] != before["base"] and after["sft"] != before["sft"]


def test_a_truncated_adapter_is_not_skipped(copy, finished):
    """A truncated sft/adapter_model.safetensors passed: every stage was 'done, skipped'."""
    weights = copy / "sft" / "adapter" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    manifest, lines = run(copy)
    (line,) = [x for x in said(lines, "sft") if "finished earlier" in x]
    assert "sft/adapter changed on disk since (its content hash differs)" in line
    assert "(its earlier files are kept in sft.old-1/)" in line
    assert (copy / "sft.old-1" / "adapter" / "adapter_model.safetensors").read_bytes() == whole[: len(whole) // 2]
    assert ran(lines) == ["sft"]  # resumed from its last checkpoint: the same adapter, so dpo and eval stand
    assert skipped(lines) == ["base", "dpo", "eval"]
    assert files_of(copy / "sft" / "adapter") == files_of(finished / "sft" / "adapter")
    assert manifest.stages["sft"]["attempts"] == 2


def test_artifact_hashes_are_recorded_and_chained(finished, copy):
    stages = Manifest.load(finished).stages
    assert set(stages["sft"]["artifact_hashes"]) == {"adapter"}
    assert stages["sft"]["artifact_hashes"]["adapter"].startswith("sha256:")
    assert stages["dpo"]["upstream"]["sft"] == stages["sft"]["artifact_hashes"]
    assert stages["eval"]["upstream"]["dpo"] == stages["dpo"]["artifact_hashes"]

    # the sft adapter dpo was trained from is not the one there now: dpo must not be skipped
    manifest = Manifest.load(copy)
    manifest.stages["dpo"]["upstream"]["sft"] = {"adapter": "sha256:" + "0" * 64}
    manifest.save()
    before = files_of(copy / "dpo")
    manifest, lines = run(copy)
    (line,) = [x for x in said(lines, "dpo") if "restarting" in x]
    assert "the artifacts of sft changed since it ran" in line and "dpo.old-1/" in line
    assert "dpo" in ran(lines) and skipped(lines)[:2] == ["base", "sft"]
    assert files_of(copy / "dpo.old-1") == before
    assert manifest.stages["dpo"]["upstream"]["sft"] == manifest.stages["sft"]["artifact_hashes"]


# ------------------------------------------------------------------------------------------------ one owner
def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pipelines.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_run_dir_is_refused_and_a_crashed_owner_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    owner = _hold_lock(run_dir)
    try:
        with pytest.raises(RunDirBusy) as error:
            run(run_dir)
        message = str(error.value)
        assert error.value.key == "run.dir"
        assert f"in use by pid {owner.pid} on host {socket.gethostname()}" in message
        assert "Wait for that run to finish or stop it, or choose another run.dir" in message
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing else was touched
    finally:
        owner.kill()
        owner.wait()
    lock = RunLock(run_dir)  # kill -9: the kernel dropped the flock, the record says it was never released
    note = lock.acquire()
    try:
        assert note is not None and f"took over the lock of pid {owner.pid}" in note and "crashed" in note
    finally:
        lock.release()
    assert RunLock(run_dir).acquire() is None  # a released lock is no news


def test_the_command_line_says_who_owns_the_run_dir(tmp_path):
    owner = _hold_lock(tmp_path / "run")
    try:
        done = subprocess.run([sys.executable, "-m", "align.run", *TINY, f"run.dir={tmp_path / 'run'}"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    finally:
        owner.kill()
        owner.wait()
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("config error: run.dir=") and f"in use by pid {owner.pid}" in done.stderr
    assert "Traceback" not in done.stderr


def _write_record(run_dir: Path, **owner) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"released": False, **owner}))


def test_a_record_from_another_host_counts_until_its_heartbeat_is_stale(tmp_path):
    """Shared filesystems do not always carry flock between hosts: the owner record and its heartbeat do."""
    now = time.time()
    _write_record(tmp_path, pid=4242, host="node-7", started=now - 60, heartbeat=now - 5)
    with pytest.raises(RunDirBusy, match=r"pid 4242 on host node-7, running since .*last heartbeat \d+ s ago"):
        RunLock(tmp_path, stale_s=300).acquire()
    _write_record(tmp_path, pid=4242, host="node-7", started=now - 4000, heartbeat=now - 3600)
    lock = RunLock(tmp_path, stale_s=300)
    assert "took over the lock of pid 4242 on host node-7" in lock.acquire()
    lock.release()


def test_the_manifest_carries_the_owner_and_its_heartbeat(tmp_path):
    manifest = Manifest(tmp_path)
    lock = RunLock(tmp_path, heartbeat_s=0.05, on_heartbeat=manifest.heartbeat)
    lock.acquire()
    try:
        started = lock.owner["started"]
        deadline = time.time() + 10
        while time.time() < deadline:
            saved = json.loads((tmp_path / "manifest.json").read_text()) if manifest.path.is_file() else {}
            if (saved.get("owner") or {}).get("heartbeat", 0) > started:
                break
            time.sleep(0.05)
        assert saved["owner"]["pid"] == os.getpid() and saved["owner"]["host"] == socket.gethostname()
        assert saved["owner"]["heartbeat"] > started
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["released"] is True


def test_a_finished_run_records_its_owner(finished):
    owner = json.loads((finished / "manifest.json").read_text())["owner"]
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()


def test_concurrent_writers_never_collide_on_temporary_names(tmp_path):
    """Two writers of the config on one directory: about 400 errors in 3,000 writes each (a fixed temp name)."""
    code = ("import sys; from align.config.compose import compose_run_config; "
            "from pipelines.runner import write_config; from pathlib import Path; "
            "cfg = compose_run_config(['run.dir=' + sys.argv[1]]); d = Path(sys.argv[1]); errors = 0\n"
            "for _ in range(1500):\n"
            "    try: write_config(cfg, d)\n"
            "    except OSError: errors += 1\n"
            "print(errors)")
    tmp_path.mkdir(exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outputs == ["0", "0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary file left behind
    assert compose_run_config([f"run.dir={tmp_path}"]).run_dir == str(tmp_path)


def test_write_config_in_process_leaves_one_file(tmp_path):
    write_config(compose_run_config([f"run.dir={tmp_path}"]), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ------------------------------------------------------------------------------------------------ durability
@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    """The path behind every fsync'd descriptor, in order."""
    seen: list[str] = []
    real = os.fsync

    def recording(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def test_manifest_checkpoint_pointer_and_adapter_writes_are_flushed(tmp_path, fsyncs):
    import torch

    from align.adapters import AdapterModel, LoraConfig
    from align.models.tiny import tiny_llama
    from align.trainers.checkpoint import save_checkpoint

    Manifest(tmp_path, "dpo", {"sft": {"status": "done"}}).save()
    assert any(Path(p).parent == tmp_path and ".manifest.json." in p for p in fsyncs)  # the data, before rename
    assert str(tmp_path) in fsyncs  # then the directory entry
    fsyncs.clear()

    save_checkpoint(tmp_path / "ckpt", 2, {"w": torch.ones(2)}, {"a": 1}, keep=2)
    step = tmp_path / "ckpt" / "step-000002"
    flushed = {Path(p).name for p in fsyncs}
    assert {"trainable.safetensors", "state.json"} <= flushed  # inside the temporary dir, before its rename
    assert str(tmp_path / "ckpt") in fsyncs
    pointer = [p for p in fsyncs if ".latest." in p]
    assert pointer and fsyncs.index(pointer[-1]) > max(i for i, p in enumerate(fsyncs)
                                                        if p.endswith("trainable.safetensors"))
    assert (tmp_path / "ckpt" / "latest").read_text() == step.name
    fsyncs.clear()

    model = AdapterModel(tiny_llama())
    model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter("a", tmp_path / "adapter")
    flushed = [Path(p).name for p in fsyncs]
    assert any(".adapter_model.safetensors." in name for name in flushed)
    assert str(tmp_path / "adapter") in fsyncs


def test_an_empty_latest_pointer_resumes_from_the_newest_complete_checkpoint(tmp_path):
    import torch

    from align.trainers.checkpoint import latest_checkpoint, save_checkpoint

    root = tmp_path / "ckpt"
    for step in (2, 4):
        save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, {}, keep=3)
    (root / "latest").write_text("")  # what a crash can leave after a power loss
    with pytest.warns(UserWarning, match=r"latest is empty: resuming from step-000004"):
        assert latest_checkpoint(root) == root / "step-000004"
    (root / "step-000004" / "state.json").write_text("{")  # and a torn state.json in the newest
    messages: list[str] = []
    assert latest_checkpoint(root, log=messages.append) == root / "step-000002"
    (root / "step-000002" / "trainable.safetensors").unlink()
    with pytest.raises(RuntimeError, match=r"no checkpoint under .* is complete \(2 incomplete\): move .* away"):
        latest_checkpoint(root)
    assert latest_checkpoint(tmp_path / "never") is None
