"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

Adding an endpoint: add its operation to ``PATHS`` (and any new schema to ``SCHEMAS``); the test
``tests/test_openapi.py`` fails while a Flask route is missing here, and the integration tests
validate live responses against this document.
"""

from __future__ import annotations

import copy
from typing import Any

from flask import Blueprint, jsonify

from api.services import services

bp = Blueprint("openapi", __name__)

JOB_ID_PATTERN = "^[0-9a-f]{32}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{description}"}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "stable machine-readable code"},
                    "message": {"type": "string", "description": "what went wrong, for people"},
                    "field": {"type": "string", "description": "the offending parameter"},
                },
                "additionalProperties": True,
            }
        },
    },
    "JobError": {
        "type": ["object", "null"],
        "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    },
    "Accepted": {
        "type": "object",
        "required": ["job_id", "status", "status_url"],
        "properties": {
            "job_id": {"type": "string", "pattern": JOB_ID_PATTERN},
            "status": {"type": "string", "enum": ["queued"]},
            "status_url": {"type": "string", "description": "poll it: GET /jobs/{job_id}"},
        },
    },
    "JobStatus": {
        "type": "string",
        "enum": ["queued", "running", "succeeded", "failed", "canceled"],
    },
    "Job": {
        "type": "object",
        "required": ["job_id", "type", "status", "progress", "result", "error", "params",
                     "created_at", "started_at", "finished_at"],
        "properties": {
            "job_id": {"type": "string", "pattern": JOB_ID_PATTERN},
            "type": {"type": "string", "description": "train, query, index, evaluate"},
            "status": _ref("JobStatus"),
            "progress": {
                "type": "object",
                "description": "training: phase (scan, train, save, embed, index, done), epoch, "
                               "loss, images_done, images_total",
            },
            "result": {"type": ["object", "null"],
                       "description": "the job's JSON result once it succeeded"},
            "error": _ref("JobError"),
            "params": {"type": "object", "description": "the validated request parameters"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "cancel_requested": {"type": "boolean"},
            "attempts": {"type": "integer", "minimum": 0,
                         "description": "how many times a worker started the job (more than 1 "
                                        "after its worker was lost and it was delivered again)"},
        },
    },
    "JobList": {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": {"type": "array", "items": _ref("Job")},
            "next_cursor": {"type": ["string", "null"],
                            "description": "pass as ?cursor= for the next page; null at the end"},
        },
    },
    "TrainRequest": {
        "type": "object",
        "required": ["dataset"],
        "additionalProperties": False,
        "properties": {
            "dataset": {"type": "string", "minLength": 1,
                        "description": "folder inside the data root (relative or absolute)"},
            "architecture": {"type": "string", "enum": ["default", "seed"], "default": "default"},
            "epochs": {"type": "integer", "minimum": 1, "maximum": 500, "default": 20},
            "image_size": {"type": "integer", "minimum": 32, "maximum": 512, "default": 64,
                           "description": "multiple of 16 (default) or 8 (seed)"},
            "batch_size": {"type": "integer", "minimum": 2, "maximum": 1024, "default": 64},
            "embedding_dim": {"type": "integer", "minimum": 8, "maximum": 2048, "default": 256},
            "learning_rate": {"type": "number", "minimum": 1e-6, "maximum": 1.0,
                              "default": 0.001},
            "val_fraction": {"type": "number", "minimum": 0.0, "maximum": 0.5, "default": 0.1},
            "patience": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
            "hash_bits": {"type": ["integer", "null"], "minimum": 2, "maximum": 24},
            "num_tables": {"type": ["integer", "null"], "minimum": 1, "maximum": 64},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2147483647, "default": 0},
        },
    },
    "EvaluateRequest": {
        "type": "object",
        "required": ["dataset"],
        "additionalProperties": False,
        "properties": {
            "dataset": {"type": "string", "minLength": 1,
                        "description": "folder of query images inside the data root; a query "
                                       "that is itself indexed never counts itself"},
            "labels": {"type": ["string", "null"], "minLength": 1,
                       "description": "CSV with a header naming 'path' and 'class' (paths "
                                      "relative to the CSV's folder), inside the data root; "
                                      "default: class = first folder of each image's path"},
            "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
        },
    },
    "QueryUpload": {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary",
                      "description": "JPEG, PNG, WebP, GIF, TIFF or BMP (by content)"},
            "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
            "probes": {"type": "integer", "minimum": 0, "maximum": 175,
                       "description": "multi-probe depth per table (default: the version's)"},
            "exact": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"],
                      "description": "scan every vector instead of the LSH tables"},
        },
        "description": "several 'image' parts make a batch: result {\"batch\": [...]}",
    },
    "QueryById": {
        "type": "object",
        "required": ["image_id"],
        "additionalProperties": False,
        "properties": {
            "image_id": {"type": "string", "pattern": "^[0-9a-f]{24}$"},
            "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
            "probes": {"type": "integer", "minimum": 0, "maximum": 175},
            "exact": {"type": "boolean", "default": False},
        },
    },
    "IndexFolder": {
        "type": "object",
        "required": ["dataset"],
        "additionalProperties": False,
        "properties": {"dataset": {"type": "string",
                                   "description": "folder inside the data root"}},
    },
    "IndexUploads": {
        "type": "object",
        "required": ["image"],
        "properties": {"image": {"type": "array", "maxItems": 64,
                                 "items": {"type": "string", "format": "binary"}}},
    },
    "Deleted": {
        "type": "object",
        "required": ["image_id", "deleted"],
        "properties": {"image_id": {"type": "string"}, "deleted": {"type": "boolean"},
                       "versions": {"type": "array", "items": {"type": "string"}}},
    },
    "ModelList": {
        "type": "object",
        "required": ["active", "models"],
        "properties": {
            "active": {"type": ["string", "null"]},
            "models": {"type": "array", "items": {
                "type": "object",
                "required": ["version", "active"],
                "properties": {
                    "version": {"type": "string"},
                    "created_at": {"type": ["string", "null"]},
                    "images": {"type": ["integer", "null"],
                               "description": "images queries search now: trained, plus "
                                              "added by index jobs, minus deleted"},
                    "trained_images": {"type": ["integer", "null"],
                                       "description": "images the version was trained on"},
                    "embedding_dim": {"type": ["integer", "null"]},
                    "architecture": {"type": ["string", "null"]},
                    "train_params": {"type": ["object", "null"]},
                    "quality": {"type": ["object", "null"]},
                    "active": {"type": "boolean"},
                },
            }},
        },
    },
    "Activated": {
        "type": "object",
        "required": ["active", "previous"],
        "properties": {"active": {"type": "string"}, "previous": {"type": ["string", "null"]}},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
    "Ready": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "checks": {
                "type": "object",
                "required": ["redis", "workers", "active_model"],
                "properties": {
                    "redis": {"type": "boolean"},
                    "workers": {"type": "integer", "minimum": 0},
                    "active_model": {"type": ["string", "null"]},
                },
            },
        },
    },
}

RESPONSES: dict[str, Any] = {
    name: _json(_ref("Error"), text)
    for name, text in {
        "BadRequest": "invalid input: the error code and field name the problem; a query "
                      "parameter the operation does not declare is one (POST and DELETE "
                      "operations declare none: their options go in the body)",
        "Unauthorized": "missing or invalid 'Authorization: Bearer <key>' (when keys are set)",
        "NotFound": "no such resource",
        "Conflict": "the request conflicts with the current state",
        "TooLarge": "upload over the byte cap, or image over the pixel cap",
        "Unsupported": "a known image format this service cannot read (e.g. heic, avif)",
        "ServerError": "unexpected server error (a bug)",
        "Unavailable": "Redis or the job queue is unreachable",
        "BodyTimeout": "the request body stopped arriving for IMGSIM_BODY_TIMEOUT_S",
        "RequestLineTooLong": "request line over 4,094 bytes (refused by the server)",
        "HeadersTooLarge": "request headers over the server's limits",
    }.items()
}
RESPONSES["Unauthorized"]["headers"] = {
    "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer challenge"}
}

_COMMON = {"401": _error("Unauthorized"), "500": _error("ServerError"),
           "503": _error("Unavailable")}
_JOB_ID_PARAM = {"name": "job_id", "in": "path", "required": True,
                 "schema": {"type": "string"}, "description": "the id a 202 answer gave"}
_ACCEPTED = {
    **_json(_ref("Accepted"), "job recorded and queued"),
    "headers": {"Location": {"schema": {"type": "string"}, "description": "the status URL"}},
}

PATHS: dict[str, Any] = {
    "/healthz": {"get": {
        "operationId": "healthz", "summary": "Liveness: the process answers",
        "security": [],
        "responses": {"200": _json(_ref("Health"), "up"), "400": _error("BadRequest"),
                      "500": _error("ServerError")},
    }},
    "/readyz": {"get": {
        "operationId": "readyz",
        "summary": "Readiness: Redis answers, a worker is alive and a model is active",
        "security": [],
        "responses": {"200": _json(_ref("Ready"), "ready"),
                      "503": _json(_ref("Ready"), "not ready; checks say why"),
                      "400": _error("BadRequest"), "500": _error("ServerError")},
    }},
    "/openapi.json": {"get": {
        "operationId": "openapi", "summary": "This document",
        "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document"),
                      "400": _error("BadRequest"), **_COMMON},
    }},
    "/jobs/train": {"post": {
        "operationId": "createTrainJob",
        "summary": "Train a model version on a folder, index it and make it active",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("TrainRequest")}}},
        "responses": {"202": _ACCEPTED, "400": _error("BadRequest"),
                      "413": _error("TooLarge"), **_COMMON},
    }},
    "/jobs/query": {"post": {
        "operationId": "createQueryJob",
        "summary": "Find the k indexed images most similar to an uploaded one",
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": _ref("QueryUpload")},
            "application/json": {"schema": _ref("QueryById")}}},
        "responses": {"202": _ACCEPTED, "400": _error("BadRequest"),
                      "404": _error("NotFound"), "409": _error("Conflict"),
                      "413": _error("TooLarge"), "415": _error("Unsupported"), **_COMMON},
    }},
    "/jobs/index": {"post": {
        "operationId": "createIndexJob",
        "summary": "Add a folder or uploaded images to the active version without retraining",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("IndexFolder")},
            "multipart/form-data": {"schema": _ref("IndexUploads")}}},
        "responses": {"202": _ACCEPTED, "400": _error("BadRequest"),
                      "409": _error("Conflict"), "413": _error("TooLarge"),
                      "415": _error("Unsupported"), **_COMMON},
    }},
    "/jobs/evaluate": {"post": {
        "operationId": "createEvaluateJob",
        "summary": "Measure the active model's precision/mAP at k on labelled query images, "
                   "exact and through LSH, against a random ranking, a tiny-image and a "
                   "colour-histogram baseline; the figures are stored with the model",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("EvaluateRequest")}}},
        "responses": {"202": _ACCEPTED, "400": _error("BadRequest"),
                      "409": _error("Conflict"), "413": _error("TooLarge"), **_COMMON},
    }},
    "/models": {"get": {
        "operationId": "listModels", "summary": "Every model version, newest first",
        "responses": {"200": _json(_ref("ModelList"), "the versions"),
                      "400": _error("BadRequest"), **_COMMON},
    }},
    "/models/{version}/activate": {"post": {
        "operationId": "activateModel",
        "summary": "Make a complete registered version the active one (rollback)",
        "parameters": [{"name": "version", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _json(_ref("Activated"), "switched"),
                      "400": _error("BadRequest"), "404": _error("NotFound"),
                      "409": _error("Conflict"), **_COMMON},
    }},
    "/": {"get": {
        "operationId": "webPage", "summary": "The web page (static HTML)",
        "security": [],
        "responses": {"200": {"description": "HTML", "content": {
            "text/html": {"schema": {"type": "string"}}}},
            "304": {"description": "not modified"}, "500": _error("ServerError")},
    }},
    "/jobs": {"get": {
        "operationId": "listJobs", "summary": "Recent jobs, newest first",
        "parameters": [
            {"name": "type", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["train", "query", "index", "evaluate"]},
             "description": "only jobs of this type"},
            {"name": "status", "in": "query", "required": False,
             "schema": _ref("JobStatus")},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
            {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "next_cursor of the previous page"},
        ],
        "responses": {"200": _json(_ref("JobList"), "a page of jobs"),
                      "400": _error("BadRequest"), **_COMMON},
    }},
    "/jobs/{job_id}": {"get": {
        "operationId": "getJob", "summary": "A job's status, progress, result or error",
        "parameters": [
            _JOB_ID_PARAM,
            {"name": "wait", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0, "maximum": 30, "default": 0},
             "description": "long-poll: answer when the job ends or after this many seconds"},
        ],
        "responses": {"200": {**_json(_ref("Job"), "the job record"), "headers": {
            "Retry-After": {"description": "sent when a long-poll was not held because every "
                                           "long-poll slot of the server process was busy: the "
                                           "record is answered at once; ask again after this "
                                           "many seconds", "schema": {"type": "string"}}}},
                      "400": _error("BadRequest"), "404": _error("NotFound"), **_COMMON},
    }},
    "/jobs/{job_id}/cancel": {"post": {
        "operationId": "cancelJob",
        "summary": "Cancel a job: a queued one never runs, a running one stops at the next batch",
        "parameters": [_JOB_ID_PARAM],
        "responses": {
            "202": _json(_ref("Job"), "canceled (was queued) or cancel requested (running)"),
            "400": _error("BadRequest"),
            "404": _error("NotFound"),
            "409": _error("Conflict"),
            **_COMMON,
        },
    }},
    "/images/{image_id}": {"get": {
        "operationId": "getImage",
        "summary": "The original file of an indexed image, or a JPEG thumbnail with ?size=N",
        "parameters": [{"name": "image_id", "in": "path", "required": True,
                        "schema": {"type": "string"}},
                       {"name": "size", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 16, "maximum": 1024}}],
        "responses": {
            "200": {"description": "the image file", "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            }},
            "304": {"description": "not modified (conditional request)"},
            "400": _error("BadRequest"),
            "404": _error("NotFound"),
            **_COMMON,
        },
    }, "delete": {
        "operationId": "deleteImage", "summary": "Remove an image from every version holding it",
        "parameters": [{"name": "image_id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _json(_ref("Deleted"), "deleted"), "400": _error("BadRequest"),
                      "404": _error("NotFound"), **_COMMON},
    }},
}


def query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    """The query parameters each documented operation declares, the API's one list of them.

    Returns:
        (path template as in ``PATHS``, lower-case method) -> parameter names (often none).
    """
    return {(path, method): frozenset(p["name"] for p in op.get("parameters", [])
                                      if p.get("in") == "query")
            for path, operations in PATHS.items() for method, op in operations.items()}


def build_spec(auth_required: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document.

    Args:
        auth_required: whether API keys are configured (then bearer auth is required).

    Returns:
        A fresh JSON-serialisable dict.
    """
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "imgsim",
            "version": "0.1.0",
            "description": "Asynchronous image-similarity search. Job-creating endpoints answer "
                           "202 with a job id; poll or long-poll GET /jobs/{job_id}. Every "
                           "error is JSON {\"error\": {\"code\", \"message\"}}; unknown routes "
                           "answer 404 and wrong methods 405 in that form. A query parameter "
                           "an operation does not declare is a 400 (invalid_parameter naming "
                           "it); POST and DELETE operations declare none: their options go in "
                           "the request body. OPTIONS on any route answers 204 with Allow.",
        },
        "paths": copy.deepcopy(PATHS),
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "responses": copy.deepcopy(RESPONSES),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "one of IMGSIM_API_KEYS"}},
        },
    }
    for operations in spec["paths"].values():
        for operation in operations.values():
            # Refused by gunicorn before any route runs (api/server_errors.py), on any path.
            operation["responses"]["414"] = _error("RequestLineTooLong")
            operation["responses"]["431"] = _error("HeadersTooLarge")
            if "requestBody" in operation:
                operation["responses"]["408"] = _error("BodyTimeout")
    if auth_required:
        spec["security"] = [{"bearerAuth": []}]
    else:
        for operations in spec["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("401", None)
    return spec


@bp.get("/openapi.json")
def openapi_document():
    """The OpenAPI 3.1 document of this API (bearer auth listed when keys are configured)."""
    return jsonify(build_spec(bool(services().settings.api_keys)))
