"""The Redis key layout, in one place, so API and workers agree on every name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key builders under one prefix. Per-version keys share a hash tag (Redis Cluster ready)."""

    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        """Pub/sub channel announcing that a job ended (long-polling clients wait on it)."""
        return f"{self.prefix}:job-ended:{job_id}"

    def jobs_index(self) -> str:
        return f"{self.prefix}:jobs"

    def upload(self, upload_id: str) -> str:
        return f"{self.prefix}:upload:{upload_id}"

    def active_model(self) -> str:
        return f"{self.prefix}:active_model"

    def models(self) -> str:
        return f"{self.prefix}:models"

    def model_meta(self, version: str) -> str:
        return f"{self.prefix}:model:{version}"

    def model_quality(self, version: str) -> str:
        """JSON figures of the latest evaluation of a version (shown by ``GET /models``)."""
        return f"{self.prefix}:model-quality:{version}"

    def version_namespace(self, version: str) -> str:
        # The braces make every key of one version hash to the same Cluster slot.
        return f"{self.prefix}:{{{version}}}"

    def image_paths(self, version: str) -> str:
        return f"{self.version_namespace(version)}:images"

    def namespace(self, version: str) -> NamespaceKeys:
        """Every key of one version's collection (tables, rows, tombstones)."""
        return NamespaceKeys(self.version_namespace(version))

    def superseded(self) -> str:
        """Sorted set: replaced versions -> when they stopped serving (for delayed clean-up)."""
        return f"{self.prefix}:superseded"

    def queue(self, name: str) -> str:
        """Celery queue name (``train`` or ``query``) under this prefix."""
        return f"{self.prefix}.{name}"

    def worker_heartbeat(self, worker: str) -> str:
        """Heartbeat of one worker start (``nodename#start-id``, see ``workers.recovery``)."""
        return f"{self.prefix}:worker:{worker}"

    def worker_heartbeats_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


@dataclass(frozen=True)
class NamespaceKeys:
    """Keys of one version's collection; all share the version's hash tag."""

    ns: str

    def bucket(self, table: int, code: int) -> str:
        """Packed little-endian uint32 row ids of one LSH bucket."""
        return f"{self.ns}:t{table}:{code:x}"

    @property
    def images(self) -> str:
        """Hash: image_id -> JSON {"root", "path", "row"} (content already indexed)."""
        return f"{self.ns}:images"

    @property
    def rows(self) -> str:
        """Committed row count (trained rows + added rows)."""
        return f"{self.ns}:rows"

    @property
    def generation(self) -> str:
        """Incremented by every commit (add or delete): readers refresh when it moves."""
        return f"{self.ns}:gen"

    @property
    def added(self) -> str:
        """List: JSON {"image_id", "path"} of each row added after training, in row order."""
        return f"{self.ns}:added"

    @property
    def deleted(self) -> str:
        """Set of deleted row ids (tombstones): never returned by a query."""
        return f"{self.ns}:deleted"

    @property
    def built(self) -> str:
        """Present while the LSH tables (``t*`` keys) of this version exist."""
        return f"{self.ns}:built"

    @property
    def write_lock(self) -> str:
        return f"{self.ns}:lock"
