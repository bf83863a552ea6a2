"""A throwaway imgsim stack for benchmarks: Celery worker(s) + gunicorn on a private key prefix."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BenchStack:
    """Starts workers and the API with their own prefix, artifacts and logs; removes all at exit.

    Args:
        data_root: IMGSIM_DATA_ROOT of the stack.
        redis_url: Redis to use (a private random key prefix keeps it apart from anything else).
        worker_processes: Celery prefork processes (one worker).
        api_workers: gunicorn worker processes.
        env: extra IMGSIM_* settings.
        api_threads: threads per gunicorn worker (each long-poll holds one while it waits).
    """

    def __init__(self, data_root: Path, redis_url: str = DEFAULT_REDIS_URL,
                 worker_processes: int = 2, api_workers: int = 2,
                 env: dict[str, str] | None = None, api_threads: int = 4) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="imgsim-bench-"))
        self.prefix = f"imgsimbench{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.worker_processes = worker_processes
        self.api_workers = api_workers
        self.api_threads = api_threads
        self.env = {
            **os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
            "IMGSIM_REDIS_URL": redis_url, "IMGSIM_KEY_PREFIX": self.prefix,
            "IMGSIM_DATA_ROOT": str(Path(data_root).resolve()),
            "IMGSIM_ARTIFACTS_DIR": str(self.tmp / "artifacts"),
            "IMGSIM_WORKER_CONCURRENCY": str(worker_processes),
            **(env or {}),
        }
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs.append(subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def __enter__(self) -> BenchStack:
        self.redis.ping()
        # `timeout` or Ctrl-C must still stop the processes and remove the keys (__exit__).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        self._spawn("worker", [str(BIN / "celery"), "-A", "workers.celery_app", "worker",
                               "--loglevel=WARNING", "-n", f"{self.prefix}@%h",
                               f"--concurrency={self.worker_processes}", "--without-gossip",
                               "--without-mingle"])
        self._spawn("api", [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{self.port}",
                            "--workers", str(self.api_workers),
                            "--threads", str(self.api_threads),
                            "--timeout", "60", "api.wsgi:app"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            up = False
            with contextlib.suppress(requests.RequestException):
                up = requests.get(f"{self.base}/healthz", timeout=1).status_code == 200
            if up and any(self.redis.scan_iter(match=f"{self.prefix}:worker:*")):
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the bench stack did not come up; logs in {self.tmp}")

    def __exit__(self, *_exc) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        keys += [f"{self.prefix}.{q}" for q in ("train", "query")]
        keys += [f"_kombu.{kind}.{self.prefix}.{q}" for q in ("train", "query")
                 for kind in ("binding", "binding_permanent")]
        for start in range(0, len(keys), 1000):
            self.redis.unlink(*keys[start : start + 1000])
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def wait_job(base: str, job_id: str, timeout: float = 900.0,
             session: requests.Session | None = None) -> dict:
    """Long-poll ``GET /jobs/<id>?wait=`` until the job ends."""
    http = session or requests
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"{base}/jobs/{job_id}", params={"wait": "30"}, timeout=40).json()
        if job["status"] in {"succeeded", "failed", "canceled"}:
            return job
    raise TimeoutError(f"job {job_id} did not end within {timeout:.0f}s")
