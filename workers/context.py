"""Per-process worker state, built lazily in each child after fork (Redis, device, model cache)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import redis

from shared.jobs import JobStore
from shared.keys import Keys
from shared.redis_clients import worker_redis
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What tasks need: settings, Redis, job records, torch device, the loaded active model."""

    settings: Settings
    redis: redis.Redis
    keys: Keys
    jobs: JobStore
    threads: int

    @functools.cached_property
    def device(self):
        from workers.device import resolve_device  # torch only in the child process

        return resolve_device(self.settings.device)

    def keep_active_model_loaded(self, interval_s: float = 1.0) -> None:
        """Load the active version, then check the pointer every ``interval_s`` seconds and
        load a new version as soon as it is activated (runs for ever in a daemon thread).

        A query otherwise loads a version itself on first use: ~100-200 ms on the first query
        after every training or rollback.
        """
        from workers.errors import JobError

        while True:
            try:
                self.models.get()
            except JobError:
                pass  # no active model yet, or its files are missing: queries say so
            except Exception as exc:  # Redis restarting, a version being removed...
                log.debug("active model not loaded in the background: %s", exc)
            time.sleep(interval_s)

    @functools.cached_property
    def models(self):
        from workers.search import ActiveModelCache

        return ActiveModelCache(self.settings, self.redis, self.device)


_context: WorkerContext | None = None


def init_context(settings: Settings, threads: int) -> WorkerContext:
    """Create this process's context (called from worker_process_init, after fork)."""
    global _context
    client = worker_redis(settings)  # retries with backoff: a Redis restart is waited out
    keys = Keys(settings.key_prefix)
    _context = WorkerContext(settings, client, keys, JobStore(client, keys, settings.job_ttl_s),
                             threads)
    return _context


def get_context(settings: Settings) -> WorkerContext:
    """This process's context, created on first use if the init signal did not run (solo pool)."""
    return _context or init_context(settings, settings.torch_threads or 1)
