"""Query latency and throughput over HTTP at N = 2,399 indexed photos, with a per-stage breakdown.

Starts a private stack (one Celery worker with 2 prefork processes, gunicorn with 2 workers),
trains on the animal photos through the API (1 epoch by default: the index size, not the model's
quality, decides the search cost), then measures:

1. single queries one after the other, submit -> result with long-poll ``GET /jobs/<id>?wait=``:
   p50 (goal <= 40 ms) and p95 (goal <= 100 ms), broken down into submit (upload, validation,
   enqueue), queue wait, worker decode / encode / search, and result delivery;
2. the same with blind polling every 50 ms, beside it (what long-polling saves);
3. throughput with 8 concurrent clients against the 2 worker processes (goal >= 40 queries/s).

Usage: ``PYTHONPATH=$PWD .venv/bin/python bench/query_latency.py [--queries 100]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import requests

from bench.stack import DEFAULT_REDIS_URL, REPO, BenchStack, wait_job

STAGES = ("submit", "queue_wait", "load", "decode", "encode", "search", "worker_other", "result")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def one_query(http: requests.Session, base: str, photo: bytes, long_poll: bool,
              poll_s: float = 0.05) -> dict:
    """Submit one query and wait for it; the stage times in ms and the request count."""
    t0 = time.time()
    answer = http.post(f"{base}/jobs/query", files={"image": ("q.jpg", photo)},
                       data={"k": "10"}, timeout=30)
    t1 = time.time()
    answer.raise_for_status()
    job_id = answer.json()["job_id"]
    gets = 0
    while True:
        params = {"wait": "10"} if long_poll else None
        job = http.get(f"{base}/jobs/{job_id}", params=params, timeout=30).json()
        gets += 1
        if job["status"] in {"succeeded", "failed", "canceled"}:
            break
        if not long_poll:
            time.sleep(poll_s)
    t2 = time.time()
    if job["status"] != "succeeded":
        raise RuntimeError(f"query failed: {job['error']}")
    created, started, finished = (_epoch(job[k]) for k in
                                  ("created_at", "started_at", "finished_at"))
    worker = job["result"]["timings_ms"]
    worker_ms = (finished - started) * 1000
    stages = {
        "total": (t2 - t0) * 1000,
        "submit": (t1 - t0) * 1000,
        "queue_wait": (started - created) * 1000,
        "load": worker.get("load_ms", 0.0),
        "decode": worker.get("decode_ms", 0.0),
        "encode": worker.get("encode_ms", 0.0),
        "search": worker.get("search_ms", 0.0),
        "result": (t2 - finished) * 1000,
        "gets": gets,
    }
    stages["worker_other"] = worker_ms - sum(stages[k] for k in ("load", "decode", "encode",
                                                                 "search"))
    return stages


def sequential(base: str, photos: list[bytes], count: int, long_poll: bool) -> list[dict]:
    http = requests.Session()
    return [one_query(http, base, photos[i % len(photos)], long_poll) for i in range(count)]


def show(title: str, runs: list[dict]) -> None:
    totals = [r["total"] for r in runs]
    print(f"\n  {title}: {len(runs)} queries, p50 {pct(totals, 50):.1f} ms, "
          f"p95 {pct(totals, 95):.1f} ms, mean GETs per query "
          f"{statistics.fmean(r['gets'] for r in runs):.1f}")
    print("    stage          p50 ms   p95 ms")
    for stage in STAGES:
        values = [r[stage] for r in runs]
        print(f"    {stage:<13} {pct(values, 50):7.1f}  {pct(values, 95):7.1f}")


def throughput(base: str, photos: list[bytes], clients: int, per_client: int) -> tuple:
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        http = requests.Session()
        try:
            for i in range(per_client):
                run = one_query(http, base, photos[(index * per_client + i) % len(photos)], True)
                with lock:
                    results.append(run)
        except BaseException as exc:  # reported below; a thread must not die silently
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return len(results) / elapsed, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--queries", type=int, default=100, help="sequential long-poll queries")
    parser.add_argument("--poll-queries", type=int, default=40, help="blind-polling queries")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    animals = args.datasets / "animals"
    photos = [p.read_bytes() for label in ("cat", "dog", "panda")
              for p in sorted((animals / label).iterdir())[:40]]
    print(f"query_latency: {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; training {args.epochs} epoch(s) on {animals}", flush=True)
    with BenchStack(args.datasets, args.redis_url, worker_processes=2) as stack:
        base = stack.base
        answer = requests.post(f"{base}/jobs/train",
                               json={"dataset": "animals", "epochs": args.epochs}, timeout=30)
        answer.raise_for_status()
        job = wait_job(base, answer.json()["job_id"])
        if job["status"] != "succeeded":
            raise SystemExit(f"training failed: {job['error']}\n{stack.log('worker')}")
        indexed = job["result"]["images_indexed"]
        print(f"  indexed {indexed} images (model {job['result']['version']})", flush=True)
        throughput(base, photos, 2, 5)  # warm-up: both worker processes load the model

        runs = sequential(base, photos, args.queries, long_poll=True)
        show("single queries, long-poll ?wait=10", runs)
        polled = sequential(base, photos, args.poll_queries, long_poll=False)
        show("single queries, blind polling every 50 ms", polled)
        rate, loaded = throughput(base, photos, args.clients, args.per_client)
        totals = [r["total"] for r in loaded]
        print(f"\n  throughput: {args.clients} clients x {args.per_client} queries, 2 worker "
              f"processes: {rate:.1f} queries/s (p50 {pct(totals, 50):.0f} ms, "
              f"p95 {pct(totals, 95):.0f} ms under load)")

    p50, p95 = pct([r["total"] for r in runs], 50), pct([r["total"] for r in runs], 95)
    polled50 = pct([r["total"] for r in polled], 50)
    print(f"\nsummary (N = {indexed})")
    print(f"  p50 submit -> result (long-poll)   {p50:7.1f} ms   goal <= 40 ms   "
          f"{'ok' if p50 <= 40 else 'MISSED'}")
    print(f"  p95 submit -> result (long-poll)   {p95:7.1f} ms   goal <= 100 ms  "
          f"{'ok' if p95 <= 100 else 'MISSED'}")
    print(f"  p50 with blind 50 ms polling       {polled50:7.1f} ms   "
          f"long-poll is {polled50 / p50:.2f}x faster")
    print(f"  throughput, 2 worker processes     {rate:7.1f} q/s  goal >= 40 q/s  "
          f"{'ok' if rate >= 40 else 'MISSED'}")


if __name__ == "__main__":
    main()
