"""JSON bodies for the errors gunicorn answers itself, before a request reaches Flask."""

from __future__ import annotations

import json

from gunicorn import util

# gunicorn's own status -> this API's error code (the message is gunicorn's reason text).
CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "request_line_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}
MAX_MESSAGE_CHARS = 300


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Send gunicorn's error answer as ``{"error": {"code", "message"}}`` and close.

    Same signature as ``gunicorn.util.write_error``, which it replaces: malformed request
    lines, oversized headers and broken framing are refused by the server before the app
    runs, and its default answer is an HTML page.

    Args:
        sock: the client socket.
        status_int: the HTTP status gunicorn chose.
        reason: its reason phrase.
        mesg: what gunicorn says went wrong (may quote the client's bytes: bounded here).
    """
    message = (mesg or reason or "error").strip()
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    code = CODES.get(status_int, reason.lower().replace(" ", "_"))
    # ASCII-only JSON: the status line and headers go out as latin-1 like gunicorn's own.
    body = json.dumps({"error": {"code": code, "message": message}})
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, (head + body).encode("latin-1"))


def install() -> None:
    """Make this gunicorn process answer its own errors with JSON (a ``post_worker_init`` hook).

    gunicorn's workers call ``util.write_error`` through the module, so replacing that one
    function covers every error path of every worker class without copying their code.
    """
    util.write_error = write_json_error
