"""``scripts/ray_submit.sh`` uploads the working directory without credentials: its runtime env's ``excludes``
(checked with Ray's own matcher, on a directory holding the usual secret files) keep them off the cluster, and no
secret travels in the runtime env's env_vars (visible in the dashboard and ``ray job list``)."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET_FILES = [".env", ".env.production", ".netrc", "certs/ca.pem", "keys/tls.key", "keys/client.p12",
                ".wandb/settings", "configs/.env", ".git/config", "id_rsa", "id_ed25519.pub"]
KEPT_FILES = ["align/run.py", "configs/config.yaml", "docs/pipelines.md", "scripts/ray_submit.sh"]


@pytest.fixture
def submitted(tmp_path) -> list[str]:
    """The arguments the script hands ``ray`` (a stand-in that records them)."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "fake-ray"
    fake.write_text(f"#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {**os.environ, "RAY": str(fake), "WANDB_API_KEY": "sk-fake-never-uploaded"}
    subprocess.run([str(ROOT / "scripts/ray_submit.sh"), "pipeline=dpo", "run.dir=/shared/runs/dpo"], env=env,
                   check=True, timeout=60)
    return json.loads(record.read_text())


def runtime_env(argv: list[str]) -> dict:
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    get = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    return parse_runtime_env_args(runtime_env=get.get("--runtime-env"), runtime_env_json=get.get("--runtime-env-json"),
                                  working_dir=get.get("--working-dir"))  # what `ray job submit` makes of them


def test_submit_runs_align_in_the_working_directory(submitted):
    assert submitted[:2] == ["job", "submit"]
    assert submitted[submitted.index("--") + 1:] == ["python", "-m", "align.run", "pipeline=dpo",
                                                     "run.dir=/shared/runs/dpo"]
    assert runtime_env(submitted[:submitted.index("--")])["working_dir"] == "."


def test_credentials_are_never_uploaded(submitted, tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    env = runtime_env(submitted[:submitted.index("--")])
    assert "env_vars" not in env and "sk-fake-never-uploaded" not in json.dumps(env)
    tree = tmp_path / "repo"
    for name in SECRET_FILES + KEPT_FILES:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    _zip_files(str(tree), env["excludes"], str(tmp_path / "upload.zip"), include_gitignore=True)
    uploaded = set(zipfile.ZipFile(tmp_path / "upload.zip").namelist())
    assert uploaded >= set(KEPT_FILES)
    assert not uploaded & set(SECRET_FILES), sorted(uploaded & set(SECRET_FILES))
