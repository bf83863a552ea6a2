"""Thin tasks for index operations: add images, query by id or in batches, drop old versions."""

from __future__ import annotations

import logging
import os
import socket

from celery import signals

from shared.jobs import GC_VERSIONS_TASK, INDEX_TASK, SEARCH_TASK, TRAIN_QUEUE, TRAIN_TASK
from workers.celery_app import app, keys, settings
from workers.context import get_context
from workers.errors import JobError
from workers.tasks import ThrottledProgress, _run

log = logging.getLogger(__name__)


@app.task(name=INDEX_TASK, soft_time_limit=settings.train_time_limit_s,
          time_limit=settings.train_time_limit_s + 120)
def index_images(job_id: str, spec: dict) -> dict:
    """Add a folder or uploaded files to the active version (see ``workers.indexing``)."""
    ctx = get_context(settings)

    def work(attempt: int):
        from workers.indexing import run_index

        report = ThrottledProgress(ctx, job_id, attempt=attempt)
        try:
            result = run_index(settings, ctx.redis, ctx.models, spec, ctx.device, report,
                               threads=max(2, ctx.threads))
        finally:
            for upload in spec.get("uploads", []):
                ctx.redis.delete(upload["key"])
        return result, {**report.state, "phase": "done"}

    return _run(ctx, job_id, work)


@app.task(name=SEARCH_TASK, soft_time_limit=120, time_limit=150)
def search(job_id: str, spec: dict) -> dict:
    """Query by an indexed image's id, or by one or several spooled uploads, with options."""
    ctx = get_context(settings)

    def work(_attempt: int):
        from workers.search import run_query, run_query_by_id

        k, probes, exact = spec["k"], spec.get("probes"), bool(spec.get("exact"))
        if "image_id" in spec:
            result = run_query_by_id(ctx.models, spec["image_id"], k, probes, exact)
        else:
            results = []
            try:
                for upload in spec["uploads"]:
                    data = ctx.redis.get(upload["key"])
                    if data is None:
                        raise JobError("upload_expired",
                                       "an uploaded image expired before a worker ran it")
                    try:
                        one = run_query(ctx.models, settings, data, k, ctx.device, probes, exact)
                    except JobError as exc:
                        if len(spec["uploads"]) == 1:
                            raise
                        one = {"error": {"code": exc.code, "message": exc.message}}
                    results.append({"name": upload["name"], **one})
            finally:
                ctx.redis.delete(*[u["key"] for u in spec["uploads"]])
            result = results[0] if len(results) == 1 else {"batch": results}
        result["served_by"] = {"host": socket.gethostname(), "pid": os.getpid()}
        return result, {"phase": "done"}

    return _run(ctx, job_id, work)


@app.task(name=GC_VERSIONS_TASK, soft_time_limit=600, time_limit=660)
def gc_versions() -> dict:
    """Remove the Redis tables of versions superseded longer than the grace period."""
    from workers.indexing import collect_superseded

    ctx = get_context(settings)
    removed = collect_superseded(ctx.redis, ctx.keys, settings.version_grace_s)
    if removed:
        log.info("removed superseded namespaces: %s", removed)
    return {"removed": removed}


@signals.task_success.connect
def _schedule_gc_after_training(sender=None, **_kwargs) -> None:
    # A training that activated a new version left the old one serving in-flight queries;
    # its tables go once the grace period has passed.
    if getattr(sender, "name", None) == TRAIN_TASK:
        gc_versions.apply_async(countdown=settings.version_grace_s + 1,
                                queue=keys.queue(TRAIN_QUEUE))
