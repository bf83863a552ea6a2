#!/usr/bin/env bash
# The test suite on a fresh machine: install what is missing, make sure Redis answers, then
# lint and run every test (unit, integration with real worker + gunicorn processes, fault tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
IMGSIM_REDIS_URL=${IMGSIM_TEST_REDIS_URL:-redis://127.0.0.1:6379/15} bash scripts/ensure_redis.sh
.venv/bin/ruff check .
# pytest exits 5 when it collected nothing; that is a failure here too (set -e).
exec .venv/bin/python -m pytest "$@"
