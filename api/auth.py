"""Bearer-key authentication: a before_request hook, on only when ``IMGSIM_API_KEYS`` is set."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from flask import Flask, request

from api.errors import error_response

# Liveness and readiness stay open so orchestrators can probe without a key; so do the web
# page's static files (no data in them: every call the page makes goes through the JSON API).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/"})
PUBLIC_PREFIXES = ("/static/",)
CHALLENGE = 'Bearer realm="imgsim"'


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the key's length.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def key_matches(presented: str, digests: Sequence[bytes]) -> bool:
    """True when ``presented`` equals one of the keys, compared in constant time.

    Args:
        presented: the token the client sent.
        digests: sha256 digests of the configured keys.

    Returns:
        Whether it matches; every key is compared, so timing does not say which one matched.
    """
    candidate = _digest(presented)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(candidate, digest)
    return matched


def _unauthorized(code: str, message: str):
    body, status = error_response(401, code, message)
    return body, status, {"WWW-Authenticate": CHALLENGE}


def register(app: Flask, keys: Sequence[str]) -> None:
    """Require ``Authorization: Bearer <key>`` on every endpoint but health, when keys are set.

    Args:
        app: the Flask app.
        keys: the accepted keys; empty leaves the API open.
    """
    if not keys:
        return
    digests = tuple(_digest(key) for key in keys)

    @app.before_request
    def _require_bearer_key():
        if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _unauthorized("unauthorized",
                                 "this API needs a key: send 'Authorization: Bearer <key>'")
        if not key_matches(token, digests):
            return _unauthorized("invalid_api_key", "the API key is not valid")
        return None
