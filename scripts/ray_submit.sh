#!/usr/bin/env bash
# Submit a pipeline to a Ray cluster as a Ray Job:
#   scripts/ray_submit.sh [overrides...]            e.g. scripts/ray_submit.sh pipeline=dpo run.dir=/shared/runs/dpo
# RAY_ADDRESS: the cluster's dashboard (default http://127.0.0.1:8265).
# Ray >= 2.5x turns token authentication on by default: clients need RAY_AUTH_MODE=token and the cluster's token
# (~/.ray/auth_token on the head node, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH). This script sets
# RAY_AUTH_MODE=token unless you set it (use RAY_AUTH_MODE=disabled for a cluster started that way).
# The job runs in a temporary copy of this directory (.gitignore'd files are not uploaded), so give run.dir an
# absolute path on storage the cluster's nodes share; without one the run lands in runs/<pipeline> of that copy.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
RAY="${RAY:-ray}"
command -v "$RAY" >/dev/null || RAY=.venv/bin/ray
exec "$RAY" job submit --address "$ADDRESS" --working-dir . -- python -m align.run "$@"
