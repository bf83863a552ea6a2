"""Fault tests (issue 7): what the service does when workers die, Redis restarts or hangs, no
worker runs, the artifacts folder is read-only or full, and two trainings run at once.

Everything is real: a redis-server of this module's own (append-only file on, on a free port,
so restarting it disturbs nobody), Celery worker processes and gunicorn, killed with SIGKILL
where the fault says so. Workers beat every 2 s here (``IMGSIM_HEARTBEAT_S``), so a worker is
presumed lost 6 s after its last heartbeat. Run just these with ``pytest -m faults``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

from shared.keys import Keys
from shared.registry import ModelRegistry
from tests.conftest import DATASETS
from tests.integration.harness import (
    Processes,
    RedisServer,
    free_port,
    wait_for_http,
    wait_for_worker,
)
from tests.openapi_check import Conformance

pytestmark = [pytest.mark.integration, pytest.mark.faults]

PER_CLASS = 8
HEARTBEAT_S = 2
LOST_AFTER_S = 3 * HEARTBEAT_S
MAX_ATTEMPTS = 2
FINAL = {"succeeded", "failed", "canceled"}
TRAIN = {"dataset": "subset", "epochs": 1, "image_size": 32, "batch_size": 8}
# Long enough to be killed in its training phase (hundreds of small batches).
LONG_TRAIN = {**TRAIN, "epochs": 20, "batch_size": 2, "patience": 100}
# A PNG the worker needs most of a second to decode: the window in which a query is killed.
BIG_SIDE = 9000


class Api:
    """HTTP against the live API; every answer is checked against /openapi.json."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()
        self.conformance = Conformance(self.http.get(f"{base}/openapi.json", timeout=10).json())

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 40)
        response = self.http.request(method, self.base + path, **kwargs)
        self.conformance.check_requests(response)
        return response

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GET", f"/jobs/{job_id}?wait=5").json()
            if job["status"] in FINAL:
                return job
        raise TimeoutError(f"job {job_id} did not end within {timeout}s: {self.job(job_id)}")

    def train(self, **params) -> str:
        response = self.call("POST", "/jobs/train", json={**TRAIN, **params})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def submit_query(self, data: bytes, k: int = 5) -> str:
        response = self.call("POST", "/jobs/query", files={"image": ("q.png", data)},
                             data={"k": str(k)})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll an observable condition; its value once truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout}s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    animals = DATASETS / "animals"
    if not animals.is_dir():
        pytest.fail(f"fault tests need the animal photos at {animals}")
    root = tmp_path_factory.mktemp("data")
    for label in ("cat", "dog", "panda"):
        (root / "subset" / label).mkdir(parents=True)
        for path in sorted((animals / label).iterdir())[:PER_CLASS]:
            shutil.copy(path, root / "subset" / label / path.name)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    prefix = f"imgsimfault{uuid.uuid4().hex[:8]}"
    artifacts = tmp_path_factory.mktemp("artifacts")
    env = {
        "IMGSIM_REDIS_URL": server.url, "IMGSIM_KEY_PREFIX": prefix,
        "IMGSIM_DATA_ROOT": str(root), "IMGSIM_ARTIFACTS_DIR": str(artifacts),
        "IMGSIM_TORCH_THREADS": "1", "IMGSIM_TRAIN_THREADS": "1",
        "IMGSIM_WORKER_CONCURRENCY": "1", "IMGSIM_HEARTBEAT_S": str(HEARTBEAT_S),
        "IMGSIM_MAX_ATTEMPTS": str(MAX_ATTEMPTS), "IMGSIM_MAX_IMAGE_PIXELS": "100000000",
        # Queries read the LSH tables in Redis (what a Redis restart must not lose).
        "IMGSIM_LSH_MIN_ROWS": "0",
    }
    procs = Processes(env, tmp_path_factory.mktemp("logs"))
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    port = free_port()
    state = {"procs": procs, "redis": client, "server": server, "prefix": prefix,
             "root": root, "artifacts": artifacts}
    try:
        start_standard_workers(state)
        procs.start_api(port)
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz")
        state["api"] = api = Api(base)
        job = api.wait(api.train())
        assert job["status"] == "succeeded", job
        state["photo"] = next((root / "subset" / "cat").iterdir()).read_bytes()
        yield state
    except BaseException:
        for name in list(procs.procs):
            print(f"--- {name}\n{procs.log(name)}")
        raise
    finally:
        procs.stop_all()
        server.kill()


def start_worker(stack, name: str, queues: str | None, concurrency: int = 1,
                 **kwargs) -> subprocess.Popen:
    """Start a worker and wait for its own heartbeat (a predecessor's may still be there)."""
    full = {"train": f"{stack['prefix']}.train", "query": f"{stack['prefix']}.query"}
    proc = stack["procs"].start_worker(name, concurrency=concurrency,
                                       queues=full.get(queues, queues), **kwargs)
    wait_for_worker(stack["redis"], stack["prefix"], name, proc.pid)
    return proc


def start_standard_workers(stack) -> None:
    """One training worker and one query worker (each one prefork process), as in production."""
    procs = stack["procs"].procs
    if "wtrain" not in procs or procs["wtrain"].poll() is not None:
        start_worker(stack, "wtrain", "train")
    if "wquery" not in procs or procs["wquery"].poll() is not None:
        start_worker(stack, "wquery", "query")


def active_version(stack) -> str | None:
    value = stack["redis"].get(f"{stack['prefix']}:active_model")
    return value.decode() if value else None


def registered(stack) -> set[str]:
    return {v.decode() for v in stack["redis"].zrange(f"{stack['prefix']}:models", 0, -1)}


def assert_no_half_written_version(stack) -> None:
    """Only complete, registered versions exist: on disk, in Redis and in GET /models."""
    versions = registered(stack)
    registry = ModelRegistry(stack["redis"], Keys(stack["prefix"]))
    for version in versions:
        assert registry.missing_parts(version, stack["artifacts"]) == [], version
    on_disk = {p.name for p in stack["artifacts"].iterdir() if p.name not in {"cache", "uploads"}}
    assert on_disk == versions, f"folders {on_disk} vs registered {versions}"
    namespaces = {key.decode().split("{")[1].split("}")[0]
                  for key in stack["redis"].scan_iter(match=f"{stack['prefix']}:{{*")}
    assert namespaces <= versions, f"tables of unregistered versions: {namespaces - versions}"
    listed = stack["api"].call("GET", "/models").json()
    assert {m["version"] for m in listed["models"]} == versions
    assert listed["active"] in versions


def full_log(stack, name: str) -> str:
    return (stack["procs"].log_dir / f"{name}.log").read_text(errors="replace")


def restored_by_a_sweep(stack, job_id: str) -> bool:
    """Some worker's sweep (any worker may run it) logged that it restored this job."""
    return any(f"job {job_id} " in line and "held by a lost worker" in line
               for log in stack["procs"].log_dir.glob("*.log")
               for line in log.read_text(errors="replace").splitlines())


def queued_ids(client: redis.Redis, queue: str) -> set[str]:
    """Task ids of the messages waiting in a Celery queue (a Redis list)."""
    return {json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)}


def unacked_ids(client: redis.Redis, prefix: str) -> set[str]:
    """Task ids of the messages delivered to a worker and not acked yet."""
    return {json.loads(raw)[0]["headers"]["id"]
            for raw in client.hvals(f"{prefix}.unacked")}


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class QueryLoop:
    """Queries one after the other on a thread while a fault happens; records every outcome."""

    def __init__(self, stack) -> None:
        self.api = Api(stack["api"].base)
        self.photo = stack["photo"]
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            outcome = {"submitted": time.monotonic()}
            try:
                job = self.api.wait(self.api.submit_query(self.photo), timeout=60)
                outcome.update(status=job["status"], error=job["error"],
                               version=(job["result"] or {}).get("model_version"))
            except Exception as exc:  # recorded: the test asserts there were none
                outcome.update(status="error", error=repr(exc), version=None)
            outcome["ended"] = time.monotonic()
            self.results.append(outcome)
            self._stop.wait(0.05)  # pacing, not synchronisation

    def __enter__(self) -> QueryLoop:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)

    def failures(self) -> list[dict]:
        return [r for r in self.results if r["status"] != "succeeded"]


# --------------------------------------------------------------------------- fault 1


def test_training_worker_killed_is_restored_and_retried_while_queries_keep_succeeding(stack):
    api, procs, client = stack["api"], stack["procs"], stack["redis"]
    before, versions_before = active_version(stack), registered(stack)
    with QueryLoop(stack) as loop:
        job_id = api.train(**LONG_TRAIN, seed=11)
        wait_until(lambda: api.job(job_id)["progress"].get("phase") == "train", 120,
                   "the training reached its training phase")
        assert api.job(job_id)["attempts"] == 1
        procs.stop("wtrain", signal.SIGKILL)  # the whole worker: parent and prefork child
        killed = time.monotonic()
        job = api.job(job_id)
        assert job["status"] == "running" and job["attempts"] == 1, job
        assert client.hlen(f"{stack['prefix']}.unacked") >= 1  # held by the dead worker
        start_worker(stack, "wtrain", "train")
        wait_until(lambda: api.job(job_id)["attempts"] == 2, 60,
                   "the lost training was started again")
        restarted_after = time.monotonic() - killed
        job = api.wait(job_id, timeout=240)
        ended_after = time.monotonic() - killed
        # queries answered after the switch too
        wait_until(lambda: any(r["version"] == job["result"]["version"]
                               for r in loop.results), 60, "a query on the new version")
    print(f"training restarted {restarted_after:.1f}s and ended {ended_after:.1f}s after the "
          f"kill; {len(loop.results)} queries meanwhile")
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert restored_by_a_sweep(stack, job_id)
    assert restarted_after < 60, restarted_after  # not kombu's visibility timeout (3 h 10 min)
    new = job["result"]["version"]
    assert active_version(stack) == new and registered(stack) - versions_before == {new}
    assert_no_half_written_version(stack)
    assert loop.failures() == [], loop.failures()
    versions = [r["version"] for r in loop.results]
    switch = versions.index(new)
    assert set(versions[:switch]) == {before} and set(versions[switch:]) == {new}, versions
    served_while_down = [r for r in loop.results[:switch] if r["ended"] > killed]
    assert len(served_while_down) >= 3, "too few queries ran while the training worker was dead"


def test_a_job_that_kills_its_worker_every_time_ends_failed_with_the_reason(stack):
    api, procs = stack["api"], stack["procs"]
    before, versions_before = active_version(stack), registered(stack)
    job_id = api.train(**LONG_TRAIN, seed=12)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait_until(lambda a=attempt: api.job(job_id)["attempts"] == a, 120,
                   f"attempt {attempt} started")
        child = wait_until(lambda: children(procs.procs["wtrain"].pid), 60, "a pool process")
        os.kill(child[0], signal.SIGKILL)  # lost like an out-of-memory kill, every time
    job = api.wait(job_id, timeout=120)
    print(job["error"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "worker_lost", job["error"]
    assert f"started {MAX_ATTEMPTS} time(s)" in job["error"]["message"]
    assert active_version(stack) == before and registered(stack) == versions_before
    assert_no_half_written_version(stack)
    assert procs.procs["wtrain"].poll() is None  # the worker itself lives on


# --------------------------------------------------------------------------- fault 2


def big_png() -> bytes:
    y, x = np.mgrid[0:BIG_SIDE, 0:BIG_SIDE]
    pixels = np.stack([x * 255 // BIG_SIDE, y * 255 // BIG_SIDE, (x ^ y) & 255], -1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "PNG", compress_level=1)
    return out.getvalue()


@pytest.fixture(scope="module")
def slow_photo() -> bytes:
    return big_png()


def kill_while_running(stack, photo: bytes, kill) -> tuple[str, int]:
    """Submit a slow query and ``kill()`` the moment its record says running.

    Returns (job id, the killed pool process id). Tries again (at most 3 times) when the query
    ended before the kill landed, so the caller's checks always see a kill during the query.
    """
    api, client = stack["api"], stack["redis"]
    for _ in range(3):
        pool = children(stack["procs"].procs["wquery"].pid)
        job_id = api.submit_query(photo)
        key = f"{stack['prefix']}:job:{job_id}"
        wait_until(lambda k=key: client.hget(k, "status") == b"running", 60, "query running",
                   interval=0.001)
        kill()
        if client.hget(key, "status") == b"running":
            return job_id, pool[0]
        api.wait(job_id)  # it finished first: not the case under test; try again
    pytest.fail("the query always ended before the kill landed")


def test_query_whose_pool_process_is_killed_is_redelivered_and_succeeds(stack, slow_photo):
    start_standard_workers(stack)
    api, procs = stack["api"], stack["procs"]
    job_id, killed = kill_while_running(
        stack, slow_photo,
        lambda: os.kill(children(procs.procs["wquery"].pid)[0], signal.SIGKILL))
    assert stack["redis"].exists(f"{stack['prefix']}:upload:{job_id}")  # kept for the rerun
    job = api.wait(job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert job["result"]["served_by"]["pid"] != killed
    assert job["result"]["model_version"] == active_version(stack)
    assert not stack["redis"].exists(f"{stack['prefix']}:upload:{job_id}")
    assert "WorkerLostError" in full_log(stack, "wquery")


def test_query_whose_whole_worker_is_killed_runs_once_a_worker_is_back(stack, slow_photo):
    start_standard_workers(stack)
    api, procs = stack["api"], stack["procs"]
    job_id, killed = kill_while_running(
        stack, slow_photo, lambda: procs.stop("wquery", signal.SIGKILL))
    start_worker(stack, "wquery", "query")
    job = api.wait(job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert job["result"]["served_by"]["pid"] != killed
    assert restored_by_a_sweep(stack, job_id)
    # and the service goes on answering
    assert api.wait(api.submit_query(stack["photo"]), timeout=60)["status"] == "succeeded"


# --------------------------------------------------------------------------- fault 3


def test_redis_restart_keeps_jobs_model_and_tables_and_queries_resume(stack):
    start_standard_workers(stack)
    api, client, server, prefix = stack["api"], stack["redis"], stack["server"], stack["prefix"]
    done = api.wait(api.submit_query(stack["photo"]), timeout=60)
    assert done["status"] == "succeeded"
    version = active_version(stack)
    tables = sorted(client.scan_iter(match=f"{prefix}:{{{version}}}:*", count=1000))
    assert len(tables) > 16  # 16 LSH tables with their buckets, rows, images
    models = api.call("GET", "/models").json()
    pids = {name: proc.pid for name, proc in stack["procs"].procs.items()}
    running = api.train(**LONG_TRAIN, seed=20)  # in its training phase across the restart
    wait_until(lambda: api.job(running)["progress"].get("phase") == "train", 120,
               "the training reached its training phase")

    server.restart()  # SIGTERM (the append-only file is flushed), then the same port and folder

    assert api.job(running)["status"] == "running"
    assert active_version(stack) == version
    assert sorted(client.scan_iter(match=f"{prefix}:{{{version}}}:*", count=1000)) == tables
    assert api.job(done["job_id"]) == done
    assert api.call("GET", "/models").json() == models
    results = [api.wait(api.submit_query(stack["photo"]), timeout=90) for _ in range(5)]
    assert [r["status"] for r in results] == ["succeeded"] * 5, results
    assert {r["result"]["model_version"] for r in results} == {version}
    # The training went on through the restart (its writes were retried), was not run twice,
    # and its message, whose ack was lost with the old connection, does not linger.
    job = api.wait(running, timeout=240)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    wait_until(lambda: running not in unacked_ids(client, prefix), 60,
               "the finished training's message left the unacked hash")
    trained = api.wait(api.train(seed=21), timeout=240)  # the train queue's consumer is back too
    assert trained["status"] == "succeeded", trained
    assert {n: p.pid for n, p in stack["procs"].procs.items()} == pids, "a process was restarted"
    assert all(p.poll() is None for p in stack["procs"].procs.values())
    assert_no_half_written_version(stack)


def test_api_answers_503_json_quickly_while_redis_is_down_or_hung(stack):
    api, server = stack["api"], stack["server"]
    job_id = api.wait(api.submit_query(stack["photo"]), timeout=60)["job_id"]
    for fault in ("down", "hung"):
        if fault == "down":
            server.stop()
        else:
            server.start()
            server.pause()
        try:
            for method, path, kwargs in (
                ("GET", f"/jobs/{job_id}", {}),
                ("GET", f"/jobs/{job_id}?wait=5", {}),
                ("POST", "/jobs/query", {"files": {"image": ("q.jpg", stack["photo"])}}),
                ("POST", "/jobs/train", {"json": TRAIN}),
            ):
                started = time.monotonic()
                response = api.call(method, path, timeout=30, **kwargs)
                elapsed = time.monotonic() - started
                assert response.status_code == 503, (fault, path, response.text)
                assert response.json()["error"]["code"] in {"redis_unavailable",
                                                            "queue_unavailable"}
                assert elapsed < 5.0, (fault, path, elapsed)  # 2 s timeouts, never a hang
                print(f"redis {fault}: {method} {path.split('?')[0]} -> 503 in {elapsed:.2f}s")
            ready = api.call("GET", "/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] is False
        finally:
            if fault == "hung":
                server.resume()
    assert api.wait(api.submit_query(stack["photo"]), timeout=90)["status"] == "succeeded"


# --------------------------------------------------------------------------- fault 4


def test_jobs_stay_queued_without_a_worker_and_complete_once_one_starts(stack):
    api, procs, client, prefix = stack["api"], stack["procs"], stack["redis"], stack["prefix"]
    procs.stop("wtrain")  # warm shutdown: each worker removes its heartbeat
    procs.stop("wquery")
    ready = api.call("GET", "/readyz").json()
    assert ready["checks"]["workers"] == 0, ready
    query_id, train_id = api.submit_query(stack["photo"]), api.train(seed=31)
    watched_until = time.monotonic() + 4
    while time.monotonic() < watched_until:  # nobody may take them
        for job_id in (query_id, train_id):
            job = api.job(job_id)
            assert job["status"] == "queued" and job["started_at"] is None, job
        time.sleep(0.5)
    assert query_id in queued_ids(client, f"{prefix}.query")
    assert train_id in queued_ids(client, f"{prefix}.train")
    start_worker(stack, "wboth", None)  # one worker serving both queues
    started = time.monotonic()
    for job_id in (query_id, train_id):
        job = api.wait(job_id, timeout=240)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
    print(f"both queued jobs done {time.monotonic() - started:.1f}s after a worker started")
    procs.stop("wboth")
    start_standard_workers(stack)


# --------------------------------------------------------------------------- fault 5


def _read_only_wrapper(folder: Path) -> list[str]:
    """The worker in a mount namespace of its own where ``folder`` is read-only (even for root)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespaces here ({probe.stderr.decode().strip()}): the "
                    "read-only variant needs CAP_SYS_ADMIN; the full-disk variant still runs")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(folder)]


def _file_size_limit_wrapper(limit: int) -> list[str]:
    """The worker with RLIMIT_FSIZE: any write past ``limit`` bytes fails with EFBIG (Python
    ignores SIGXFSZ), as on a disk that fills up during the save; applies to root too."""
    script = ("import os, resource, sys; "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", script]


@pytest.mark.parametrize(("mode", "reason"), [("read_only", "Read-only file system"),
                                              ("full", "File too large")])
def test_training_that_cannot_write_its_version_fails_cleanly(stack, mode, reason):
    api, procs = stack["api"], stack["procs"]
    start_standard_workers(stack)
    wrap = (_read_only_wrapper(stack["artifacts"]) if mode == "read_only"
            else _file_size_limit_wrapper(1024 * 1024))  # the weights alone are ~3.7 MB
    before, versions_before = active_version(stack), registered(stack)
    procs.stop("wtrain")
    name = f"wtrain_{mode}"
    start_worker(stack, name, "train", wrap=wrap)
    try:
        job = api.wait(api.train(seed=41), timeout=240)
    finally:
        procs.stop(name)
        start_standard_workers(stack)
    print(f"{mode}: {job['error']}")
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "artifacts_write_failed", job["error"]
    assert reason in job["error"]["message"] and str(stack["artifacts"]) in job["error"]["message"]
    assert active_version(stack) == before and registered(stack) == versions_before
    assert not [p for p in stack["artifacts"].iterdir() if p.name.startswith(".partial-")]
    assert_no_half_written_version(stack)
    result = api.wait(api.submit_query(stack["photo"]), timeout=60)
    assert result["status"] == "succeeded" and result["result"]["model_version"] == before


# --------------------------------------------------------------------------- fault 6


class PointerWatch:
    """Reads the active pointer every few ms on a thread; checks each new value is complete."""

    def __init__(self, stack) -> None:
        self.client = redis.Redis.from_url(stack["server"].url)
        self.registry = ModelRegistry(self.client, Keys(stack["prefix"]))
        self.artifacts = stack["artifacts"]
        self.seen: list[str] = []
        self.incomplete: list[tuple[str, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            version = self.registry.active_version()
            if version and (not self.seen or self.seen[-1] != version):
                self.seen.append(version)
                missing = self.registry.missing_parts(version, self.artifacts)
                if missing or self.registry.describe(version) is None:
                    self.incomplete.append((version, missing))
            self._stop.wait(0.005)

    def __enter__(self) -> PointerWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _interval(job: dict) -> tuple[str, str]:
    return job["started_at"], job["finished_at"]


@pytest.mark.parametrize("train_processes", [2, 1])
def test_two_trainings_at_once_leave_one_complete_active_version(stack, train_processes):
    api, procs = stack["api"], stack["procs"]
    start_standard_workers(stack)
    versions_before = registered(stack)
    procs.stop("wtrain")
    name = f"wtrain_x{train_processes}"
    start_worker(stack, name, "train", concurrency=train_processes)
    try:
        with PointerWatch(stack) as watch, QueryLoop(stack) as loop:
            ids = [api.train(epochs=4, batch_size=4, seed=50 + i) for i in range(2)]
            jobs = [api.wait(job_id, timeout=300) for job_id in ids]
            wait_until(lambda: watch.seen and watch.seen[-1] == active_version(stack), 10,
                       "the watcher saw the final pointer")
    finally:
        procs.stop(name)
        start_standard_workers(stack)
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    first, second = sorted(jobs, key=lambda j: j["finished_at"])
    if train_processes == 2:  # both ran at once
        assert second["started_at"] < first["finished_at"], [_interval(j) for j in jobs]
    else:  # the second waited for the first
        assert second["started_at"] >= first["finished_at"], [_interval(j) for j in jobs]
    new = {j["result"]["version"] for j in jobs}
    assert registered(stack) - versions_before == new
    assert active_version(stack) == second["result"]["version"]
    assert watch.incomplete == [], watch.incomplete
    assert second["result"]["version"] in watch.seen
    assert set(watch.seen) <= versions_before | new, watch.seen
    assert_no_half_written_version(stack)
    assert loop.results and loop.failures() == [], loop.failures()
    print(json.dumps({"pointer_values_seen": watch.seen, "queries": len(loop.results)}))
