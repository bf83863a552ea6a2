"""Model versions in Redis: which one is active, what each holds, where its images live."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from shared.keys import Keys

# Files of a saved model version (written by workers/artifacts.py); a version missing any of
# them cannot serve queries, so it is never activated.
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
IMAGES_FILE = "images.json"
VECTORS_FILE = "embeddings.npy"
PLANES_FILE = "lsh_planes.npy"
CENTER_FILE = "center.npy"
ARTIFACT_FILES = (WEIGHTS_FILE, CONFIG_FILE, IMAGES_FILE, VECTORS_FILE, PLANES_FILE, CENTER_FILE)


class UnknownVersion(LookupError):
    """No registered model version has this id."""


class IncompleteVersion(RuntimeError):
    """A registered version lacks files or index entries; ``missing`` names them."""

    def __init__(self, version: str, missing: list[str]) -> None:
        super().__init__(f"model version {version} is incomplete: missing {', '.join(missing)}")
        self.version = version
        self.missing = missing


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

    def set_quality(self, version: str, quality: dict[str, Any]) -> bool:
        """Store the figures of an evaluation with a version (the latest one wins).

        Args:
            version: a registered version id.
            quality: JSON figures (k, precision/mAP exact and through LSH, baselines).

        Returns:
            False when the version is no longer registered (nothing stored).
        """
        if not self._redis.exists(self._keys.model_meta(version)):
            return False
        self._redis.set(self._keys.model_quality(version), json.dumps(quality))
        return True

    def activate(self, version: str) -> str | None:
        """Make ``version`` the active one; return the version it replaced."""
        previous = self._redis.set(self._keys.active_model(), version, get=True)
        return previous.decode() if previous else None

    def activate_checked(self, version: str, artifacts_dir: Path) -> str | None:
        """Switch the active version back (or forward) to a registered, complete ``version``.

        The registry entry is watched while the pointer moves, so a version forgotten at the
        same moment is never made active; the switch itself is one ``SET ... GET``.

        Args:
            version: a registered version id.
            artifacts_dir: the configured artifacts folder (its files are checked first).

        Returns:
            The version it replaced (None when none was active).

        Raises:
            UnknownVersion: not registered.
            IncompleteVersion: files or index entries are missing.
        """
        meta_key = self._keys.model_meta(version)
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(meta_key)
                    if not pipe.exists(meta_key):
                        raise UnknownVersion(version)
                    missing = self.missing_parts(version, artifacts_dir)
                    if missing:
                        raise IncompleteVersion(version, missing)
                    pipe.multi()
                    pipe.set(self._keys.active_model(), version, get=True)
                    pipe.zrem(self._keys.superseded(), version)
                    previous, _ = pipe.execute()
                    previous = previous.decode() if previous else None
                    if previous and previous != version:
                        self.mark_superseded(previous)
                    return previous
                except redis.WatchError:
                    continue

    def mark_superseded(self, version: str) -> None:
        """Record that ``version`` stopped serving now: its LSH tables are removed after the
        grace period (``imgsim.gc_versions``) unless it is active again by then."""
        self._redis.zadd(self._keys.superseded(), {version: time.time()})

    def missing_parts(self, version: str, artifacts_dir: Path) -> list[str]:
        """What a version lacks to serve queries: artifact files and its image-path index.

        Args:
            version: a version id.
            artifacts_dir: the configured artifacts folder.

        Returns:
            Names of the missing parts; empty when the version is complete.
        """
        folder = artifacts_dir / version
        missing = [name for name in ARTIFACT_FILES if not (folder / name).is_file()]
        if not self._redis.exists(self._keys.image_paths(version)):
            missing.append("image index in Redis")
        return missing

    def list_models(self, artifacts_dir: Path | None = None) -> dict[str, Any]:
        """Every registered version, newest first, with the active flag.

        Args:
            artifacts_dir: when given, training parameters absent from an older summary are
                read from the version's config file.

        Returns:
            ``{"active", "models": [{"version", "created_at", "images", "embedding_dim",
            "architecture", "train_params", "quality", "active", ...}]}``.
        """
        active = self.active_version()
        versions = self.versions()[::-1]
        pipe = self._redis.pipeline(transaction=False)
        for version in versions:
            pipe.get(self._keys.model_meta(version))
            pipe.get(self._keys.model_quality(version))
            pipe.hlen(self._keys.image_paths(version))
        replies = pipe.execute()
        models = []
        for version, raw, quality, live in zip(versions, replies[::3], replies[1::3],
                                               replies[2::3], strict=True):
            meta = json.loads(raw) if raw else {}
            if quality:
                meta["quality"] = json.loads(quality)
            # What queries search now: trained images, plus those added, minus those deleted.
            meta["trained_images"] = meta.get("images")
            if live:
                meta["images"] = live
            train_params = meta.get("train_params")
            if train_params is None and artifacts_dir is not None:
                train_params = _config_field(artifacts_dir / version, "train_params")
            models.append({
                **meta,
                "version": version,
                "created_at": meta.get("created_at"),
                "images": meta.get("images"),
                "embedding_dim": meta.get("embedding_dim"),
                "architecture": meta.get("architecture"),
                "train_params": train_params,
                "quality": meta.get("quality"),
                "active": version == active,
            })
        return {"active": active, "models": models}

    def versions(self) -> list[str]:
        """All registered versions, oldest first."""
        return [v.decode() for v in self._redis.zrange(self._keys.models(), 0, -1)]

    def forget(self, version: str) -> None:
        """Remove a version's registry entries (its tables are removed by the worker)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._keys.model_meta(version), self._keys.model_quality(version))
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


def _config_field(folder: Path, name: str) -> Any:
    """One field of a version's config file, or None when it cannot be read."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get(name)
    except (OSError, ValueError):
        return None


def remove_version(artifacts_dir: Path, version: str) -> None:
    """Delete a version's folder and any staging leftovers (``.partial-<version>``)."""
    shutil.rmtree(artifacts_dir / version, ignore_errors=True)
    shutil.rmtree(artifacts_dir / f".partial-{version}", ignore_errors=True)
