"""Job lifecycle endpoints: ``GET /jobs`` (recent jobs) and ``POST /jobs/<id>/cancel``."""

from __future__ import annotations

import re

from flask import Blueprint, jsonify, request

from api.errors import ApiError
from api.services import services
from shared.datasets import SHOWN_CHARS, display_name
from shared.jobs import CursorError, JobStatus, JobType
from shared.schema import decimal_int

bp = Blueprint("lifecycle", __name__, url_prefix="/jobs")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
TYPES = tuple(str(t) for t in JobType)
STATUSES = tuple(str(s) for s in JobStatus)
DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    value = decimal_int(raw)
    if value is None or not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, "invalid_parameter",
                       f"limit must be an integer between 1 and {MAX_LIMIT}", field="limit")
    return value


@bp.get("")
def list_jobs():
    """Recent jobs, newest first: ``?type=&status=&limit=&cursor=``; 200 with next_cursor."""
    args = request.args
    job_type = args.get("type")
    if job_type is not None and job_type not in TYPES:
        raise ApiError(400, "invalid_parameter", "type must be one of " + ", ".join(TYPES),
                       field="type")
    status = args.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid_parameter", "status must be one of " + ", ".join(STATUSES),
                       field="status")
    limit = _limit(args.get("limit"))
    try:
        jobs, next_cursor = services().jobs.list_jobs(job_type, status, limit,
                                                      args.get("cursor") or None)
    except CursorError as exc:
        raise ApiError(400, "invalid_parameter", str(exc), field="cursor") from None
    return jsonify({"jobs": jobs, "next_cursor": next_cursor})


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str):
    """Cancel a job: 202 with its record (canceled at once if queued), 409 when finished."""
    svc = services()
    outcome = svc.jobs.request_cancel(job_id) if JOB_ID.match(job_id) else "missing"
    if outcome == "missing":
        raise ApiError(404, "job_not_found",
                       f"no job with id {display_name(job_id, SHOWN_CHARS, quote=True)}")
    job = svc.jobs.get(job_id)
    if outcome == "finished" or job is None:
        status = job["status"] if job else "expired"
        raise ApiError(409, "job_finished", f"job {job_id} already ended ({status})",
                       job_status=status)
    if outcome == "canceled" and job["type"] == JobType.QUERY:
        svc.redis.delete(svc.keys.upload(job_id))  # a canceled query's upload is not kept
    response = jsonify(job)
    response.status_code = 202
    return response
