#!/usr/bin/env bash
# The test suite on a fresh machine: install what is missing, make sure Redis answers, then
# lint and run every test (unit, integration with real worker + gunicorn processes, fault tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The tests read the provided photos and hostile files beside the repository (../shared), or
# where IMGSIM_TEST_DATASETS / IMGSIM_TEST_FIXTURES point: say so plainly when they are missing.
datasets=${IMGSIM_TEST_DATASETS:-../shared/datasets}
fixtures=${IMGSIM_TEST_FIXTURES:-../shared/fixtures/bad_inputs}
for need in "$datasets/animals" "$fixtures/MANIFEST.tsv"; do
  if [ ! -e "$need" ]; then
    echo "[test] $need not found: clone the repository beside the shared material (../shared)," \
         "or set IMGSIM_TEST_DATASETS and IMGSIM_TEST_FIXTURES" >&2
    exit 1
  fi
done
IMGSIM_REDIS_URL=${IMGSIM_TEST_REDIS_URL:-redis://127.0.0.1:6379/15} bash scripts/ensure_redis.sh
# The fault tests (marker "faults") start and restart a redis-server binary of their own, even
# when the shared Redis above is another machine's.
if ! command -v redis-server >/dev/null; then
  echo "[test] installing redis-server (Debian package) for the fault tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
.venv/bin/ruff check .
# pytest exits 5 when it collected nothing; that is a failure here too (set -e).
exec .venv/bin/python -m pytest "$@"
