"""Job records kept in Redis by the service itself (Celery reports unknown ids as PENDING)."""

from __future__ import annotations

import json
import time
import uuid
from enum import StrEnum
from typing import Any

import redis

from shared.keys import Keys

TRAIN_TASK = "imgsim.train"
QUERY_TASK = "imgsim.query"
TRAIN_QUEUE = "train"
QUERY_QUEUE = "query"
# Index operations (issue 4): adding images runs on the train queue (it embeds, like training);
# queries by id / batches on the query queue; superseded-version clean-up on the train queue.
INDEX_TASK = "imgsim.index"
SEARCH_TASK = "imgsim.search"
GC_VERSIONS_TASK = "imgsim.gc_versions"


class JobType(StrEnum):
    TRAIN = "train"
    QUERY = "query"
    INDEX = "index"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
_JSON_FIELDS = ("progress", "result", "error", "params")

def now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class JobStore:
    """Create, read and update job records (one Redis hash per job, with a TTL)."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_s = ttl_s

    def create(self, job_type: JobType, params: dict[str, Any]) -> dict[str, Any]:
        """Record a new queued job.

        Args:
            job_type: train or query.
            params: the validated request parameters (JSON-serialisable).

        Returns:
            The job record as the API shows it.
        """
        job_id = uuid.uuid4().hex
        created = now_iso()
        fields = {
            "job_id": job_id,
            "type": str(job_type),
            "status": str(JobStatus.QUEUED),
            "created_at": created,
            "params": json.dumps(params),
            "progress": json.dumps({}),
        }
        key = self._keys.job(job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self._ttl_s)
        pipe.zadd(self._keys.jobs_index(), {job_id: time.time()})
        pipe.execute()
        return self.get(job_id) or {}

    def get(self, job_id: str) -> dict[str, Any] | None:
        """Read a job record.

        Args:
            job_id: the id the API issued.

        Returns:
            The record, or None when no such job exists (never issued, or expired).
        """
        raw = self._redis.hgetall(self._keys.job(job_id))
        if not raw:
            return None
        record: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        for name in _JSON_FIELDS:
            record[name] = json.loads(record[name]) if record.get(name) else None
        if record.get("progress") is None:
            record["progress"] = {}
        return {
            "job_id": record["job_id"],
            "type": record["type"],
            "status": record["status"],
            "progress": record["progress"],
            "result": record.get("result"),
            "error": record.get("error"),
            "params": record.get("params") or {},
            "created_at": record.get("created_at"),
            "started_at": record.get("started_at") or None,
            "finished_at": record.get("finished_at") or None,
        }

    def status(self, job_id: str) -> str | None:
        value = self._redis.hget(self._keys.job(job_id), "status")
        return value.decode() if value else None

    def _transition(
        self,
        job_id: str,
        to: JobStatus,
        allowed: set[JobStatus],
        fields: dict[str, str] | None = None,
    ) -> bool:
        """Set status (and ``fields``) in one transaction, only from an allowed status."""
        key = self._keys.job(job_id)
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = pipe.hget(key, "status")
                    if current is None or current.decode() not in {str(s) for s in allowed}:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping={"status": str(to), **(fields or {})})
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def mark_running(self, job_id: str) -> bool:
        """Queued (or redelivered running) -> running. False if the job is gone or finished."""
        ok = self._transition(job_id, JobStatus.RUNNING, {JobStatus.QUEUED, JobStatus.RUNNING})
        if ok:  # a redelivered job keeps its first start time
            self._redis.hsetnx(self._keys.job(job_id), "started_at", now_iso())
        return ok

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Replace the progress object of a job (the worker throttles how often)."""
        self._redis.hset(self._keys.job(job_id), "progress", json.dumps(progress))

    def succeed(self, job_id: str, result: dict[str, Any], progress: dict | None = None) -> bool:
        """Running -> succeeded with a JSON result."""
        return self._finish(job_id, JobStatus.SUCCEEDED, result=result, progress=progress)

    def fail(self, job_id: str, code: str, message: str) -> bool:
        """Queued/running -> failed with ``{"code", "message"}``."""
        return self._finish(job_id, JobStatus.FAILED, error={"code": code, "message": message})

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        result: dict | None = None,
        error: dict | None = None,
        progress: dict | None = None,
    ) -> bool:
        fields: dict[str, str] = {"finished_at": now_iso()}
        if result is not None:
            fields["result"] = json.dumps(result)
        if error is not None:
            fields["error"] = json.dumps(error)
        if progress is not None:
            fields["progress"] = json.dumps(progress)
        changed = self._transition(job_id, status, {JobStatus.QUEUED, JobStatus.RUNNING}, fields)
        if changed:  # wake long-polling readers (GET /jobs/<id>?wait=N)
            self._redis.publish(self._keys.job_events(job_id), str(status))
        return changed

    def wait_until_final(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """Read a job, waiting up to ``timeout_s`` seconds for it to end.

        Subscribes before reading so an ending between the read and the wait is never missed.

        Args:
            job_id: the job.
            timeout_s: longest wait.

        Returns:
            The record (final, or as it stands when the time is up), or None if unknown.
        """
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._keys.job_events(job_id))
            deadline = time.monotonic() + timeout_s
            while True:
                job = self.get(job_id)
                if job is None or job["status"] in FINAL_STATUSES:
                    return job
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return job
                pubsub.get_message(timeout=min(remaining, 1.0))
        finally:
            pubsub.close()
