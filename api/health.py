"""``GET /healthz`` (process up) and ``GET /readyz`` (Redis, a live worker, an active model)."""

from __future__ import annotations

import redis
from flask import Blueprint, jsonify

from api.services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Readiness: 200 only when Redis answers, a worker sent a heartbeat and a model is active."""
    svc = services()
    checks = {"redis": False, "workers": 0, "active_model": None}
    try:
        svc.redis.ping()
        checks["redis"] = True
        checks["workers"] = sum(
            1 for _ in svc.redis.scan_iter(match=svc.keys.worker_heartbeats_pattern(), count=100))
        checks["active_model"] = svc.registry.active_version()
    except redis.RedisError:
        pass
    ready = checks["redis"] and checks["workers"] > 0 and checks["active_model"] is not None
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    return jsonify(body), 200 if ready else 503
