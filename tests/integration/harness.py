"""Real processes for end-to-end tests: Celery workers and gunicorn against a real Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

from tests.conftest import delete_prefix

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Starts and stops the service's processes with one environment."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        # The child keeps its own copy of the descriptor; the parent closes its handle at once.
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str, concurrency: int = 1, queues: str | None = None,
                     env: dict[str, str] | None = None,
                     wrap: list[str] | None = None) -> subprocess.Popen:
        """A Celery worker; ``queues`` (comma-separated full names) limits what it consumes.

        ``env`` adds variables for this process only; ``wrap`` is a command that execs the
        worker's command line given as its trailing arguments (same pid).
        """
        saved = self.env
        self.env = {**saved, **(env or {})}
        try:
            return self._spawn(name, [
                *(wrap or []),
                str(BIN / "celery"), "-A", "workers.celery_app", "worker", "--loglevel=INFO",
                "-n", f"{name}@%h", f"--concurrency={concurrency}", "--without-gossip",
                "--without-mingle", *(["-Q", queues] if queues else []),
            ])
        finally:
            self.env = saved

    def start_api(self, port: int, name: str = "api",
                  env: dict[str, str] | None = None) -> subprocess.Popen:
        """gunicorn on ``port``; ``env`` adds variables for this process only."""
        saved = self.env
        self.env = {**saved, **(env or {})}
        try:
            return self._spawn(name, [
                str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2",
                "--timeout", "60", "api.wsgi:app",
            ])
        finally:
            self.env = saved

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def wait_for_workers(client: redis.Redis, prefix: str, count: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for _ in client.scan_iter(match=f"{prefix}:worker:*")) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} worker(s) did not report within {timeout}s")


def wait_for_job(base: str, job_id: str, timeout: float = 180.0, seen: list | None = None) -> dict:
    """Poll a job until it ends; append every status observed to ``seen``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/jobs/{job_id}", timeout=5).json()
        if seen is not None and (not seen or seen[-1] != job["status"]):
            seen.append(job["status"])
        if job["status"] in {"succeeded", "failed", "canceled"}:
            return job
        time.sleep(0.03)
    raise TimeoutError(f"job {job_id} did not finish within {timeout}s")


@dataclass
class Stack:
    """A running service: its URL, key prefix, processes and a Redis client."""

    base: str
    prefix: str
    procs: Processes
    redis: redis.Redis


def copy_animals(dest: Path, per_class: int, start: int = 0,
                 classes: tuple[str, ...] = ("cat", "dog", "panda")) -> dict[str, list[Path]]:
    """Copy photos ``start .. start + per_class`` of each class folder of the animals dataset
    into ``dest/<class>/`` (tests never write into the read-only dataset).

    Returns:
        The copies, per class, in name order.
    """
    from tests.conftest import DATASETS

    animals = DATASETS / "animals"
    if not animals.is_dir():
        raise FileNotFoundError(f"integration tests need the animal photos at {animals}")
    copies: dict[str, list[Path]] = {}
    for label in classes:
        (dest / label).mkdir(parents=True, exist_ok=True)
        copies[label] = []
        for path in sorted((animals / label).iterdir())[start : start + per_class]:
            copies[label].append(Path(shutil.copy(path, dest / label / path.name)))
    return copies


@contextmanager
def service_stack(redis_url: str, data_root: Path, artifacts: Path, log_dir: Path,
                  workers: int = 1, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Start ``workers`` Celery workers (w1, w2, ...) and gunicorn under a fresh key prefix.

    Everything is stopped and every key of the prefix removed afterwards; the processes' logs
    are printed when the body (or the start) fails.
    """
    prefix = f"imgsimtest{uuid.uuid4().hex[:8]}"
    procs = Processes({
        "IMGSIM_REDIS_URL": redis_url,
        "IMGSIM_KEY_PREFIX": prefix,
        "IMGSIM_DATA_ROOT": str(data_root),
        "IMGSIM_ARTIFACTS_DIR": str(artifacts),
        "IMGSIM_TORCH_THREADS": "1",
        "IMGSIM_WORKER_CONCURRENCY": "1",
        **(env or {}),
    }, log_dir)
    client = redis.Redis.from_url(redis_url)
    port = free_port()
    names = [f"w{n}" for n in range(1, workers + 1)]
    try:
        for name in names:
            procs.start_worker(name)
        procs.start_api(port)
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz")
        wait_for_workers(client, prefix, workers)
        yield Stack(base, prefix, procs, client)
    except BaseException:
        for name in [*names, "api"]:
            print(f"---- {name}.log\n{procs.log(name)}")
        raise
    finally:
        procs.stop_all()
        delete_prefix(client, prefix)
        client.close()


def wait_for_worker(client: redis.Redis, prefix: str, name: str, pid: int,
                    timeout: float = 90.0) -> None:
    """Wait until the worker ``name`` started as process ``pid`` wrote its own heartbeat."""
    pattern = f"{prefix}:worker:{name}@{socket.gethostname()}#*"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in client.scan_iter(match=pattern):
            raw = client.get(key)
            if raw and json.loads(raw).get("pid") == pid:
                return
        time.sleep(0.1)
    raise TimeoutError(f"worker {name} (pid {pid}) did not report within {timeout}s")


class RedisServer:
    """A redis-server of the test's own (Debian's binary) on a free port, append-only file on,
    so a test can stop, hang and restart it without disturbing anyone else's Redis."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.client = redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=10)

    def start(self, timeout: float = 20.0) -> None:
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "everysec",
                 "--save", ""],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(redis.RedisError):
                # while it loads the append-only file, commands are refused
                if self.client.ping() and self.client.info("persistence").get("loading") == 0:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not come up: {self.log()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait(timeout=timeout)
        self.proc = None
        self.client.connection_pool.disconnect()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: Redis accepts connections but answers nothing (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
