"""Start, stop and inspect a local imgsim stack (one Celery worker + gunicorn) for the demo.

Usage: ``python scripts/stack.py start|stop|status``. Processes run in their own sessions,
log to ``var/log/`` and leave pid files in ``var/run/``; ``start`` restarts running ones so the
stack always runs the code in the working tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAR = REPO / "var"
RUN = VAR / "run"
LOGS = VAR / "log"
BIN = Path(sys.executable).parent


def stack_env(data_root: Path) -> dict[str, str]:
    """Environment of every process of the demo stack (settings come from IMGSIM_* only)."""
    env = dict(os.environ)
    env.setdefault("IMGSIM_REDIS_URL", "redis://127.0.0.1:6379/0")
    env["IMGSIM_DATA_ROOT"] = str(data_root)
    env.setdefault("IMGSIM_ARTIFACTS_DIR", str(VAR / "artifacts"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pid(name: str) -> int | None:
    path = RUN / f"{name}.pid"
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop() -> None:
    """Stop the worker and the API (SIGTERM to their process groups, then SIGKILL)."""
    for name in ("api", "worker"):
        pid = _pid(name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if _pid(name) is None:
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        (RUN / f"{name}.pid").unlink(missing_ok=True)
        print(f"[stack] stopped {name} (pid {pid})")


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    RUN.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (RUN / f"{name}.pid").write_text(str(proc.pid))
    print(f"[stack] started {name} (pid {proc.pid}, log var/log/{name}.log)")


def _workers_seen(port: int) -> int:
    """Workers /readyz reports (it answers 503 until a model is active, with the same body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except OSError:
        return 0
    try:
        return int(json.loads(body).get("checks", {}).get("workers", 0))
    except ValueError:
        return 0


def start(data_root: Path, port: int, timeout: float = 120.0) -> None:
    """(Re)start the worker and the API and wait until the API answers and a worker is up."""
    stop()
    env = stack_env(data_root)
    _spawn("worker", [str(BIN / "celery"), "-A", "workers.celery_app", "worker",
                      "--loglevel=INFO", "-n", "demo@%h"], env)
    # Processes, threads and timeout come from gunicorn.conf.py (read from the repository).
    _spawn("api", [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "api.wsgi:app"], env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("api", "worker"):
            if _pid(name) is None:
                sys.exit(f"[stack] {name} exited; see var/log/{name}.log")
        if _workers_seen(port) > 0:
            return
        time.sleep(0.5)
    sys.exit("[stack] the API or the worker did not come up; see var/log/")


def status() -> None:
    for name in ("worker", "api"):
        pid = _pid(name)
        print(f"{name}: running, pid {pid}" if pid else f"{name}: stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--data-root", type=Path, default=VAR / "demo" / "data")
    parser.add_argument("--port", type=int, default=int(os.environ.get("IMGSIM_PORT", "8000")))
    args = parser.parse_args()
    if args.action == "start":
        start(args.data_root.resolve(), args.port)
    elif args.action == "stop":
        stop()
    else:
        status()


if __name__ == "__main__":
    main()
