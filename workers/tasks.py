"""Thin Celery tasks: decode the message, call plain functions, record progress and result."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import redis
from celery.exceptions import Reject, SoftTimeLimitExceeded

from shared.jobs import QUERY_TASK, TRAIN_TASK, AttemptSuperseded
from shared.schema import TrainParams
from workers.celery_app import app, settings
from workers.context import WorkerContext, get_context
from workers.errors import JobCanceled, JobError

log = logging.getLogger(__name__)


class ThrottledProgress:
    """Writes progress to the job record at most every ``interval`` seconds (phase changes now).

    With ``cancellable`` each write also reads the job's cancel flag in the same round trip and
    raises ``JobCanceled`` once it is set, so a training stops at its next batch report. Every
    write is fenced by the run's ``attempt``: a run whose job was started again elsewhere (its
    worker was presumed lost) raises ``AttemptSuperseded`` at its next report.
    """

    def __init__(self, ctx: WorkerContext, job_id: str, interval: float = 0.5,
                 cancellable: bool = False, attempt: int | None = None) -> None:
        self._ctx = ctx
        self._job_id = job_id
        self._interval = interval
        self._cancellable = cancellable
        self._attempt = attempt
        self._last = 0.0
        self._phase = None
        self.state: dict = {}

    def __call__(self, update: dict) -> None:
        self.state.update(update)
        now = time.monotonic()
        if update.get("phase") != self._phase and "phase" in update:
            self._phase = update["phase"]
            self._last = 0.0
        if now - self._last >= self._interval:
            self._last = now
            if not self._cancellable:
                self._ctx.jobs.set_progress(self._job_id, self.state, self._attempt)
            elif self._ctx.jobs.report_and_check_cancel(self._job_id, self.state, self._attempt):
                raise JobCanceled(self._job_id)


def _run(ctx: WorkerContext, job_id: str, work: Callable[[int], tuple[dict, dict]]) -> dict:
    """Run one attempt of a job: mark it running, call ``work(attempt)``, record the outcome.

    Every write of the outcome is fenced by the attempt number, so a run that was superseded
    (its message restored and started again after its worker was presumed lost) never
    overwrites what the current attempt records. When Redis stays unreachable beyond the
    client's retries, the message is rejected for redelivery instead of acked: acking it would
    leave a job that nothing records or runs again.
    """
    try:
        attempt = ctx.jobs.mark_running(job_id, ctx.settings.max_attempts)
        if not attempt:
            # Finished, canceled, expired or out of attempts (e.g. a redelivered message).
            return {"job_id": job_id, "skipped": True}
        if ctx.jobs.cancel_requested(job_id):  # asked while the message was delivered again
            ctx.jobs.mark_canceled(job_id, attempt=attempt)
            return {"job_id": job_id, "status": "canceled"}
        try:
            result, progress = work(attempt)
        except JobCanceled:
            # Whatever was written is already removed (the pipeline cleans up on any exception).
            ctx.jobs.mark_canceled(job_id, attempt=attempt)
            return {"job_id": job_id, "status": "canceled"}
        except JobError as exc:
            ctx.jobs.fail(job_id, exc.code, exc.message, attempt=attempt)
            return {"job_id": job_id, "status": "failed"}
        except SoftTimeLimitExceeded:
            ctx.jobs.fail(job_id, "time_limit", "the job ran past its time limit",
                          attempt=attempt)
            return {"job_id": job_id, "status": "failed"}
        except (AttemptSuperseded, redis.RedisError):
            raise
        except Exception as exc:
            log.exception("job %s failed", job_id)
            ctx.jobs.fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}",
                          attempt=attempt)
            return {"job_id": job_id, "status": "failed"}
        ctx.jobs.succeed(job_id, result, progress, attempt=attempt)
    except AttemptSuperseded as exc:
        log.warning("job %s: attempt %d was superseded by a later start; stopped", job_id,
                    exc.attempt)
        return {"job_id": job_id, "status": "superseded", "attempt": exc.attempt}
    except redis.RedisError as exc:
        log.warning("job %s: Redis unreachable (%s); message rejected for redelivery", job_id,
                    exc)
        raise Reject(f"Redis unreachable: {exc}", requeue=True) from exc
    return {"job_id": job_id, "status": "succeeded", "attempt": attempt}


@app.task(name=TRAIN_TASK, soft_time_limit=settings.train_time_limit_s,
          time_limit=settings.train_time_limit_s + 120)
def train(job_id: str, params: dict) -> dict:
    """Train a model version on a folder and activate it (see ``workers.pipeline``)."""
    ctx = get_context(settings)
    earlier = ctx.jobs.get(job_id)

    def work(attempt: int):
        from workers.device import torch_threads  # torch only in the child process
        from workers.pipeline import run_training
        from workers.redelivery import settle_earlier_attempt

        if earlier and earlier["status"] == "running":  # redelivered: a worker was lost
            done = settle_earlier_attempt(settings, ctx.redis, earlier)
            if done is not None:
                return done, {**earlier["progress"], "phase": "done"}
        report = ThrottledProgress(ctx, job_id, cancellable=True, attempt=attempt)
        # Training gets every core (or IMGSIM_TRAIN_THREADS); queries keep their fair share.
        cores = settings.train_threads or os.cpu_count() or 1
        with torch_threads(cores):
            result = run_training(settings, ctx.redis, TrainParams.parse(params), ctx.device,
                                  report, threads=max(2, cores))
        return result, {**report.state, "phase": "done"}

    return _run(ctx, job_id, work)


@app.task(name=QUERY_TASK, soft_time_limit=60, time_limit=90)
def query(job_id: str, upload_key: str, k: int) -> dict:
    """Find the k indexed images most similar to a spooled upload."""
    ctx = get_context(settings)

    def work(_attempt: int):
        from workers.search import run_query

        data = ctx.redis.get(upload_key)
        if data is None:
            raise JobError("upload_expired", "the uploaded image expired before a worker ran it")
        try:
            result = run_query(ctx.models, settings, data, k, ctx.device)
        finally:  # answered either way; a killed worker leaves it for the redelivery
            ctx.redis.delete(upload_key)
        result["served_by"] = {"host": socket.gethostname(), "pid": os.getpid()}
        return result, {"phase": "done"}

    return _run(ctx, job_id, work)
