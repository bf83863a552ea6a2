"""Check a live HTTP response against the service's OpenAPI document (jsonschema, 2020-12)."""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_URI = "urn:imgsim:openapi"


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class Conformance:
    """Validates (method, path, status, content type, body) against one OpenAPI document."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012))
        self._templates = [
            (re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(path)) + "$"), path)
            for path in spec["paths"]
        ]
        self.checked = 0

    def template(self, path: str) -> str | None:
        """The documented path template matching a concrete path (literal paths win)."""
        if path in self.spec["paths"]:
            return path
        for pattern, template in self._templates:
            if pattern.match(path):
                return template
        return None

    def check(self, method: str, path: str, status: int, content_type: str | None,
              body: bytes) -> None:
        """Raise AssertionError when the response is not what the document promises.

        Unknown routes and wrong methods are checked to be the JSON error body.
        """
        self.checked += 1
        template = self.template(path)
        operation = self.spec["paths"].get(template, {}).get(method.lower()) if template else None
        if operation is None:
            assert status in (401, 404, 405), (method, path, status)
            self._validate(json.loads(body), "components", "schemas", "Error")
            return
        responses = operation["responses"]
        key = str(status) if str(status) in responses else "default"
        assert key in responses, f"{method} {template}: undocumented status {status}: {body[:300]}"
        response = responses[key]
        location = ("paths", template, method.lower(), "responses", key)
        if "$ref" in response:
            name = response["$ref"].rsplit("/", 1)[1]
            response = self.spec["components"]["responses"][name]
            location = ("components", "responses", name)
        content = response.get("content")
        if not content:
            return
        media = (content_type or "").split(";")[0].strip()
        if media not in content:
            family = media.split("/")[0] + "/*"
            assert family in content, f"{method} {template} {status}: content type {media!r}"
            return  # binary payload: the media type is the contract
        if media == "application/json":
            self._validate(json.loads(body), *location, "content", media, "schema")

    def _validate(self, instance: Any, *location: str) -> None:
        schema = {"$ref": f"{SPEC_URI}#/{_pointer(*location)}"}
        validator = Draft202012Validator(schema, registry=self._registry)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{location}: {errors[0].message} at {list(errors[0].path)}"

    def check_requests(self, response) -> None:
        """Check a ``requests`` response."""
        from urllib.parse import urlsplit

        self.check(response.request.method, urlsplit(response.url).path, response.status_code,
                   response.headers.get("Content-Type"), response.content)

    def check_flask(self, method: str, path: str, response) -> None:
        """Check a Flask test-client response."""
        self.check(method, path.split("?")[0], response.status_code, response.content_type,
                   response.get_data())
