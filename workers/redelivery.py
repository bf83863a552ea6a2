"""A training message delivered again after its worker was lost: never index anything twice."""

from __future__ import annotations

import logging

import redis

from shared.collection import delete_namespace
from shared.keys import Keys
from shared.registry import ModelRegistry, remove_version
from shared.settings import Settings

log = logging.getLogger(__name__)


def settle_earlier_attempt(settings: Settings, client: redis.Redis, job: dict) -> dict | None:
    """Deal with what a lost earlier run of this training job left behind.

    The pipeline records the version id in the job's progress before it writes anything. A
    version that was registered is complete (its tables, files and registry entry all exist),
    so the job is done and must not train again; anything else is a half-written version whose
    files, tables and registry entries are removed before the job runs again from scratch.

    Args:
        settings: service settings (artifacts folder, key prefix).
        client: Redis connection.
        job: the job record as read before the rerun.

    Returns:
        A result for the job when the earlier run had completed, else None (run it again).
    """
    version = (job.get("progress") or {}).get("version")
    if not version:
        return None  # lost before it wrote anything
    keys = Keys(settings.key_prefix)
    registry = ModelRegistry(client, keys)
    summary = registry.describe(version)
    if summary is not None:
        log.info("job %s: redelivered after version %s was complete", job["job_id"], version)
        return {**summary, "version": version, "active": registry.active_version() == version,
                "recovered_after_redelivery": True}
    removed = discard_version(settings, client, version)
    log.warning("job %s: removed half-written version %s (%d Redis keys) before rerunning",
                job["job_id"], version, removed)
    return None


def discard_version(settings: Settings, client: redis.Redis, version: str) -> int:
    """Remove every trace of a version that never completed: tables, registry entry, files.

    Torch-free, so the Celery parent can call it for a child it killed at the hard time limit.

    Returns:
        How many Redis keys were removed.
    """
    removed = delete_namespace(client, Keys(settings.key_prefix).version_namespace(version))
    ModelRegistry(client, Keys(settings.key_prefix)).forget(version)
    remove_version(settings.artifacts_dir, version)
    return removed


def discard_unfinished_training(settings: Settings, client: redis.Redis, job: dict) -> str | None:
    """After a training's process was killed: remove its version unless it was registered.

    Args:
        settings: service settings.
        client: Redis connection.
        job: the job record.

    Returns:
        The version removed, or None (not a training, nothing written yet, or complete).
    """
    version = (job.get("progress") or {}).get("version")
    if job.get("type") != "train" or not version:
        return None
    if ModelRegistry(client, Keys(settings.key_prefix)).describe(version) is not None:
        return None
    discard_version(settings, client, version)
    return version
