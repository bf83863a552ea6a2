#!/usr/bin/env bash
# Create .venv and install the project with worker and dev extras (idempotent, fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (large; served from this machine's disk where available)"
  # numpy with it: torch warns at import when numpy is missing.
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "numpy>=1.26" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch" || .venv/bin/pip install -q --disable-pip-version-check "torch>=2.3,<2.15"
fi
stamp=.venv/.imgsim-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing imgsim and its dependencies"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[worker,dev]" 2>&1 | grep -vE "is ignored|^\s*$" || true
  .venv/bin/python -c "import flask, celery, redis, lshashpy3.lshash" 2>/dev/null \
    || .venv/bin/python -c "import workers.lsh_index"
  touch "$stamp"
fi
# Browser tests drive Debian's chromium through its chromedriver (no browser is downloaded).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if ! command -v apt-get >/dev/null; then
    echo "[setup] no apt-get: install chromium and chromedriver for the browser tests" >&2
  elif [ "$(id -u)" -eq 0 ]; then
    echo "[setup] installing chromium + chromium-driver (browser tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  elif command -v sudo >/dev/null; then
    echo "[setup] installing chromium + chromium-driver with sudo (browser tests)"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "[setup] not root: apt-get install chromium chromium-driver for the browser tests" >&2
  fi
fi
