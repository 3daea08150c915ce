#!/usr/bin/env bash
# Submit a pipeline to a Ray cluster as a Ray Job:
#   scripts/ray_submit.sh [overrides...]            e.g. scripts/ray_submit.sh pipeline=dpo run.dir=/shared/runs/dpo
# RAY_ADDRESS: the cluster's dashboard (default http://127.0.0.1:8265).
# Ray >= 2.5x turns token authentication on by default: clients need RAY_AUTH_MODE=token and the cluster's token
# (~/.ray/auth_token on the head node, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH). This script sets
# RAY_AUTH_MODE=token unless you set it (use RAY_AUTH_MODE=disabled for a cluster started that way).
# The job runs in a temporary copy of this directory (.gitignore'd files are not uploaded, nor credentials: see
# EXCLUDES), so give run.dir an absolute path on storage the cluster's nodes share; without one the run lands in
# runs/<pipeline> of that copy.
# Secrets (WANDB_API_KEY, ...) do not belong in the runtime env: its env_vars show in the dashboard and in
# `ray job list`. Set them in the environment of the cluster's nodes (or a secrets manager); see docs/pipelines.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
RAY="${RAY:-ray}"
command -v "$RAY" >/dev/null || RAY=.venv/bin/ray
# never uploaded with the working directory (gitignore syntax, matched at any depth): credentials and key files
EXCLUDES='".git", ".env", ".env.*", ".netrc", "*.pem", "*.key", "*.p12", ".wandb", "id_rsa*", "id_ed25519*"'
RUNTIME_ENV="{\"working_dir\": \".\", \"excludes\": [$EXCLUDES]}"
exec "$RAY" job submit --address "$ADDRESS" --runtime-env-json "$RUNTIME_ENV" -- python -m align.run "$@"
