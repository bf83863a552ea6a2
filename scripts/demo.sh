#!/usr/bin/env bash
# The main job end to end on a fresh machine: install, make sure Redis answers, start a worker and
# the API, train on a folder of photos and query with photos that are not in the index.
# Usage: bash scripts/demo.sh [FOLDER]   (default: ../shared/datasets/animals when present)
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-../shared/datasets/animals}
if [ ! -d "$folder" ]; then
  echo "usage: bash scripts/demo.sh FOLDER   (no folder at '$folder'; name a folder of photos)" >&2
  exit 2
fi
bash scripts/setup.sh
bash scripts/ensure_redis.sh
exec .venv/bin/python scripts/demo.py "$folder" --port "${IMGSIM_PORT:-8000}"
