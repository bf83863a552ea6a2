"""Worker heartbeats, and jobs restored when their worker was lost (runs in the Celery parent).

With late acks on the Redis transport a delivered message waits in the ``unacked`` hash until
the worker acks it. When a prefork child dies, its parent requeues the message at once
(``task_reject_on_worker_lost``). When the whole worker dies (SIGKILL, out of memory, machine
lost), nobody does: kombu restores the message only once it is older than the visibility
timeout, which must stay above the longest training (3 h 10 min by default) or a running
training would be delivered twice. Measured here: after a SIGKILL of the worker and a
restart, the training's message stayed in ``unacked`` and the job ``running`` indefinitely.

So every worker parent

* writes a heartbeat every ``IMGSIM_HEARTBEAT_S`` seconds: ``<prefix>:worker:<nodename>#<id>``
  (``id`` new at every start) = JSON ``{"node", "pid", "tasks": [ids of the messages it
  holds]}``, expiring after 3 periods;
* sweeps the ``unacked`` hash (one worker at a time, under a short Redis lock): a job message
  delivered more than 3 periods ago that no live heartbeat lists belongs to a lost worker. It
  is put back at the head of its queue when its job is still queued or running (the next
  start is a new attempt: ``JobStore.mark_running`` counts them and fails the job with
  ``worker_lost`` beyond ``IMGSIM_MAX_ATTEMPTS``), or simply dropped when the job already
  ended (its ack was lost, e.g. with a Redis restart) or expired.

Every worker start has a heartbeat of its own: two live workers sharing a node name (two
plain ``celery worker`` commands on one host are both ``celery@host``) must not hide each
other's messages, or a running training would be taken for lost and started again. A lost
worker's jobs are restored once its heartbeat has expired, at most 3 periods after it died.
Only job messages are handled here; anything else (the delayed version clean-up) is left to
kombu's visibility timeout.

This module never imports torch: it runs in the parent process, before and after the fork.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

import redis
from celery import Celery
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from shared.jobs import (
    EVALUATE_TASK,
    FINAL_STATUSES,
    INDEX_TASK,
    QUERY_TASK,
    SEARCH_TASK,
    TRAIN_TASK,
    JobStore,
)
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger(__name__)

JOB_TASKS = frozenset({TRAIN_TASK, QUERY_TASK, INDEX_TASK, SEARCH_TASK, EVALUATE_TASK})
# A heartbeat lives this many periods; a message delivered longer ago than that and held by
# no live worker is a lost one.
LOST_AFTER_PERIODS = 3
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a Redis SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def held_task_ids() -> list[str]:
    """Ids of every message this worker process holds (reserved, running or scheduled)."""
    from celery.worker import state

    for _ in range(5):
        try:
            held = set(state.requests) | {r.id for r in list(state.active_requests)}
            return sorted(held | {r.id for r in list(state.scheduled_requests)})
        except RuntimeError:  # a set changed while it was copied; read it again
            continue
    return sorted(state.requests)


class Supervisor:
    """Heartbeat and lost-job sweep of one worker (a daemon thread in the Celery parent).

    Args:
        app: the worker's Celery app (its broker options name the unacked keys).
        settings: service settings (prefix, heartbeat period, job TTL).
        nodename: the worker's node name (``name@host``).
    """

    def __init__(self, app: Celery, settings: Settings, nodename: str) -> None:
        self.app = app
        self.settings = settings
        self.nodename = nodename
        self.keys = Keys(settings.key_prefix)
        self.heartbeat_key = self.keys.worker_heartbeat(f"{nodename}#{uuid.uuid4().hex[:12]}")
        self._warned_duplicate = False
        # Short, even retries: after a Redis restart the heartbeat must be back well within the
        # 3 periods after which others would count this worker as lost.
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0,
            retry=Retry(ConstantBackoff(0.5), 4,
                        supported_errors=(redis.ConnectionError, redis.TimeoutError)),
            health_check_interval=15)
        self.jobs = JobStore(self.redis, self.keys, settings.job_ttl_s)
        options = app.conf.broker_transport_options
        self.unacked_key = options["unacked_key"]
        self.unacked_index_key = options["unacked_index_key"]
        self.lost_after_s = LOST_AFTER_PERIODS * settings.heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ heartbeat

    def beat(self) -> None:
        """Write this worker's heartbeat with the ids of the messages it holds."""
        value = json.dumps({"node": self.nodename, "pid": os.getpid(),
                            "tasks": held_task_ids(), "at": time.time()})
        self.redis.set(self.heartbeat_key, value, ex=self.lost_after_s)
        if not self._warned_duplicate:
            twins = [key for key in self.redis.scan_iter(
                match=self.keys.worker_heartbeat(f"{_glob_escape(self.nodename)}#*"), count=200)
                if key.decode() != self.heartbeat_key]
            if twins:
                # Harmless for jobs (each start beats under its own key), confusing for
                # Celery's own tools (inspect, control) that address workers by node name.
                log.warning("another live worker uses the node name %s: give each worker its "
                            "own with -n NAME@%%h", self.nodename)
                self._warned_duplicate = True

    def forget(self) -> None:
        """Remove this worker's heartbeat (clean shutdown: it holds nothing any more)."""
        self.redis.delete(self.heartbeat_key)

    def _claimed(self) -> set[str] | None:
        """Task ids held by live workers; None when a heartbeat does not say (older worker)."""
        names = list(self.redis.scan_iter(match=self.keys.worker_heartbeats_pattern(),
                                          count=200))
        claimed: set[str] = set()
        for raw in self.redis.mget(names) if names else []:
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                claimed.update(json.loads(raw)["tasks"])
            except (ValueError, KeyError, TypeError):
                return None
        return claimed

    # ------------------------------------------------------------------ sweep

    def sweep(self) -> dict[str, list[str]]:
        """Restore (or drop) job messages whose worker was lost; at most one sweeper at a time.

        Returns:
            ``{"restored": [job ids], "dropped": [job ids]}``.
        """
        outcome: dict[str, list[str]] = {"restored": [], "dropped": []}
        cutoff = time.time() - self.lost_after_s
        stale = self.redis.zrange(self.unacked_index_key, "-inf", cutoff, byscore=True,
                                  withscores=True)
        if not stale:
            return outcome
        lock_key, token = f"{self.keys.prefix}:recovery_lock", uuid.uuid4().hex
        if not self.redis.set(lock_key, token, nx=True, ex=60):
            return outcome  # another worker is sweeping
        try:
            claimed = self._claimed()
            if claimed is None:
                log.warning("a live worker's heartbeat does not list its tasks: not sweeping")
                return outcome
            for tag, score in stale:
                self._settle(tag, score, claimed, outcome)
        finally:
            self.redis.eval(_RELEASE_LOCK, 1, lock_key, token)
        return outcome

    def _settle(self, tag: bytes, score: float, claimed: set[str],
                outcome: dict[str, list[str]]) -> None:
        raw = self.redis.hget(self.unacked_key, tag)
        if raw is None:  # acked meanwhile
            return
        try:
            payload = json.loads(raw)[0]
            headers = payload.get("headers") or {}
            task_id, task_name = headers.get("id"), headers.get("task")
        except (ValueError, IndexError, AttributeError, TypeError):
            return
        if task_name not in JOB_TASKS or not task_id or task_id in claimed:
            return
        status = self.jobs.status(task_id)
        # Delivered again since the index was read (another sweeper restored it): leave it.
        if self.redis.zscore(self.unacked_index_key, tag) != score:
            return
        if status is None or status in FINAL_STATUSES:
            # The job ended (or expired) but its ack never arrived: acknowledge it now.
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(self.unacked_index_key, tag)
            pipe.hdel(self.unacked_key, tag)
            pipe.execute()
            outcome["dropped"].append(task_id)
            log.info("job %s (%s) ended but its message was never acked: dropped it",
                     task_id, status or "expired")
            return
        with self.app.connection_for_write() as conn:
            # kombu's own restore: the message goes back to its queue, marked redelivered.
            conn.default_channel.qos.restore_by_tag(tag, leftmost=False)
        outcome["restored"].append(task_id)
        log.warning("job %s (%s, %s) was held by a lost worker for %.0f s: restored to its "
                    "queue", task_id, task_name, status, time.time() - score)

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        """Beat and sweep once now, then every ``heartbeat_s`` seconds on a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="imgsim-supervisor",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.forget()
        except redis.RedisError as exc:
            log.warning("could not remove the heartbeat: %s", exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                self.sweep()
            except redis.RedisError as exc:  # Redis down: /readyz says so; keep trying
                log.warning("heartbeat or sweep failed: %s", exc)
            except Exception:  # never let the thread die silently
                log.exception("heartbeat or sweep failed")
            self._stop.wait(self.settings.heartbeat_s)

