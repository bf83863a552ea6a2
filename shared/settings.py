"""One typed settings object, read from the environment once per process and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _keys(raw: str | None) -> tuple[str, ...]:
    """Comma-separated API keys; blanks dropped, order kept, duplicates removed."""
    keys = [part.strip() for part in (raw or "").split(",")]
    for key in keys:
        if key and any(c.isspace() or not c.isprintable() for c in key):
            raise SettingsError("IMGSIM_API_KEYS entries must be printable without spaces")
    return tuple(dict.fromkeys(key for key in keys if key))


@dataclass(frozen=True)
class Settings:
    """Service configuration. Every field maps to one ``IMGSIM_*`` environment variable."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_root: Path = field(default_factory=lambda: Path.cwd())
    artifacts_dir: Path = field(default_factory=lambda: Path.cwd() / "var" / "artifacts")
    key_prefix: str = "imgsim"
    job_ttl_s: int = 24 * 3600
    upload_ttl_s: int = 3600
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    device: str = "auto"
    torch_threads: int = 0
    train_threads: int = 0
    worker_concurrency: int = 2
    train_time_limit_s: int = 3 * 3600
    lsh_min_rows: int = 20_000
    version_grace_s: int = 300
    pixel_cache_bytes: int = 2 * 1024**3
    precision: str = "auto"
    # Fault handling: the API's Redis timeout, the workers' heartbeat period (a worker silent for
    # 3 periods is lost and its jobs are restored), and how many times one job may be started.
    redis_timeout_s: int = 2
    heartbeat_s: int = 10
    max_attempts: int = 3
    # The API server: gunicorn processes and threads per process (gunicorn.conf.py), and how
    # many of a process's threads may wait in long-polls at once (the rest stay free for other
    # requests; a long-poll beyond that answers at once with Retry-After).
    api_workers: int = 2
    api_threads: int = 16
    max_long_polls: int = 8
    # Longest wait for the next bytes of a request body: a client that stops sending gets 408
    # instead of holding an API thread for ever (a trickle of bytes is not cut: see README).
    body_timeout_s: int = 30
    # Bearer keys; empty means no authentication. Kept out of repr so logs never show them.
    api_keys: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables.

        Args:
            env: mapping to read instead of ``os.environ`` (tests pass their own).

        Returns:
            A frozen ``Settings``; paths are absolute and resolved.
        """
        env = os.environ if env is None else env
        cwd = Path.cwd()
        data_root = Path(env.get("IMGSIM_DATA_ROOT") or cwd).expanduser().resolve()
        artifacts = Path(env.get("IMGSIM_ARTIFACTS_DIR") or cwd / "var" / "artifacts")
        device = (env.get("IMGSIM_DEVICE") or "auto").strip().lower()
        if device not in {"auto", "cpu", "cuda"} and not device.startswith("cuda:"):
            raise SettingsError(f"IMGSIM_DEVICE must be auto, cpu or cuda[:N], got {device!r}")
        prefix = (env.get("IMGSIM_KEY_PREFIX") or "imgsim").strip()
        if not prefix or any(c in prefix for c in " {}:"):
            raise SettingsError("IMGSIM_KEY_PREFIX must be non-empty without spaces, ':' or braces")
        precision = (env.get("IMGSIM_PRECISION") or "auto").strip().lower()
        if precision not in {"auto", "fp32"}:
            raise SettingsError(f"IMGSIM_PRECISION must be auto or fp32, got {precision!r}")
        return cls(
            redis_url=env.get("IMGSIM_REDIS_URL") or cls.redis_url,
            data_root=data_root,
            artifacts_dir=artifacts.expanduser().resolve(),
            key_prefix=prefix,
            job_ttl_s=_int(env, "IMGSIM_JOB_TTL_S", cls.job_ttl_s, 60),
            upload_ttl_s=_int(env, "IMGSIM_UPLOAD_TTL_S", cls.upload_ttl_s, 60),
            max_upload_bytes=_int(env, "IMGSIM_MAX_UPLOAD_BYTES", cls.max_upload_bytes, 1024),
            max_image_pixels=_int(env, "IMGSIM_MAX_IMAGE_PIXELS", cls.max_image_pixels, 1),
            device=device,
            torch_threads=_int(env, "IMGSIM_TORCH_THREADS", 0, 0),
            train_threads=_int(env, "IMGSIM_TRAIN_THREADS", 0, 0),
            worker_concurrency=_int(env, "IMGSIM_WORKER_CONCURRENCY", 2, 1),
            train_time_limit_s=_int(env, "IMGSIM_TRAIN_TIME_LIMIT_S", cls.train_time_limit_s, 60),
            lsh_min_rows=_int(env, "IMGSIM_LSH_MIN_ROWS", cls.lsh_min_rows, 0),
            version_grace_s=_int(env, "IMGSIM_VERSION_GRACE_S", cls.version_grace_s, 0),
            pixel_cache_bytes=_int(env, "IMGSIM_PIXEL_CACHE_BYTES", cls.pixel_cache_bytes, 0),
            precision=precision,
            redis_timeout_s=_int(env, "IMGSIM_REDIS_TIMEOUT_S", cls.redis_timeout_s, 1),
            heartbeat_s=_int(env, "IMGSIM_HEARTBEAT_S", cls.heartbeat_s, 1),
            max_attempts=_int(env, "IMGSIM_MAX_ATTEMPTS", cls.max_attempts, 1),
            api_workers=_int(env, "IMGSIM_API_WORKERS", cls.api_workers, 1),
            api_threads=_int(env, "IMGSIM_API_THREADS", cls.api_threads, 1),
            max_long_polls=_int(env, "IMGSIM_MAX_LONG_POLLS", cls.max_long_polls, 0),
            body_timeout_s=_int(env, "IMGSIM_BODY_TIMEOUT_S", cls.body_timeout_s, 1),
            api_keys=_keys(env.get("IMGSIM_API_KEYS")),
        )
