"""``POST /jobs/evaluate``: measure the active model's retrieval quality on labelled images."""

from __future__ import annotations

import dataclasses

from flask import Blueprint

from api.errors import ApiError
from api.jobs import _accepted, _enqueue, parse_dataset_request
from api.services import services
from shared.datasets import DatasetError, canonical_name, resolve_labels_file
from shared.jobs import EVALUATE_TASK, TRAIN_QUEUE, JobType
from shared.labels import LabelsError, read_labels_csv
from shared.schema import EvaluateParams

bp = Blueprint("evaluation", __name__)


@bp.post("/jobs/evaluate")
def create_evaluate_job():
    """Validate the folder (and labels file), then enqueue an evaluation; 202.

    Everything a user can get wrong is answered here, before anything runs: a folder or labels
    file outside the data root or missing, a labels file that is not a ``path,class`` CSV, no
    active model.
    """
    params, _root = parse_dataset_request(EvaluateParams)
    svc = services()
    if params.labels:
        try:
            labels_file = resolve_labels_file(svc.settings.data_root, params.labels)
            read_labels_csv(labels_file)
        except DatasetError as exc:
            raise ApiError(400, exc.code, exc.message) from None
        except LabelsError as exc:
            raise ApiError(400, exc.code, exc.message, field="labels") from None
        # Like the dataset: recorded as its canonical name inside the data root.
        params = dataclasses.replace(
            params, labels=canonical_name(svc.settings.data_root, labels_file))
    if svc.registry.active_version() is None:
        raise ApiError(409, "no_active_model",
                       "no model is active yet: train one with POST /jobs/train")
    job = svc.jobs.create(JobType.EVALUATE, params.to_dict())
    _enqueue(EVALUATE_TASK, TRAIN_QUEUE, job, [job["job_id"], params.to_dict()])
    return _accepted(job)
