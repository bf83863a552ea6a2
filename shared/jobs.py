"""Job records kept in Redis by the service itself (Celery reports unknown ids as PENDING)."""

from __future__ import annotations

import base64
import binascii
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
# Evaluation (issue 5) embeds a folder of query images, like indexing: train queue.
EVALUATE_TASK = "imgsim.evaluate"


class JobType(StrEnum):
    TRAIN = "train"
    QUERY = "query"
    INDEX = "index"
    EVALUATE = "evaluate"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
_JSON_FIELDS = ("progress", "result", "error", "params")
# Writes to a job that already expired must not recreate it as a hash without a TTL, and a
# worker whose attempt was superseded (ARGV[3], when given) must not write over its successor.
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if ARGV[3] ~= nil and ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then
  return -2
end
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""
# GET /jobs reads the index in batches of this many ids, and at most LIST_SCAN_LIMIT per call.
# Ids trim_index looks at per call.
TRIM_BATCH = 200
LIST_BATCH = 200
LIST_SCAN_LIMIT = 2000


class CursorError(ValueError):
    """A ``GET /jobs`` cursor this store did not issue."""


class AttemptSuperseded(RuntimeError):
    """This run of a job is no longer its current attempt (its message was restored to another
    worker, which started it again); the run must stop without touching the record."""

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(f"job {job_id}: attempt {attempt} was superseded")
        self.job_id = job_id
        self.attempt = attempt


def encode_cursor(score: float, job_id: str) -> str:
    """Opaque paging cursor: the position (creation time, id) of the last job listed."""
    return base64.urlsafe_b64encode(f"{score!r}:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Inverse of ``encode_cursor``; raises CursorError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score_text, job_id = raw.split(":", 1)
        score = float(score_text)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise CursorError("cursor is not one this service issued") from None
    if not (score == score and len(job_id) == 32):  # rejects nan and foreign strings
        raise CursorError("cursor is not one this service issued")
    return score, job_id

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
        pipe.zrangebyscore(self._keys.jobs_index(), "-inf", time.time() - self._ttl_s, start=0,
                           num=TRIM_BATCH)
        # The index outlives no record for long; usually nothing is old enough to look at.
        self._drop_expired(pipe.execute()[-1])
        return self.get(job_id) or {}

    def get(self, job_id: str) -> dict[str, Any] | None:
        """Read a job record.

        Args:
            job_id: the id the API issued.

        Returns:
            The record, or None when no such job exists (never issued, or expired).
        """
        return self._record(self._redis.hgetall(self._keys.job(job_id)))

    @staticmethod
    def _record(raw: dict[bytes, bytes]) -> dict[str, Any] | None:
        """The API's view of a raw job hash (None for a missing or partial one)."""
        if not raw or b"job_id" not in raw:
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
            "cancel_requested": record.get("cancel_requested") == "1",
            "attempts": int(record.get("attempts") or 0),
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
        attempt: int | None = None,
    ) -> bool:
        """Set status (and ``fields``) in one transaction, only from an allowed status.

        Raises:
            AttemptSuperseded: ``attempt`` given and no longer the job's current attempt.
        """
        key = self._keys.job(job_id)
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current, attempts = pipe.hmget(key, "status", "attempts")
                    if current is None or current.decode() not in {str(s) for s in allowed}:
                        pipe.unwatch()
                        return False
                    if attempt is not None and int(attempts or 0) != attempt:
                        pipe.unwatch()
                        raise AttemptSuperseded(job_id, attempt)
                    pipe.multi()
                    pipe.hset(key, mapping={"status": str(to), **(fields or {})})
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def mark_running(self, job_id: str, max_attempts: int | None = None) -> int:
        """Queued (or redelivered running) -> running, as a new attempt.

        Every start of a job is an attempt; a message delivered again after its worker was lost
        starts the next one, and the earlier run (if it is in fact still alive somewhere) finds
        itself superseded at its next write. Beyond ``max_attempts`` starts the job fails with
        ``worker_lost`` instead of running again (a job that kills its worker every time).

        Args:
            job_id: the job.
            max_attempts: most starts allowed; None for no limit.

        Returns:
            The attempt number (1 for the first start), or 0 when the job must not run: gone,
            finished, canceled, or out of attempts (then marked failed here).
        """
        key = self._keys.job(job_id)
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current, attempts = pipe.hmget(key, "status", "attempts")
                    if current is None or current.decode() not in {JobStatus.QUEUED,
                                                                   JobStatus.RUNNING}:
                        pipe.unwatch()
                        return 0
                    attempt = int(attempts or 0) + 1
                    pipe.multi()
                    if max_attempts is not None and attempt > max_attempts:
                        error = {"code": "worker_lost",
                                 "message": f"the job was started {attempt - 1} time(s) and its "
                                            f"worker was lost each time (killed, out of memory "
                                            f"or restarted); not starting it again"}
                        pipe.hset(key, mapping={"status": str(JobStatus.FAILED),
                                                "finished_at": now_iso(),
                                                "error": json.dumps(error)})
                        pipe.publish(self._keys.job_events(job_id), str(JobStatus.FAILED))
                        pipe.execute()
                        return 0
                    pipe.hset(key, mapping={"status": str(JobStatus.RUNNING),
                                            "attempts": str(attempt)})
                    pipe.hsetnx(key, "started_at", now_iso())  # a rerun keeps its first start
                    pipe.execute()
                    return attempt
                except redis.WatchError:
                    continue

    def set_progress(self, job_id: str, progress: dict[str, Any],
                     attempt: int | None = None) -> None:
        """Replace the progress object of a job (the worker throttles how often).

        Raises:
            AttemptSuperseded: ``attempt`` given and no longer the job's current attempt.
        """
        answer = self._redis.eval(_SET_IF_EXISTS, 1, self._keys.job(job_id), "progress",
                                  json.dumps(progress), "" if attempt is None else str(attempt))
        if answer == -2:
            raise AttemptSuperseded(job_id, attempt or 0)

    def report_and_check_cancel(self, job_id: str, progress: dict[str, Any],
                                attempt: int | None = None) -> bool:
        """Write progress and read the cancel flag in one round trip.

        Args:
            job_id: the running job.
            progress: the new progress object.
            attempt: the caller's attempt; when given, a superseded attempt raises.

        Returns:
            True when a cancel was requested (or the record is gone: nobody waits for it).

        Raises:
            AttemptSuperseded: ``attempt`` is no longer the job's current attempt.
        """
        key = self._keys.job(job_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.eval(_SET_IF_EXISTS, 1, key, "progress", json.dumps(progress),
                  "" if attempt is None else str(attempt))
        pipe.hmget(key, "status", "cancel_requested")
        written, (status, flag) = pipe.execute()
        if written == -2:
            raise AttemptSuperseded(job_id, attempt or 0)
        return status is None or flag == b"1" or status.decode() == JobStatus.CANCELED

    def request_cancel(self, job_id: str) -> str:
        """Cancel a job: at once when queued, at the worker's next check when running.

        Args:
            job_id: the job.

        Returns:
            "canceled" (was queued: it will never run), "requested" (running: the worker
            stops at its next check), "finished" (already ended) or "missing".
        """
        key = self._keys.job(job_id)
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = pipe.hget(key, "status")
                    if current is None:
                        pipe.unwatch()
                        return "missing"
                    status = current.decode()
                    if status in FINAL_STATUSES:
                        pipe.unwatch()
                        return "finished"
                    pipe.multi()
                    if status == JobStatus.QUEUED:
                        pipe.hset(key, mapping={
                            "status": str(JobStatus.CANCELED), "cancel_requested": "1",
                            "finished_at": now_iso(),
                            "error": json.dumps({"code": "canceled",
                                                 "message": "canceled before it started"}),
                        })
                        pipe.publish(self._keys.job_events(job_id), str(JobStatus.CANCELED))
                    else:
                        pipe.hset(key, "cancel_requested", "1")
                    pipe.execute()
                    return "canceled" if status == JobStatus.QUEUED else "requested"
                except redis.WatchError:
                    continue

    def cancel_requested(self, job_id: str) -> bool:
        """True when someone asked to cancel this job."""
        return self._redis.hget(self._keys.job(job_id), "cancel_requested") == b"1"

    def mark_canceled(self, job_id: str, message: str = "canceled while running",
                      attempt: int | None = None) -> bool:
        """Running (or queued) -> canceled, once the worker has stopped and cleaned up."""
        return self._finish(job_id, JobStatus.CANCELED,
                            error={"code": "canceled", "message": message}, attempt=attempt)

    def trim_index(self, batch: int = TRIM_BATCH) -> int:
        """Drop the ids of expired records from the old end of the jobs index.

        Only ids older than this process's TTL are looked at (usually none: they were trimmed
        before), and each is removed only once its record is gone. A record's own expiry is
        what counts: another API process may run with a longer IMGSIM_JOB_TTL_S (a rolling
        change of the setting), and its jobs must stay listed for as long as they exist.

        Args:
            batch: most ids looked at per call (keeps a create cheap).

        Returns:
            How many ids were removed.
        """
        return self._drop_expired(self._redis.zrangebyscore(
            self._keys.jobs_index(), "-inf", time.time() - self._ttl_s, start=0, num=batch))

    def _drop_expired(self, candidates: list[bytes]) -> int:
        """Remove from the jobs index those of ``candidates`` whose record is gone."""
        if not candidates:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for member in candidates:
            pipe.exists(self._keys.job(member.decode()))
        gone = [m for m, alive in zip(candidates, pipe.execute(), strict=True) if not alive]
        if gone:
            self._redis.zrem(self._keys.jobs_index(), *gone)
        return len(gone)

    def list_jobs(
        self,
        job_type: str | None = None,
        status: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Recent jobs, newest first, optionally of one type and status.

        Reads at most ``LIST_SCAN_LIMIT`` ids per call, so a rare filter may return a short
        page with a cursor to go on from; ids whose record expired are removed on the way.

        Args:
            job_type: only jobs of this type.
            status: only jobs in this status.
            limit: most jobs returned.
            cursor: ``next_cursor`` of the previous page.

        Returns:
            (job records, next cursor or None when the index is exhausted).

        Raises:
            CursorError: a cursor this store did not issue.
        """
        self.trim_index()
        after = decode_cursor(cursor) if cursor else None
        index = self._keys.jobs_index()
        top = after[0] if after else "+inf"
        found: list[tuple[str, float]] = []
        offset = examined = 0
        last: tuple[float, str] | None = None
        while True:
            batch = self._redis.zrevrangebyscore(index, top, "-inf", start=offset, num=LIST_BATCH,
                                                 withscores=True)
            if not batch:
                return self._records(found), None
            offset += len(batch)
            ids = [(member.decode(), score) for member, score in batch]
            if after:  # same score as the cursor: ids come in descending order, skip seen ones
                ids = [(i, s) for i, s in ids if s < after[0] or i < after[1]]
            pipe = self._redis.pipeline(transaction=False)
            for job_id, _ in ids:
                pipe.hmget(self._keys.job(job_id), "type", "status")
            expired = []
            for (job_id, score), (kind, state) in zip(ids, pipe.execute(), strict=True):
                last = (score, job_id)
                if kind is None:
                    expired.append(job_id)
                    continue
                if (job_type is None or kind.decode() == job_type) and (
                        status is None or state.decode() == status):
                    found.append((job_id, score))
                    if len(found) >= limit:
                        break
            if expired:
                self._redis.zrem(index, *expired)
            examined += len(batch)
            if len(found) >= limit or examined >= LIST_SCAN_LIMIT:
                position = (found[-1][1], found[-1][0]) if len(found) >= limit else last
                cursor_out = encode_cursor(*position) if position else None
                return self._records(found), cursor_out

    def _records(self, found: list[tuple[str, float]]) -> list[dict[str, Any]]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id, _ in found:
            pipe.hgetall(self._keys.job(job_id))
        return [r for r in map(self._record, pipe.execute()) if r is not None]

    def succeed(self, job_id: str, result: dict[str, Any], progress: dict | None = None,
                attempt: int | None = None) -> bool:
        """Running -> succeeded with a JSON result (only by the current ``attempt`` if given)."""
        return self._finish(job_id, JobStatus.SUCCEEDED, result=result, progress=progress,
                            attempt=attempt)

    def fail(self, job_id: str, code: str, message: str, attempt: int | None = None) -> bool:
        """Queued/running -> failed with ``{"code", "message"}``."""
        return self._finish(job_id, JobStatus.FAILED, error={"code": code, "message": message},
                            attempt=attempt)

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        result: dict | None = None,
        error: dict | None = None,
        progress: dict | None = None,
        attempt: int | None = None,
    ) -> bool:
        fields: dict[str, str] = {"finished_at": now_iso()}
        if result is not None:
            fields["result"] = json.dumps(result)
        if error is not None:
            fields["error"] = json.dumps(error)
        if progress is not None:
            fields["progress"] = json.dumps(progress)
        changed = self._transition(job_id, status, {JobStatus.QUEUED, JobStatus.RUNNING}, fields,
                                   attempt)
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
