"""Every error is JSON ``{"error": {"code", "message"}}`` with the right status, never HTML."""

from __future__ import annotations

import logging
import time

import redis
from flask import Flask, jsonify, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised by handlers to answer with a JSON error."""

    def __init__(self, status: int, code: str, message: str, **extra) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def error_response(status: int, code: str, message: str, **extra):
    """A JSON error response."""
    body = {"error": {"code": code, "message": message, **extra}}
    return jsonify(body), status


def _drain_body(length: int | None, limit: int, seconds: float = 10.0) -> None:
    """Read and drop what is left of a refused request body before answering.

    A 413 is decided from the headers, before the body is read. Closing a connection whose
    unread body is still arriving makes the kernel reset it, and the client then sees
    "connection reset" instead of the JSON answer (seen with threaded gunicorn workers under
    load). Bodies up to ``limit`` bytes are read to the end (for at most ``seconds``); larger
    ones are cut off, as a server must.
    """
    if not length or length > limit:
        return
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return
    deadline = time.monotonic() + seconds
    remaining = length
    try:
        while remaining > 0 and time.monotonic() < deadline:
            chunk = stream.read(min(256 * 1024, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
    except (OSError, ValueError):  # the client went away meanwhile
        pass


def register(app: Flask) -> None:
    """Install the JSON error handlers on ``app``."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, **exc.extra)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc):
        limit = app.extensions["imgsim"].settings.max_upload_bytes
        body_limit = app.config.get("MAX_CONTENT_LENGTH")
        length = request.content_length
        _drain_body(length, 4 * (body_limit or limit))
        if length is not None and body_limit is not None and length <= body_limit:
            # The body fits, so Werkzeug's form parser refused a text field or the part count.
            return error_response(
                413, "payload_too_large",
                f"a form field is too large or there are too many parts: text fields may hold "
                f"{app.config.get('MAX_FORM_MEMORY_SIZE'):,} bytes, a request "
                f"{app.config.get('MAX_FORM_PARTS'):,} parts; send images as file parts")
        return error_response(413, "payload_too_large",
                              f"request body too large: the upload limit is {limit:,} bytes")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_").replace("'", "")
        body, status = error_response(exc.code or 500, code, exc.description or exc.name)
        # Keep what the exception says besides its HTML body, e.g. Allow on a 405.
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return body, status, headers

    @app.errorhandler(ClientDisconnected)
    def _body_cut_short(exc: ClientDisconnected):
        # Werkzeug reports any failed body read as a disconnect; one that timed out (the
        # socket timeout set per request in create_app) is a client that stopped sending.
        if isinstance(exc.__context__, TimeoutError):
            seconds = app.extensions["imgsim"].settings.body_timeout_s
            return error_response(408, "request_timeout",
                                  f"the request body stopped arriving: no data for {seconds} s")
        return error_response(400, "body_incomplete",
                              "the connection ended before the request body was complete")

    @app.errorhandler(ParseException)
    def _body_framing(exc: ParseException):
        # gunicorn parses a chunked body as the app reads it, so broken chunk framing surfaces
        # here rather than in gunicorn's own error answer (api.server_errors).
        return error_response(400, "bad_request",
                              f"the request body's framing is broken: {str(exc)[:200]}")

    @app.errorhandler(redis.RedisError)
    def _redis_down(exc):
        log.warning("redis unavailable: %s", exc)
        return error_response(503, "redis_unavailable", "the job store (Redis) is unreachable")

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
