"""``POST /jobs/evaluate``: measure the active model's retrieval quality on labelled images."""

from __future__ import annotations

from flask import Blueprint, request

from api.errors import ApiError
from api.jobs import _accepted, _enqueue, _has_readable_image
from api.services import services
from shared.datasets import DatasetError, resolve_dataset, resolve_labels_file
from shared.jobs import EVALUATE_TASK, TRAIN_QUEUE, JobType
from shared.labels import LabelsError, read_labels_csv
from shared.schema import EvaluateParams, ValidationError

bp = Blueprint("evaluation", __name__)


@bp.post("/jobs/evaluate")
def create_evaluate_job():
    """Validate the folder (and labels file), then enqueue an evaluation; 202.

    Everything a user can get wrong is answered here, before anything runs: a folder or labels
    file outside the data root or missing, a labels file that is not a ``path,class`` CSV, no
    active model.
    """
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "invalid_json", "the body must be a JSON object with 'dataset'")
    try:
        params = EvaluateParams.parse(body)
    except ValidationError as exc:
        raise ApiError(400, "invalid_parameter", exc.message, field=exc.field) from None
    svc = services()
    try:
        root = resolve_dataset(svc.settings.data_root, params.dataset)
        labels_path = (resolve_labels_file(svc.settings.data_root, params.labels)
                       if params.labels else None)
    except DatasetError as exc:
        raise ApiError(400, exc.code, exc.message) from None
    if labels_path is not None:
        try:
            read_labels_csv(labels_path)
        except LabelsError as exc:
            raise ApiError(400, exc.code, exc.message, field="labels") from None
    if not _has_readable_image(root):
        raise ApiError(400, "no_readable_images",
                       f"no readable image found in dataset {params.dataset!r}")
    if svc.registry.active_version() is None:
        raise ApiError(409, "no_active_model",
                       "no model is active yet: train one with POST /jobs/train")
    job = svc.jobs.create(JobType.EVALUATE, params.to_dict())
    _enqueue(EVALUATE_TASK, TRAIN_QUEUE, job, [job["job_id"], params.to_dict()])
    return _accepted(job)
