"""Query strings: a parameter an operation does not declare in ``/openapi.json`` is a 400."""

from __future__ import annotations

import re

from flask import Flask, request

from api.errors import ApiError
from api.openapi import query_parameters
from shared.datasets import SHOWN_CHARS, display_name

# The web page: browsers and link shorteners add tracking parameters to it, and it reads none.
LENIENT_PATHS = frozenset({"/"})
_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _template(rule: str) -> str:
    """``/jobs/<job_id>`` (Flask) -> ``/jobs/{job_id}`` (OpenAPI)."""
    return _CONVERTER.sub(r"{\1}", rule)


def check_query_string(declared: dict[tuple[str, str], frozenset[str]]) -> None:
    """Refuse a query parameter the matched operation does not declare, or one given twice.

    ``POST /jobs/query?k=3`` used to answer 10 hits: the option was silently dropped. POST and
    DELETE operations declare no query parameter (their options go in the body), GET ones the
    documented few.

    Args:
        declared: ``query_parameters()`` of the OpenAPI document.

    Raises:
        ApiError: 400 ``invalid_parameter`` naming the parameter.
    """
    rule = request.url_rule
    # No rule: a 404 or 405 answers it. OPTIONS and undocumented routes (static files) take
    # no options to get wrong.
    if not request.args or rule is None or request.method == "OPTIONS":
        return
    template = _template(rule.rule)
    method = "get" if request.method == "HEAD" else request.method.lower()
    allowed = declared.get((template, method))
    if allowed is None or template in LENIENT_PATHS:
        return
    for raw_name in request.args:
        name = display_name(raw_name, SHOWN_CHARS)  # the client's: bounded in the answer
        if raw_name not in allowed:
            if method in ("post", "delete"):
                hint = (f"{request.method} {template} takes no query parameters: its options "
                        "go in the request body (JSON or form fields)")
            else:
                hint = "accepted: " + (", ".join(sorted(allowed)) or "none")
            raise ApiError(400, "invalid_parameter", f"{name}: unknown query parameter; {hint}",
                           field=name)
        if len(request.args.getlist(raw_name)) > 1:
            raise ApiError(400, "invalid_parameter", f"{name}: given more than once",
                           field=name)


def register(app: Flask) -> None:
    """Check every request's query string before its handler runs (after authentication)."""
    declared = query_parameters()

    @app.before_request
    def _check_query_string():
        check_query_string(declared)
