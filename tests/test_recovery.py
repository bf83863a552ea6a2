"""Job attempts (fencing) and the lost-worker sweep, against the real Redis (no worker needed).

The sweep is driven with real Celery messages: sent by the API's way (``send_task``), taken off
the queue and filed in the ``unacked`` hash exactly as kombu files a delivered message.
"""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import pytest
import redis
from celery import Celery
from celery.exceptions import Reject

from shared.jobs import QUERY_TASK, AttemptSuperseded, JobStatus, JobStore, JobType
from shared.keys import Keys
from shared.redis_clients import broker_transport_options
from shared.settings import Settings
from workers.recovery import Supervisor

# --------------------------------------------------------------------------- attempts


@pytest.fixture
def store(redis_client, key_prefix):
    return JobStore(redis_client, Keys(key_prefix), ttl_s=600)


def test_every_start_is_a_new_attempt_and_the_limit_fails_the_job(store):
    job = store.create(JobType.TRAIN, {"dataset": "x"})
    assert store.mark_running(job["job_id"], max_attempts=2) == 1
    assert store.mark_running(job["job_id"], max_attempts=2) == 2  # delivered again
    assert store.get(job["job_id"])["attempts"] == 2
    assert store.mark_running(job["job_id"], max_attempts=2) == 0  # lost twice: give up
    record = store.get(job["job_id"])
    assert record["status"] == JobStatus.FAILED and record["error"]["code"] == "worker_lost"
    assert "started 2 time(s)" in record["error"]["message"]
    assert store.mark_running(job["job_id"], max_attempts=5) == 0  # ended: never again


def test_a_superseded_attempt_cannot_write_progress_or_an_outcome(store):
    job_id = store.create(JobType.TRAIN, {})["job_id"]
    first = store.mark_running(job_id)
    second = store.mark_running(job_id)
    store.set_progress(job_id, {"phase": "train", "epoch": 1}, second)
    with pytest.raises(AttemptSuperseded):
        store.set_progress(job_id, {"phase": "stale"}, first)
    with pytest.raises(AttemptSuperseded):
        store.report_and_check_cancel(job_id, {"phase": "stale"}, first)
    with pytest.raises(AttemptSuperseded):
        store.succeed(job_id, {"from": "first"}, attempt=first)
    with pytest.raises(AttemptSuperseded):
        store.fail(job_id, "x", "y", attempt=first)
    assert store.get(job_id)["progress"] == {"phase": "train", "epoch": 1}
    assert store.succeed(job_id, {"from": "second"}, attempt=second)
    assert store.get(job_id)["result"] == {"from": "second"}


def test_a_run_redis_cannot_record_is_rejected_for_redelivery_not_acked(store):
    from workers.tasks import _run  # no torch: the worker's task wrapper only

    ctx = SimpleNamespace(jobs=store, settings=Settings.from_env({}))
    job_id = store.create(JobType.QUERY, {})["job_id"]

    def redis_gone(_attempt):
        raise redis.ConnectionError("Redis went away for longer than the retries")

    with pytest.raises(Reject) as info:
        _run(ctx, job_id, redis_gone)
    assert info.value.requeue
    assert store.get(job_id)["status"] == JobStatus.RUNNING  # runs again when redelivered

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    down = JobStore(redis.Redis(port=closed, socket_connect_timeout=1, retry=None),
                    store._keys, 600)
    with pytest.raises(Reject):
        _run(SimpleNamespace(jobs=down, settings=ctx.settings), job_id, redis_gone)


def test_a_superseded_run_stops_without_recording_anything(store):
    from workers.tasks import _run

    ctx = SimpleNamespace(jobs=store, settings=Settings.from_env({}))
    job_id = store.create(JobType.QUERY, {})["job_id"]

    def overtaken(attempt):
        store.mark_running(job_id)  # the message was restored and started again elsewhere
        store.set_progress(job_id, {"phase": "late"}, attempt)
        return {}, {}

    assert _run(ctx, job_id, overtaken) == {"job_id": job_id, "status": "superseded",
                                            "attempt": 1}
    record = store.get(job_id)
    assert record["status"] == JobStatus.RUNNING and record["attempts"] == 2
    assert record["progress"] == {}


# --------------------------------------------------------------------------- sweep


@pytest.fixture
def sweep(redis_url, redis_client, key_prefix):
    settings = Settings.from_env({"IMGSIM_REDIS_URL": redis_url, "IMGSIM_KEY_PREFIX": key_prefix,
                                  "IMGSIM_HEARTBEAT_S": "1"})
    app = Celery("test-recovery", broker=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"],
                    broker_transport="workers.broker:Transport",
                    broker_transport_options=broker_transport_options(settings))
    supervisor = Supervisor(app, settings, f"sweeper@{key_prefix}")
    queue = Keys(key_prefix).queue("query")
    store = JobStore(redis_client, Keys(key_prefix), settings.job_ttl_s)

    def deliver(status: str | None, age_s: float, task: str = QUERY_TASK) -> str:
        """A job message sent, then taken by a worker ``age_s`` seconds ago (not acked)."""
        job_id = store.create(JobType.QUERY, {})["job_id"]
        if status == "running":
            store.mark_running(job_id)
        elif status == "succeeded":
            store.mark_running(job_id)
            store.succeed(job_id, {})
        elif status is None:
            redis_client.delete(Keys(key_prefix).job(job_id))
        app.send_task(task, args=[job_id], task_id=job_id, queue=queue)
        raw = redis_client.rpop(queue)
        payload = json.loads(raw)
        tag = payload["properties"]["delivery_tag"]
        redis_client.hset(f"{key_prefix}.unacked", tag, json.dumps([payload, "", queue]))
        redis_client.zadd(f"{key_prefix}.unacked_index", {tag: time.time() - age_s})
        return job_id

    def queued() -> list[str]:
        return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue, 0, -1)]

    def unacked() -> set[str]:
        return {json.loads(raw)[0]["headers"]["id"]
                for raw in redis_client.hvals(f"{key_prefix}.unacked")}

    yield {"supervisor": supervisor, "deliver": deliver, "queued": queued, "unacked": unacked,
           "redis": redis_client, "prefix": key_prefix}
    for name in ("query", "train"):
        redis_client.delete(f"_kombu.binding.{key_prefix}.{name}")


def test_sweep_restores_only_job_messages_no_live_worker_holds(sweep):
    deliver, supervisor = sweep["deliver"], sweep["supervisor"]
    lost_running = deliver("running", age_s=60)
    lost_queued = deliver("queued", age_s=60)  # taken, never started: the worker died first
    recent = deliver("running", age_s=0.5)  # its worker may not have beaten yet
    held = deliver("running", age_s=60)
    ended = deliver("succeeded", age_s=60)  # its ack was lost
    expired = deliver(None, age_s=60)
    other = deliver("running", age_s=60, task="imgsim.gc_versions")  # not a job: kombu's
    sweep["redis"].set(f"{sweep['prefix']}:worker:alive@host",
                       json.dumps({"pid": 1, "tasks": [held]}), ex=30)

    outcome = supervisor.sweep()

    assert sorted(outcome["restored"]) == sorted([lost_running, lost_queued])
    assert sorted(outcome["dropped"]) == sorted([ended, expired])
    assert sorted(sweep["queued"]()) == sorted([lost_running, lost_queued])
    assert sweep["unacked"]() == {recent, held, other}
    assert supervisor.sweep() == {"restored": [], "dropped": []}  # nothing twice


def test_sweep_leaves_everything_while_a_live_worker_does_not_list_its_tasks(sweep):
    lost = sweep["deliver"]("running", age_s=60)
    sweep["redis"].set(f"{sweep['prefix']}:worker:old@host", "1", ex=30)  # an older worker
    assert sweep["supervisor"].sweep() == {"restored": [], "dropped": []}
    assert sweep["unacked"]() == {lost}


def test_only_one_worker_sweeps_at_a_time(sweep):
    lost = sweep["deliver"]("running", age_s=60)
    sweep["redis"].set(f"{sweep['prefix']}:recovery_lock", "another", ex=30)
    assert sweep["supervisor"].sweep() == {"restored": [], "dropped": []}
    sweep["redis"].delete(f"{sweep['prefix']}:recovery_lock")
    assert sweep["supervisor"].sweep()["restored"] == [lost]


def test_heartbeat_lists_held_tasks_and_goes_on_shutdown(sweep):
    supervisor, client = sweep["supervisor"], sweep["redis"]
    supervisor.beat()
    key = supervisor.heartbeat_key
    assert key.startswith(f"{sweep['prefix']}:worker:{supervisor.nodename}#")
    beat = json.loads(client.get(key))
    assert beat["tasks"] == [] and beat["node"] == supervisor.nodename
    assert 0 < client.ttl(key) <= 3  # 3 periods of 1 s
    supervisor.stop()
    assert not client.exists(key)


def test_two_live_workers_with_one_node_name_do_not_hide_each_others_jobs(sweep, caplog):
    # Two plain `celery worker` commands on one host are both celery@host. Each start beats
    # under a key of its own: what one holds is never taken for lost because of the other.
    first = sweep["supervisor"]
    twin = Supervisor(first.app, first.settings, first.nodename)
    held = sweep["deliver"]("running", age_s=60)
    client = sweep["redis"]
    client.set(first.heartbeat_key, json.dumps({"node": first.nodename, "pid": 1,
                                                "tasks": [held]}), ex=30)
    with caplog.at_level("WARNING", logger="workers.recovery"):
        twin.beat()  # before: this overwrote the first worker's heartbeat (no tasks listed)
    assert twin.heartbeat_key != first.heartbeat_key
    assert json.loads(client.get(first.heartbeat_key))["tasks"] == [held]
    assert twin.sweep() == {"restored": [], "dropped": []}
    assert sweep["unacked"]() == {held}
    assert "another live worker uses the node name" in caplog.text
    twin.forget()


# --------------------------------------------------------------------------- hard time limit


def test_a_training_killed_at_its_hard_limit_leaves_no_half_written_version(
        store, redis_client, key_prefix, tmp_path):
    from shared.registry import ModelRegistry
    from workers.redelivery import discard_unfinished_training

    settings = Settings(redis_url="redis://unused", key_prefix=key_prefix, data_root=tmp_path,
                        artifacts_dir=tmp_path / "artifacts")
    keys = Keys(key_prefix)
    registry = ModelRegistry(redis_client, keys)
    job_id = store.create(JobType.TRAIN, {"dataset": "x"})["job_id"]
    attempt = store.mark_running(job_id)
    assert discard_unfinished_training(settings, redis_client, store.get(job_id)) is None

    # Killed while indexing: files, staging leftovers and bucket keys written, not registered.
    half = "v20261204-000000-aaaaaa"
    store.set_progress(job_id, {"phase": "index", "version": half}, attempt)
    (settings.artifacts_dir / half).mkdir(parents=True)
    (settings.artifacts_dir / f".partial-{half}").mkdir()
    redis_client.set(f"{keys.version_namespace(half)}:t0:1f", b"\x01\x00\x00\x00")
    # A complete version of another job is never touched.
    done = "v20261204-000000-bbbbbb"
    registry.register(done, {"images": 2})
    (settings.artifacts_dir / done).mkdir()
    redis_client.set(f"{keys.version_namespace(done)}:t0:1f", b"\x02\x00\x00\x00")

    assert discard_unfinished_training(settings, redis_client, store.get(job_id)) == half
    assert not (settings.artifacts_dir / half).exists()
    assert not (settings.artifacts_dir / f".partial-{half}").exists()
    assert not list(redis_client.scan_iter(match=f"{keys.version_namespace(half)}:*"))
    assert (settings.artifacts_dir / done).is_dir()
    assert redis_client.exists(f"{keys.version_namespace(done)}:t0:1f")

    other = store.create(JobType.TRAIN, {"dataset": "y"})["job_id"]
    store.set_progress(other, {"phase": "done", "version": done}, store.mark_running(other))
    assert discard_unfinished_training(settings, redis_client, store.get(other)) is None
    assert registry.describe(done) == {"images": 2}
