"""Shared fixtures: a real Redis database of our own, with keys cleaned up after each test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("IMGSIM_TEST_DATASETS", REPO.parent / "shared" / "datasets"))
FIXTURES = Path(os.environ.get("IMGSIM_TEST_FIXTURES",
                               REPO.parent / "shared" / "fixtures" / "bad_inputs"))
TEST_REDIS_URL = os.environ.get("IMGSIM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """UNLINK every key starting with ``prefix`` (SCAN, never KEYS), and the Celery queue
    bindings kombu keeps for the ``<prefix>.train`` / ``<prefix>.query`` queues."""
    batch = []
    for pattern in (f"{prefix}*", f"_kombu.binding*.{prefix}.*"):
        for key in client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch = []
    if batch:
        client.unlink(*batch)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"tests need a real Redis at {TEST_REDIS_URL}: {exc}")
    return TEST_REDIS_URL


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client):
    prefix = f"imgsimtest{uuid.uuid4().hex[:8]}"
    yield prefix
    delete_prefix(redis_client, prefix)
