"""Job endpoints: ``POST /jobs/train``, ``POST /jobs/query``, ``GET /jobs/<id>``."""

from __future__ import annotations

import dataclasses
import re
import time

from flask import Blueprint, jsonify, request, url_for

from api.errors import ApiError
from api.services import services
from shared.datasets import (
    SHOWN_CHARS,
    Candidate,
    DatasetError,
    canonical_name,
    display_name,
    iter_dataset,
    resolve_dataset,
)
from shared.images import ImageDecodeError, decode_image, probe_image, read_file_bytes
from shared.jobs import (
    FINAL_STATUSES,
    QUERY_QUEUE,
    QUERY_TASK,
    TRAIN_QUEUE,
    TRAIN_TASK,
    JobType,
)
from shared.schema import QueryParams, TrainParams, ValidationError, decimal_number

bp = Blueprint("jobs", __name__, url_prefix="/jobs")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# How much of a folder the API reads to confirm it holds an image before enqueueing.
PROBE_FILES = 200
PROBE_SECONDS = 3.0
# Longest long-poll of GET /jobs/<id>?wait=N.
MAX_WAIT_S = 30
# One quick retry on a fresh broker connection (a pooled one may have died with a Redis
# restart); a Redis that stays down gives 503 queue_unavailable within about a second more.
ENQUEUE_RETRY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5,
                 "interval_max": 0.5}


def _accepted(job: dict):
    location = url_for("jobs.get_job", job_id=job["job_id"])
    response = jsonify({"job_id": job["job_id"], "status": job["status"], "status_url": location})
    response.status_code = 202
    response.headers["Location"] = location
    return response


def _enqueue(task: str, queue: str, job: dict, args: list) -> None:
    svc = services()
    try:
        svc.queue.send_task(task, args=args, queue=svc.keys.queue(queue), task_id=job["job_id"],
                            retry=True, retry_policy=ENQUEUE_RETRY)
    except Exception as exc:  # broker refused: do not leave a job that will never run
        svc.jobs.fail(job["job_id"], "enqueue_failed", f"could not enqueue the job: {exc}")
        raise ApiError(503, "queue_unavailable", "the job queue is unreachable") from None


def _has_readable_image(root) -> bool:
    svc = services()
    deadline = time.monotonic() + PROBE_SECONDS
    tried = 0
    for item in iter_dataset(root):
        if not isinstance(item, Candidate):
            continue
        try:
            probe_image(read_file_bytes(item.path, svc.settings.max_upload_bytes),
                        svc.settings.max_image_pixels)
            return True
        except ImageDecodeError:
            tried += 1
        if tried >= PROBE_FILES or time.monotonic() > deadline:
            break
    return False


def check_form_fields(allowed: set[str]) -> None:
    """A multipart request holds ``image`` file parts and the ``allowed`` text fields, each
    once: anything else is a 400 naming it (a typo like ``K=5`` is not silently ignored)."""
    for raw_name in request.files:
        name = display_name(raw_name, SHOWN_CHARS)  # the client's: bounded in the answer
        if raw_name != "image":
            if "image" not in request.files:  # the usual mistake: the file in another field
                quoted = display_name(raw_name, SHOWN_CHARS, quote=True)
                raise ApiError(400, "missing_image", f"no 'image' file part: send the image "
                               f"in the field 'image', not {quoted}")
            raise ApiError(400, "invalid_parameter",
                           f"{name}: unknown file field; send images in 'image'", field=name)
    for raw_name in request.form:
        name = display_name(raw_name, SHOWN_CHARS)
        if raw_name == "image":
            raise ApiError(400, "missing_image", "'image' was sent as a text field: send the "
                           "image as a file part (multipart/form-data, e.g. curl -F image=@x.jpg)")
        if raw_name not in allowed:
            accepted = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, "invalid_parameter",
                           f"{name}: unknown field; accepted: {accepted}", field=name)
        if len(request.form.getlist(raw_name)) > 1:
            raise ApiError(400, "invalid_parameter", f"{name}: given more than once",
                           field=name)


def parse_dataset_request(params_type):
    """The JSON body parsed by ``params_type.parse`` and its dataset folder, checked to hold a
    readable image; every problem is a 400 naming it (nothing is recorded or enqueued).

    Args:
        params_type: TrainParams, EvaluateParams, ... (a ``parse`` classmethod and ``dataset``).

    Returns:
        (params with ``dataset`` as its canonical name inside the data root, resolved folder).
    """
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "invalid_json", "the body must be a JSON object with 'dataset'")
    try:
        params = params_type.parse(body)
    except ValidationError as exc:
        raise ApiError(400, "invalid_parameter", str(exc), field=exc.field) from None
    data_root = services().settings.data_root
    try:
        root = resolve_dataset(data_root, params.dataset)
    except DatasetError as exc:
        raise ApiError(400, exc.code, exc.message) from None
    if not _has_readable_image(root):
        raise ApiError(400, "no_readable_images",
                       f"no readable image found in dataset "
                       f"{display_name(params.dataset, SHOWN_CHARS, quote=True)}")
    # Recorded and sent to the worker as the canonical name, not as typed: the worker resolves
    # it again, and records, results and model versions show one name for one folder.
    return dataclasses.replace(params, dataset=canonical_name(data_root, root)), root


@bp.post("/train")
def create_train_job():
    """Validate a training request, record the job and enqueue it; 202 with its status URL."""
    params, _root = parse_dataset_request(TrainParams)
    svc = services()
    job = svc.jobs.create(JobType.TRAIN, params.to_dict())
    _enqueue(TRAIN_TASK, TRAIN_QUEUE, job, [job["job_id"], params.to_dict()])
    return _accepted(job)


@bp.post("/query")
def create_query_job():
    """Validate an uploaded image, spool it in Redis and enqueue a query; 202."""
    from api.index import create_extended_query_job, wants_extended_query  # imports this module

    if wants_extended_query():  # by image_id, several files, probes / exact (api/index.py)
        return create_extended_query_job()
    svc = services()
    check_form_fields({"k"})
    upload = request.files.get("image")
    if upload is None:
        raise ApiError(400, "missing_image",
                       "send the image as multipart/form-data in the field 'image'")
    if not upload.filename:  # what a form sends when no file was chosen
        raise ApiError(400, "missing_image", "no file: the 'image' part has an empty file name")
    data = upload.read(svc.settings.max_upload_bytes + 1)
    if len(data) > svc.settings.max_upload_bytes:
        raise ApiError(413, "payload_too_large",
                       f"image larger than the limit of {svc.settings.max_upload_bytes:,} bytes")
    if not data:
        raise ApiError(400, "empty_file", "the uploaded image is empty (0 bytes)")
    try:
        params = QueryParams.parse(request.form)
    except ValidationError as exc:
        raise ApiError(400, "invalid_parameter", str(exc), field=exc.field) from None
    try:
        # Full decode here (JPEGs at reduced scale) so damaged files get a synchronous 4xx.
        decode_image(data, svc.settings.max_image_pixels, draft_size=256)
    except ImageDecodeError as exc:
        raise ApiError(exc.http_status, exc.code, exc.message) from None
    if svc.registry.active_version() is None:
        raise ApiError(409, "no_active_model",
                       "no model is active yet: train one with POST /jobs/train")
    job = svc.jobs.create(JobType.QUERY, {"k": params.k, "bytes": len(data)})
    upload_key = svc.keys.upload(job["job_id"])
    svc.redis.set(upload_key, data, ex=svc.settings.upload_ttl_s)
    _enqueue(QUERY_TASK, QUERY_QUEUE, job, [job["job_id"], upload_key, params.k])
    return _accepted(job)


@bp.get("/<job_id>")
def get_job(job_id: str):
    """A job's status, progress, result or error; 404 for ids never issued (or expired).

    ``?wait=N`` (0..30 seconds) holds the answer until the job ends or N seconds pass.
    """
    wait = decimal_number(request.args.get("wait", "0"))
    if wait is None or not 0 <= wait <= MAX_WAIT_S:
        raise ApiError(400, "invalid_parameter",
                       f"wait must be a number of seconds between 0 and {MAX_WAIT_S}",
                       field="wait")
    svc = services()
    declined = False
    if not JOB_ID.match(job_id):
        job = None
    elif wait > 0 and svc.settings.max_long_polls > 0 and svc.long_polls.acquire(blocking=False):
        try:
            job = svc.jobs.wait_until_final(job_id, wait)
        finally:
            svc.long_polls.release()
    else:
        # Every long-poll slot of this process is taken: answer now rather than let waiting
        # clients hold every server thread; Retry-After tells the client when to ask again.
        declined = wait > 0
        job = svc.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found",
                       f"no job with id {display_name(job_id, SHOWN_CHARS, quote=True)}")
    response = jsonify(job)
    if declined and job["status"] not in FINAL_STATUSES:
        response.headers["Retry-After"] = "1"
    return response
