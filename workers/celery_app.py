"""Celery application: JSON only, late acks, per-process model state, no torch in the parent."""

from __future__ import annotations

import logging
import socket
import threading

import redis
from celery import Celery, signals
from celery.exceptions import TimeLimitExceeded
from kombu import Exchange, Queue

from shared.jobs import (
    EVALUATE_TASK,
    GC_VERSIONS_TASK,
    INDEX_TASK,
    QUERY_QUEUE,
    QUERY_TASK,
    SEARCH_TASK,
    TRAIN_QUEUE,
    TRAIN_TASK,
    JobStore,
)
from shared.keys import Keys
from shared.redis_clients import broker_transport_options, worker_redis
from shared.settings import Settings

log = logging.getLogger(__name__)
settings = Settings.from_env()
keys = Keys(settings.key_prefix)
train_queue, query_queue = keys.queue(TRAIN_QUEUE), keys.queue(QUERY_QUEUE)


def _queue(name: str) -> Queue:
    # Each queue on its own direct exchange with its own routing key. Left to Celery's default
    # both queues were bound to one exchange under one key, so a task a worker published (the
    # version clean-up) was copied into both queues.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


app = Celery("imgsim", broker=settings.redis_url, include=["workers.tasks", "workers.index_tasks",
                                                     "workers.evaluation_tasks"])
app.conf.update(
    # kombu's Redis transport without its restore-on-close (see workers/broker.py).
    broker_transport="workers.broker:Transport",
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,  # job records live in our own Redis hashes
    # At-least-once: a message is acked only after its task returned; a prefork child that dies
    # (SIGKILL, OOM) has its message requeued at once by the parent. Tasks are idempotent
    # (attempt-fenced job records, a redelivered training settles what the lost run wrote).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,  # a long training never holds queued queries hostage
    worker_concurrency=settings.worker_concurrency,
    # A plain `celery worker` serves both queues; `-Q <prefix>.train` or `.query` splits them.
    task_queues=[_queue(train_queue), _queue(query_queue)],
    task_routes={TRAIN_TASK: {"queue": train_queue}, QUERY_TASK: {"queue": query_queue},
                 INDEX_TASK: {"queue": train_queue}, SEARCH_TASK: {"queue": query_queue},
                 GC_VERSIONS_TASK: {"queue": train_queue},
                 EVALUATE_TASK: {"queue": train_queue}},
    task_default_queue=query_queue,
    # Redis down or restarting: keep reconnecting (2 s, 4 s, ... at most 10 s apart), forever.
    broker_connection_retry=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    broker_connection_timeout=5,
    # A training keeps running through a broker reconnection; its ack, lost with the old
    # connection, is settled by the recovery sweep (workers/recovery.py) once the job ended.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # Redelivery by kombu's visibility timeout must not start before the longest training could
    # end; lost workers are detected sooner by heartbeat (workers/recovery.py).
    broker_transport_options=broker_transport_options(settings),
    worker_hijack_root_logger=False,
)


@signals.worker_process_init.connect
def _init_child(**_kwargs) -> None:
    # Runs in each prefork child after fork: torch is first imported here, never in the parent.
    from workers.context import init_context
    from workers.device import configure_threads

    threads = configure_threads(settings.torch_threads, settings.worker_concurrency)
    ctx = init_context(settings, threads)
    # Load the active version now and whenever the pointer moves, so no query pays for it.
    threading.Thread(target=ctx.keep_active_model_loaded, name="active-model", daemon=True).start()


_supervisor = None


@signals.worker_ready.connect
def _start_supervisor(sender=None, **_kwargs) -> None:
    global _supervisor
    from workers.recovery import Supervisor  # parent only; no torch

    nodename = getattr(sender, "hostname", None) or socket.gethostname()
    _supervisor = Supervisor(app, settings, nodename)
    _supervisor.start()


@signals.worker_shutdown.connect
def _stop(**_kwargs) -> None:
    if _supervisor is not None:
        _supervisor.stop()


@signals.task_failure.connect
def _hard_time_limit(sender=None, task_id=None, exception=None, **_kwargs) -> None:
    # Sent in the parent when it killed a child past the hard time limit: the task's own code
    # could not record anything, so the job would otherwise stay "running" for ever.
    if not isinstance(exception, TimeLimitExceeded) or not task_id:
        return
    from workers.redelivery import discard_unfinished_training  # torch-free

    try:
        client = worker_redis(settings)
        jobs = JobStore(client, keys, settings.job_ttl_s)
        jobs.fail(task_id, "time_limit",
                  f"the job was stopped at its hard time limit ({exception})")
        job = jobs.get(task_id)
        # The killed child could not clean up: its half-written version goes now.
        removed = discard_unfinished_training(settings, client, job) if job else None
        if removed:
            log.warning("job %s: removed the half-written version %s", task_id, removed)
    except (redis.RedisError, OSError) as exc:
        log.warning("job %s: could not settle the hard time limit: %s", task_id, exc)
