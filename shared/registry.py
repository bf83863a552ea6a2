"""Model versions in Redis: which one is active, what each holds, where its images live."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from shared.keys import Keys


class ModelRegistry:
    """Reads and switches the active model version; the switch is a single atomic SET."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def active_version(self) -> str | None:
        """Return the active model version, or None before the first successful training."""
        value = self._redis.get(self._keys.active_model())
        return value.decode() if value else None

    def describe(self, version: str) -> dict[str, Any] | None:
        """Return the stored summary of a version (images, embedding size, params), or None."""
        raw = self._redis.get(self._keys.model_meta(version))
        return json.loads(raw) if raw else None

    def register(self, version: str, meta: dict[str, Any]) -> None:
        """Record a complete version (not yet active).

        Args:
            version: the version id.
            meta: JSON summary shown by the API.
        """
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._keys.model_meta(version), json.dumps(meta))
        pipe.zadd(self._keys.models(), {version: time.time()})
        pipe.execute()

    def activate(self, version: str) -> str | None:
        """Make ``version`` the active one; return the version it replaced."""
        previous = self._redis.set(self._keys.active_model(), version, get=True)
        return previous.decode() if previous else None

    def versions(self) -> list[str]:
        """All registered versions, oldest first."""
        return [v.decode() for v in self._redis.zrange(self._keys.models(), 0, -1)]

    def forget(self, version: str) -> None:
        """Remove a version's registry entries (its tables are removed by the worker)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._keys.model_meta(version))
        pipe.zrem(self._keys.models(), version)
        pipe.execute()

    def image_location(self, image_id: str) -> tuple[str, str] | None:
        """Find an indexed image, newest version first.

        Args:
            image_id: the id a query result gave.

        Returns:
            (dataset root, path relative to it), or None when no version holds it.
        """
        active = self.active_version()
        ordered = self.versions()[::-1]
        if active:
            ordered = [active] + [v for v in ordered if v != active]
        for version in ordered:
            raw = self._redis.hget(self._keys.image_paths(version), image_id)
            if raw:
                entry = json.loads(raw)
                return entry["root"], entry["path"]
        return None
