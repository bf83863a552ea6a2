"""Flask API: validates requests, records jobs in Redis and enqueues them by task name."""

from __future__ import annotations

import logging
import threading

from celery import Celery
from flask import Flask, Request, Response, request

from shared.images import decode_image, sample_jpeg
from shared.jobs import QUERY_QUEUE, QUERY_TASK, TRAIN_QUEUE, TRAIN_TASK, JobStore
from shared.keys import Keys
from shared.redis_clients import api_redis, broker_transport_options
from shared.registry import ModelRegistry
from shared.settings import Settings

log = logging.getLogger(__name__)

# Multipart framing around the file; the file itself is checked against max_upload_bytes.
MULTIPART_OVERHEAD = 64 * 1024
# Werkzeug's limits on the non-file part of a form, set explicitly (413 JSON beyond them).
# The multipart decoder also applies the memory limit to its read buffer (64 KiB reads plus
# what it holds back), so it must stay well above 64 KiB or every large file part is refused.
MAX_FORM_MEMORY_BYTES = 512 * 1024
MAX_FORM_PARTS = 1000


class JsonSafeRequest(Request):
    """A request whose JSON body nested too deeply for the parser is malformed JSON (400).

    Python's decoder raises RecursionError (not ValueError) past ~1,000 levels, which Flask
    does not treat as a bad body: a 6 KB request of nested brackets was a 500.
    """

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True):
        try:
            return super().get_json(force=force, silent=silent, cache=cache)
        except RecursionError:
            if silent:
                return None
            return self.on_json_loading_failed(ValueError("JSON nested too deeply"))


class ImgsimFlask(Flask):
    """Flask whose automatic ``OPTIONS`` answer is 204 with ``Allow`` and no body.

    Flask's own is a 200 with an empty ``text/html`` body, on an API whose every other answer
    is JSON (or an image). Authentication still applies first, as for every other method.
    """

    def make_default_options_response(self) -> Response:
        methods = super().make_default_options_response().allow
        response = self.response_class(status=204, headers={"Allow": ", ".join(sorted(methods))})
        del response.headers["Content-Type"]  # no body, so no content type (RFC 9110)
        return response


class Services:
    """The API's handles on Redis and the queue, built once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # Fails fast (IMGSIM_REDIS_TIMEOUT_S): the API answers 503 rather than hang a thread.
        self.redis = api_redis(settings)
        self.jobs = JobStore(self.redis, self.keys, settings.job_ttl_s)
        # Long-polls hold a server thread while they wait: at most this many at once.
        self.long_polls = threading.BoundedSemaphore(max(settings.max_long_polls, 1))
        self.registry = ModelRegistry(self.redis, self.keys)
        # A Celery client only: the API sends by task name and never imports worker code.
        self.queue = Celery("imgsim-api", broker=settings.redis_url)
        self.queue.conf.update(
            task_serializer="json", accept_content=["json"],
            task_routes={TRAIN_TASK: {"queue": self.keys.queue(TRAIN_QUEUE)},
                         QUERY_TASK: {"queue": self.keys.queue(QUERY_QUEUE)}},
            broker_connection_retry=False, broker_connection_max_retries=0,
            broker_connection_timeout=settings.redis_timeout_s,
            broker_transport_options=broker_transport_options(settings, api=True),
        )


def warm_up(app: Flask) -> None:
    """Do once what the first query would otherwise pay for (~50 ms on this CPU): Celery and
    kombu import their transport and serializer modules lazily on the first send, open the
    broker connection, and Pillow sets up its JPEG decoder. Failures only cost that head start.

    Args:
        app: an app from ``create_app``.
    """
    svc = app.extensions["imgsim"]
    try:
        decode_image(sample_jpeg(), svc.settings.max_image_pixels, draft_size=256)
        svc.redis.ping()
        with svc.queue.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
    except Exception as exc:  # Redis not up yet: the first request connects as before
        log.info("API warm-up incomplete: %s", exc)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app.

    Args:
        settings: configuration; read from the environment when None.

    Returns:
        The WSGI application.
    """
    settings = settings or Settings.from_env()
    app = ImgsimFlask(__name__)
    app.request_class = JsonSafeRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_OVERHEAD
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_FORM_MEMORY_BYTES
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    app.json.sort_keys = False
    app.extensions["imgsim"] = Services(settings)

    from api import (
        auth,
        errors,
        evaluation,
        health,
        images,
        index,
        jobs,
        lifecycle,
        models,
        openapi,
        query_string,
        web,
    )

    @app.before_request
    def _bound_body_reads():
        # gunicorn hands the app a blocking socket with no timeout: a client that stops in the
        # middle of its body would hold this thread for ever (TimeoutError -> 408, api.errors).
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(settings.body_timeout_s)

    errors.register(app)
    auth.register(app, settings.api_keys)
    query_string.register(app)  # after auth: a request without a key learns nothing more
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(lifecycle.bp)
    app.register_blueprint(images.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(index.bp)
    app.register_blueprint(evaluation.bp)
    app.register_blueprint(openapi.bp)
    return app
