"""Index operations: ``POST /jobs/index``, ``DELETE /images/<id>``, query by id and in batches."""

from __future__ import annotations

import re

from flask import Blueprint, jsonify, request

from api.errors import ApiError
from api.jobs import _accepted, _enqueue, check_form_fields, parse_dataset_request
from api.services import services
from shared.collection import delete_image
from shared.datasets import SHOWN_CHARS, display_name
from shared.images import ImageDecodeError, decode_image
from shared.jobs import INDEX_TASK, QUERY_QUEUE, SEARCH_TASK, TRAIN_QUEUE, JobType
from shared.schema import IndexParams, decimal_int

bp = Blueprint("index", __name__)

IMAGE_ID = re.compile(r"^[0-9a-f]{24}$")
MAX_FILES = 64
# Per-table probe depth a request may ask for (the index caps it at what it can generate).
MAX_PROBES = 175


def _require_active_model() -> str:
    active = services().registry.active_version()
    if active is None:
        raise ApiError(409, "no_active_model",
                       "no model is active yet: train one with POST /jobs/train")
    return active


def _read_uploads() -> list[tuple[str, bytes]]:
    """Every ``image`` file part, checked synchronously: 4xx naming the first bad file."""
    svc = services()
    files = request.files.getlist("image")
    if not files:
        raise ApiError(400, "missing_image",
                       "send the images as multipart/form-data in the field 'image'")
    if len(files) > MAX_FILES:
        raise ApiError(400, "too_many_files", f"at most {MAX_FILES} images per request")
    out = []
    for number, upload in enumerate(files, start=1):
        if not upload.filename:  # what a form sends when no file was chosen
            raise ApiError(400, "missing_image",
                           f"no file: 'image' part {number} has an empty file name")
        name = upload.filename
        shown = display_name(name, SHOWN_CHARS)  # the client's file name, bounded in messages
        data = upload.read(svc.settings.max_upload_bytes + 1)
        if len(data) > svc.settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large",
                           f"{shown}: larger than the limit of "
                           f"{svc.settings.max_upload_bytes:,} bytes", file=shown)
        if not data:
            raise ApiError(400, "empty_file", f"{shown}: the uploaded image is empty (0 bytes)",
                           file=shown)
        try:
            decode_image(data, svc.settings.max_image_pixels, draft_size=256)
        except ImageDecodeError as exc:
            raise ApiError(exc.http_status, exc.code, f"{shown}: {exc.message}",
                           file=shown) from None
        out.append((name, data))
    return out


def _spool(job_id: str, uploads: list[tuple[str, bytes]]) -> list[dict]:
    svc = services()
    spooled = []
    pipe = svc.redis.pipeline(transaction=False)
    for number, (name, data) in enumerate(uploads):
        key = svc.keys.upload(f"{job_id}-{number}")
        pipe.set(key, data, ex=svc.settings.upload_ttl_s)
        spooled.append({"key": key, "name": name})
    pipe.execute()
    return spooled


def _int_option(source: dict, name: str, lo: int, hi: int, default: int | None,
                from_form: bool) -> int | None:
    value = source.get(name, default)
    if value is None and default is None:  # null means "the default" only where that is none
        return None
    if isinstance(value, str) and from_form:  # form fields are text; JSON numbers are numbers
        value = decimal_int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer between {lo} and "
                       f"{hi}", field=name)
    return value


def _bool_option(source: dict, name: str, from_form: bool) -> bool:
    value = source.get(name, False)
    if isinstance(value, str) and from_form:
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
    if isinstance(value, bool):
        return value
    raise ApiError(400, "invalid_parameter", f"{name} must be true or false", field=name)


def search_options(source: dict, from_form: bool) -> dict:
    """``k`` (1..100, default 10), ``probes`` (0..175, default the version's), ``exact``.

    Form fields are text (``"10"``, ``"true"``); in a JSON body they must be a number and a
    boolean, like every other JSON field of the API.
    """
    return {"k": _int_option(source, "k", 1, 100, 10, from_form),
            "probes": _int_option(source, "probes", 0, MAX_PROBES, None, from_form),
            "exact": _bool_option(source, "exact", from_form)}


def create_extended_query_job():
    """``POST /jobs/query`` with JSON ``{"image_id", "k", "probes", "exact"}``, several
    ``image`` files (result ``{"batch": [...]}``) or the ``probes`` / ``exact`` options."""
    svc = services()
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        unknown = sorted(set(body) - {"image_id", "k", "probes", "exact"})
        if unknown:
            name = display_name(unknown[0], SHOWN_CHARS)
            raise ApiError(400, "invalid_parameter", f"{name}: unknown field; accepted: "
                           "image_id, k, probes, exact", field=name)
        image_id = body.get("image_id")
        if not isinstance(image_id, str) or not IMAGE_ID.match(image_id):
            raise ApiError(400, "invalid_parameter",
                           "image_id must be the 24-hex-digit id a query result gave",
                           field="image_id")
        options = search_options(body, from_form=False)
        active = _require_active_model()
        if not svc.redis.hexists(svc.keys.namespace(active).images, image_id):
            raise ApiError(404, "image_not_found",
                           f"no image {image_id!r} in the active version {active}")
        job = svc.jobs.create(JobType.QUERY, {**options, "image_id": image_id})
        _enqueue(SEARCH_TASK, QUERY_QUEUE, job,
                 [job["job_id"], {**options, "image_id": image_id}])
        return _accepted(job)
    check_form_fields({"k", "probes", "exact"})
    uploads = _read_uploads()
    options = search_options(request.form, from_form=True)
    _require_active_model()
    job = svc.jobs.create(JobType.QUERY, {**options, "files": len(uploads),
                                          "bytes": sum(len(d) for _, d in uploads)})
    spec = {**options, "uploads": _spool(job["job_id"], uploads)}
    _enqueue(SEARCH_TASK, QUERY_QUEUE, job, [job["job_id"], spec])
    return _accepted(job)


def wants_extended_query() -> bool:
    """Whether ``POST /jobs/query`` uses anything beyond one image file and ``k``."""
    return (request.is_json or len(request.files.getlist("image")) > 1
            or "probes" in request.form or "exact" in request.form)


@bp.post("/jobs/index")
def create_index_job():
    """Add a folder (JSON ``{"dataset"}``) or uploaded ``image`` files to the active version."""
    svc = services()
    if request.is_json:
        params, _root = parse_dataset_request(IndexParams)
        _require_active_model()
        job = svc.jobs.create(JobType.INDEX, params.to_dict())
        _enqueue(INDEX_TASK, TRAIN_QUEUE, job, [job["job_id"], params.to_dict()])
        return _accepted(job)
    check_form_fields(set())
    uploads = _read_uploads()
    _require_active_model()
    job = svc.jobs.create(JobType.INDEX, {"files": [name for name, _ in uploads]})
    _enqueue(INDEX_TASK, TRAIN_QUEUE, job,
             [job["job_id"], {"uploads": _spool(job["job_id"], uploads)}])
    return _accepted(job)


@bp.delete("/images/<image_id>")
def remove_image(image_id: str):
    """Delete an indexed image from every version holding it; 404 when none does."""
    svc = services()
    removed = delete_image(svc.redis, svc.keys, image_id) if IMAGE_ID.match(image_id) else []
    if not removed:
        raise ApiError(404, "image_not_found", "no indexed image with id "
                       f"{display_name(image_id, SHOWN_CHARS, quote=True)}")
    return jsonify({"image_id": image_id, "deleted": True, "versions": removed})
