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

    def version_namespace(self, version: str) -> str:
        # The braces make every key of one version hash to the same Cluster slot.
        return f"{self.prefix}:{{{version}}}"

    def image_paths(self, version: str) -> str:
        return f"{self.version_namespace(version)}:images"

    def queue(self, name: str) -> str:
        """Celery queue name (``train`` or ``query``) under this prefix."""
        return f"{self.prefix}.{name}"

    def worker_heartbeat(self, hostname: str) -> str:
        return f"{self.prefix}:worker:{hostname}"

    def worker_heartbeats_pattern(self) -> str:
        return f"{self.prefix}:worker:*"
