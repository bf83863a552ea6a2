"""Collection edits without torch: deleting an indexed image (API), removing a namespace."""

from __future__ import annotations

import json

import redis

from shared.keys import Keys
from shared.registry import ModelRegistry


def delete_image(client: redis.Redis, keys: Keys, image_id: str) -> list[str]:
    """Tombstone an image in every version that holds it; queries never return it afterwards.

    The row id goes to the version's deleted set and the image leaves its images hash (so
    ``GET /images/<id>`` answers 404 and the same content may be indexed again later), in one
    MULTI/EXEC that also moves the generation, which tells every worker to refresh.

    Args:
        client: Redis connection.
        keys: the key layout.
        image_id: the content id a query result gave.

    Returns:
        The versions it was removed from (empty: it was not indexed anywhere).
    """
    registry = ModelRegistry(client, keys)
    active = registry.active_version()
    versions = registry.versions()
    if active and active not in versions:
        versions.append(active)
    removed = []
    for version in versions:
        ns = keys.namespace(version)
        with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(ns.images)
                    raw = pipe.hget(ns.images, image_id)
                    if raw is None:
                        pipe.unwatch()
                        break
                    row = json.loads(raw).get("row")
                    pipe.multi()
                    if row is not None:
                        pipe.sadd(ns.deleted, int(row))
                    pipe.hdel(ns.images, image_id)
                    pipe.incr(ns.generation)
                    pipe.execute()
                    removed.append(version)
                    break
                except redis.WatchError:
                    continue
    return removed


def delete_namespace(client: redis.Redis, namespace: str, batch: int = 1000,
                     pattern: str = "*") -> int:
    """UNLINK every key under ``namespace:<pattern>`` found by SCAN; return how many."""
    removed = 0
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{namespace}:{pattern}", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            removed += client.unlink(*keys)
            keys = []
    if keys:
        removed += client.unlink(*keys)
    return removed
