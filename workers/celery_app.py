"""Celery application: JSON only, late acks, per-process model state, no torch in the parent."""

from __future__ import annotations

import logging
import socket
import threading

import redis
from celery import Celery, signals
from kombu import Queue

from shared.jobs import (
    EVALUATE_TASK,
    GC_VERSIONS_TASK,
    INDEX_TASK,
    QUERY_QUEUE,
    QUERY_TASK,
    SEARCH_TASK,
    TRAIN_QUEUE,
    TRAIN_TASK,
)
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger(__name__)
settings = Settings.from_env()
keys = Keys(settings.key_prefix)
train_queue, query_queue = keys.queue(TRAIN_QUEUE), keys.queue(QUERY_QUEUE)

app = Celery("imgsim", broker=settings.redis_url, include=["workers.tasks", "workers.index_tasks",
                                                     "workers.evaluation_tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,  # job records live in our own Redis hashes
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,  # a long training never holds queued queries hostage
    worker_concurrency=settings.worker_concurrency,
    # A plain `celery worker` serves both queues; `-Q <prefix>.train` or `.query` splits them.
    task_queues=[Queue(train_queue), Queue(query_queue)],
    task_routes={TRAIN_TASK: {"queue": train_queue}, QUERY_TASK: {"queue": query_queue},
                 INDEX_TASK: {"queue": train_queue}, SEARCH_TASK: {"queue": query_queue},
                 GC_VERSIONS_TASK: {"queue": train_queue},
                 EVALUATE_TASK: {"queue": train_queue}},
    task_default_queue=query_queue,
    broker_connection_retry_on_startup=True,
    # Redelivery of unacked tasks must not start before the longest training could end.
    broker_transport_options={"visibility_timeout": settings.train_time_limit_s + 600},
    worker_hijack_root_logger=False,
)


@signals.worker_process_init.connect
def _init_child(**_kwargs) -> None:
    # Runs in each prefork child after fork: torch is first imported here, never in the parent.
    from workers.context import init_context
    from workers.device import configure_threads

    threads = configure_threads(settings.torch_threads, settings.worker_concurrency)
    init_context(settings, threads)


def _heartbeat(hostname: str, stop: threading.Event) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    key = keys.worker_heartbeat(hostname)
    while not stop.is_set():
        try:
            client.set(key, "1", ex=30)
        except redis.RedisError as exc:  # Redis down: /readyz will say so; keep trying
            log.warning("heartbeat failed: %s", exc)
        stop.wait(10)


_stop_heartbeat = threading.Event()


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_kwargs) -> None:
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    threading.Thread(target=_heartbeat, args=(hostname, _stop_heartbeat), daemon=True).start()


@signals.worker_shutdown.connect
def _stop(**_kwargs) -> None:
    _stop_heartbeat.set()
