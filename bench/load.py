"""Load test: many query jobs through HTTP at a fixed concurrency, then Redis memory after the TTL.

Starts a redis-server of its own (so its memory figures are this service's alone; ``--redis-url``
uses another one), a private stack on it (one Celery worker with 2 prefork processes serving
both queues, gunicorn), trains a model on the animal photos through the API (1 epoch: the index
size, not the model's quality, sets the query cost), then runs ``--queries`` query jobs from
``--concurrency`` client threads, each one submit -> long-poll ``GET /jobs/<id>?wait=10`` until
the job ends. Prints throughput, p50/p95/p99 from submit to result, every error, and Redis
``used_memory`` with the service's key counts: before, right after, and once the job records'
TTL (``--job-ttl``, 60 s here) has passed; growth must be no more than the records still within
their TTL, and nothing else (spooled uploads, Celery messages) may stay behind.

``--soak-minutes N`` runs the clients for N minutes instead and prints one line a minute
(throughput, p95, errors, memory, keys), showing that memory levels off at about one TTL's
worth of job records.

Usage: ``PYTHONPATH=$PWD .venv/bin/python bench/load.py [--queries 1000 --concurrency 16]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import redis
import requests

from bench.stack import REPO, BenchStack, wait_job

FINAL = {"succeeded", "failed", "canceled"}


@contextlib.contextmanager
def own_redis():
    """A throwaway redis-server on a free port (no persistence): its memory is ours alone."""
    folder = Path(tempfile.mkdtemp(prefix="imgsim-load-redis-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(folder, ignore_errors=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def redis_state(client: redis.Redis, prefix: str) -> dict:
    """used_memory and the stack's keys by kind (job records, uploads, tables, other)."""
    kinds: Counter = Counter()
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        name = key.decode()
        kind = name[len(prefix):].lstrip(":.").split(":")[0]
        kinds["tables" if kind.startswith("{") else kind] += 1
    return {"used_memory": int(client.info("memory")["used_memory"]), "keys": dict(kinds)}


def show_state(label: str, state: dict, baseline: dict | None = None) -> None:
    delta = ""
    if baseline is not None:
        grown = state["used_memory"] - baseline["used_memory"]
        delta = f" ({grown / 1e6:+.2f} MB)"
    keys = ", ".join(f"{k} {v}" for k, v in sorted(state["keys"].items()))
    print(f"  redis {label:<22} used_memory {state['used_memory'] / 1e6:7.2f} MB{delta}; "
          f"keys: {keys}", flush=True)


class Clients:
    """``concurrency`` threads, each submitting a query and long-polling it until it ends."""

    def __init__(self, base: str, photos: list[bytes], concurrency: int) -> None:
        self.base, self.photos, self.concurrency = base, photos, concurrency
        self.lock = threading.Lock()
        self.latencies: list[tuple[float, float]] = []  # (end time, seconds)
        self.errors: list[str] = []
        self.issued = 0

    def _next(self, limit: int | None, deadline: float | None) -> int | None:
        with self.lock:
            if (limit is not None and self.issued >= limit) or (
                    deadline is not None and time.monotonic() >= deadline):
                return None
            self.issued += 1
            return self.issued

    def _one(self, http: requests.Session, number: int) -> None:
        started = time.monotonic()
        photo = self.photos[number % len(self.photos)]
        answer = http.post(f"{self.base}/jobs/query", files={"image": ("q.jpg", photo)},
                           data={"k": "10"}, timeout=30)
        if answer.status_code != 202:
            raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:200]}")
        job_id = answer.json()["job_id"]
        while True:
            reply = http.get(f"{self.base}/jobs/{job_id}", params={"wait": "10"}, timeout=30)
            if reply.status_code != 200:
                raise RuntimeError(f"GET answered {reply.status_code}: {reply.text[:200]}")
            job = reply.json()
            if job["status"] in FINAL:
                break
            if time.monotonic() - started > 120:
                raise RuntimeError(f"job {job_id} still {job['status']} after 120 s")
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
        ended = time.monotonic()
        with self.lock:
            self.latencies.append((ended, ended - started))

    def _client(self, limit: int | None, deadline: float | None) -> None:
        http = requests.Session()
        while (number := self._next(limit, deadline)) is not None:
            try:
                self._one(http, number)
            except Exception as exc:  # counted and shown; the load goes on
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def run(self, limit: int | None = None, deadline: float | None = None) -> float:
        threads = [threading.Thread(target=self._client, args=(limit, deadline), daemon=True)
                   for _ in range(self.concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started


def report(title: str, clients: Clients, elapsed: float) -> None:
    seconds = [s for _, s in clients.latencies]
    ms = [s * 1000 for s in seconds]
    print(f"\n  {title}: {len(seconds)} succeeded, {len(clients.errors)} errors in {elapsed:.1f} s"
          f" -> {len(seconds) / elapsed:.1f} queries/s", flush=True)
    print(f"  submit -> result: p50 {pct(ms, 50):.0f} ms, p95 {pct(ms, 95):.0f} ms, "
          f"p99 {pct(ms, 99):.0f} ms, max {max(ms, default=float('nan')):.0f} ms")
    for error in clients.errors[:10]:
        print(f"    error: {error}")


def soak(stack: BenchStack, clients: Clients, client: redis.Redis, minutes: float) -> None:
    """Clients run for ``minutes``; a line a minute on throughput, latency, memory and keys."""
    deadline = time.monotonic() + minutes * 60
    runner = threading.Thread(target=clients.run, kwargs={"deadline": deadline}, daemon=True)
    started = time.monotonic()
    runner.start()
    done_before, errors_before, mark = 0, 0, started
    while runner.is_alive():
        runner.join(timeout=60)
        now = time.monotonic()
        with clients.lock:
            window = [s * 1000 for end, s in clients.latencies if end > mark]
            done, errors = len(clients.latencies), len(clients.errors)
        state = redis_state(client, stack.prefix)
        keys = ", ".join(f"{k} {v}" for k, v in sorted(state["keys"].items()))
        print(f"  t={now - started:6.0f} s  {(done - done_before) / (now - mark):6.1f} q/s  "
              f"p95 {pct(window, 95):6.0f} ms  errors {errors - errors_before}  "
              f"used_memory {state['used_memory'] / 1e6:6.2f} MB  keys: {keys}  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        done_before, errors_before, mark = done, errors, now
    report(f"soak, {minutes:g} min", clients, time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--api-threads", type=int, default=12,
                        help="per gunicorn worker; a waiting long-poll holds one")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--job-ttl", type=int, default=60, help="IMGSIM_JOB_TTL_S (>= 60)")
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis (default: a redis-server of its own)")
    args = parser.parse_args()
    animals = args.datasets / "animals"
    photos = [p.read_bytes() for label in ("cat", "dog", "panda")
              for p in sorted((animals / label).iterdir())[:40]]
    print(f"load: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
          f"{os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}; {args.worker_processes} worker "
          f"processes, gunicorn {args.api_workers}x{args.api_threads} threads, "
          f"job TTL {args.job_ttl} s", flush=True)
    with contextlib.ExitStack() as exits:
        url = args.redis_url or exits.enter_context(own_redis())
        stack = exits.enter_context(BenchStack(
            args.datasets, url, worker_processes=args.worker_processes,
            api_workers=args.api_workers, api_threads=args.api_threads,
            env={"IMGSIM_JOB_TTL_S": str(args.job_ttl)}))
        client = redis.Redis.from_url(url)
        answer = requests.post(f"{stack.base}/jobs/train",
                               json={"dataset": "animals", "epochs": args.epochs}, timeout=30)
        answer.raise_for_status()
        job = wait_job(stack.base, answer.json()["job_id"])
        if job["status"] != "succeeded":
            raise SystemExit(f"training failed: {job['error']}\n{stack.log('worker')}")
        print(f"  trained on {job['result']['images_indexed']} images "
              f"(model {job['result']['version']})", flush=True)
        Clients(stack.base, photos, 2).run(limit=10)  # warm-up: both processes load the model
        time.sleep(args.job_ttl + 2)  # the training's and warm-up's job records expire
        requests.get(f"{stack.base}/jobs", params={"limit": 1}, timeout=10)  # trims the index
        before = redis_state(client, stack.prefix)
        show_state("before", before)

        clients = Clients(stack.base, photos, args.concurrency)
        if args.soak_minutes > 0:
            soak(stack, clients, client, args.soak_minutes)
        else:
            elapsed = clients.run(limit=args.queries)
            report(f"{args.queries} queries, {args.concurrency} clients", clients, elapsed)
        show_state("right after", redis_state(client, stack.prefix), before)
        time.sleep(args.job_ttl + 2)  # every record of the run has expired now
        requests.get(f"{stack.base}/jobs", params={"limit": 1}, timeout=10)
        after = redis_state(client, stack.prefix)
        show_state(f"after the TTL ({args.job_ttl} s)", after, before)
        print(f"  load average at the end {os.getloadavg()[0]:.1f}")
        if clients.errors:
            raise SystemExit(f"{len(clients.errors)} errors")


if __name__ == "__main__":
    main()
