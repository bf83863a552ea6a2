"""Redis clients with explicit timeouts and retries: the API fails fast, workers ride out restarts.

redis-py's defaults suit neither side: the API must answer 503 within about
``IMGSIM_REDIS_TIMEOUT_S`` when Redis is down or hung (a request thread must never hang), while a
worker in the middle of a training should wait out a Redis restart (a few seconds) instead of
failing the job.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from shared.settings import Settings

# Workers retry a command for about this long (0.25, 0.5, 1, 2, then 4 s apart) before the error
# reaches the task: longer than a Redis restart with its append-only file loaded.
WORKER_RETRY_BACKOFF = ExponentialBackoff(cap=4.0, base=0.25)
WORKER_RETRIES = 12
WORKER_SOCKET_TIMEOUT_S = 30.0


def api_redis(settings: Settings) -> redis.Redis:
    """The API's client: connect and read timeouts of ``redis_timeout_s``, one immediate retry.

    The single retry on a fresh connection covers a pooled connection that died with a Redis
    restart; a Redis that is down (refused) or hung (timeout) surfaces as ``RedisError`` at once,
    which the API answers with 503 ``redis_unavailable``.
    """
    timeout = float(settings.redis_timeout_s)
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
    )


def worker_redis(settings: Settings) -> redis.Redis:
    """A worker's client: retries connection errors and timeouts with backoff (~36 s in all)."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=5.0,
        socket_timeout=WORKER_SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        retry=Retry(WORKER_RETRY_BACKOFF, WORKER_RETRIES,
                    supported_errors=(redis.ConnectionError, redis.TimeoutError)),
        health_check_interval=15,
    )


def broker_transport_options(settings: Settings, *, api: bool = False) -> dict:
    """Kombu's Redis transport options for the Celery apps of the API and the workers.

    Both: per-prefix ``unacked`` bookkeeping (so stacks sharing a database never restore each
    other's messages) and socket timeouts. Workers: a visibility timeout above the longest
    allowed training, so kombu itself never redelivers a training that is still running (lost
    workers are detected by heartbeat instead, see ``workers.recovery``).
    """
    prefix = settings.key_prefix
    timeout = float(settings.redis_timeout_s) if api else WORKER_SOCKET_TIMEOUT_S
    return {
        "visibility_timeout": settings.train_time_limit_s + 600,
        "unacked_key": f"{prefix}.unacked",
        "unacked_index_key": f"{prefix}.unacked_index",
        "unacked_mutex_key": f"{prefix}.unacked_mutex",
        "socket_timeout": timeout,
        "socket_connect_timeout": float(settings.redis_timeout_s) if api else 5.0,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }
