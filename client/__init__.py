"""HTTP client of the imgsim API, used by the ``imgsim`` command and the demo (no torch)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

FINAL = frozenset({"succeeded", "failed", "canceled"})


class ApiError(RuntimeError):
    """The API answered with an error body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


# The code of an answer that did not come from an imgsim API (no JSON error body).
NOT_IMGSIM = "not_imgsim"


def _error_from(response: requests.Response) -> ApiError:
    """The API's error, or a ``not_imgsim`` one when the body is not ``{"error": {...}}``."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return ApiError(response.status_code, error["code"], str(error.get("message", "")))
    kind = response.headers.get("Content-Type", "no content type").split(";")[0]
    return ApiError(response.status_code, NOT_IMGSIM,
                    f"HTTP {response.status_code} with {kind} ({len(response.content)} bytes)")


class ImgsimClient:
    """Thin wrapper over the HTTP API.

    Args:
        url: base URL of the API, e.g. ``http://127.0.0.1:8000``.
        api_key: bearer token when the server requires one.
        timeout: seconds per HTTP request.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs) -> Any:
        response = self.session.request(method, self.url + path, timeout=kwargs.pop(
            "timeout", self.timeout), **kwargs)
        if response.status_code >= 400:
            raise _error_from(response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict | list):
            # Every endpoint called here answers a JSON object: anything else is not imgsim.
            kind = response.headers.get("Content-Type", "no content type").split(";")[0]
            raise ApiError(response.status_code, NOT_IMGSIM,
                           f"HTTP {response.status_code} with {kind}, not a JSON object")
        return body

    def train(self, dataset: str, **params) -> dict:
        """Start a training job; returns ``{"job_id", "status_url", ...}``."""
        return self._call("POST", "/jobs/train", json={"dataset": dataset, **params})

    def query(self, image: Path | bytes, k: int = 10, filename: str = "query") -> dict:
        """Start a query job with an image file or its bytes."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = filename if isinstance(image, bytes) else Path(image).name
        return self._call("POST", "/jobs/query", files={"image": (name, data)},
                          data={"k": str(k)})

    def job(self, job_id: str, wait: float = 0) -> dict:
        """Read a job record; ``wait`` long-polls up to that many seconds for it to end."""
        params = {"wait": f"{wait:g}"} if wait else None
        return self._call("GET", f"/jobs/{quote(job_id, safe='')}", params=params,
                          timeout=self.timeout + wait)

    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None,
             timeout: float = 3600.0, poll: float = 1.0) -> dict:
        """Long-poll a job until it ends, calling ``on_update`` with each record seen.

        Args:
            job_id: the job.
            on_update: receives every record read (progress display).
            timeout: give up after this many seconds (TimeoutError).
            poll: long-poll window per request in seconds.

        Returns:
            The final job record.
        """
        deadline = time.monotonic() + timeout
        while True:
            asked = time.monotonic()
            job = self.job(job_id, wait=poll)
            if on_update:
                on_update(job)
            if job["status"] in FINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
            if time.monotonic() - asked < poll / 2:
                # Answered early without the job ending: the server declined to hold the
                # request (every long-poll slot busy, Retry-After: 1); ask again a bit later.
                time.sleep(min(1.0, poll))

    def query_by_id(self, image_id: str, k: int = 10) -> dict:
        """Start a query job with an already indexed image (``POST /jobs/query`` JSON form)."""
        return self._call("POST", "/jobs/query", json={"image_id": image_id, "k": k})

    def index(self, dataset: str) -> dict:
        """Start an index job adding a folder's images to the active version."""
        return self._call("POST", "/jobs/index", json={"dataset": dataset})

    def evaluate(self, dataset: str, labels: str | None = None, k: int = 10) -> dict:
        """Start an evaluation job (precision/mAP at k against baselines)."""
        body: dict[str, Any] = {"dataset": dataset, "k": k}
        if labels:
            body["labels"] = labels
        return self._call("POST", "/jobs/evaluate", json=body)

    def jobs(self, job_type: str | None = None, status: str | None = None,
             limit: int | None = None, cursor: str | None = None) -> dict:
        """List jobs, newest first: ``{"jobs": [...], "next_cursor"}``."""
        params = {name: value for name, value in (
            ("type", job_type), ("status", status), ("limit", limit), ("cursor", cursor))
            if value is not None}
        return self._call("GET", "/jobs", params=params)

    def cancel(self, job_id: str) -> dict:
        """Ask for a job to stop; returns its record."""
        return self._call("POST", f"/jobs/{quote(job_id, safe='')}/cancel")

    def models(self) -> dict:
        """Every model version: ``{"active", "models": [...]}``."""
        return self._call("GET", "/models")

    def activate(self, version: str) -> dict:
        """Make a model version the active one: ``{"active", "previous"}``."""
        return self._call("POST", f"/models/{quote(version, safe='')}/activate")

    def image(self, image_id: str, size: int | None = None) -> bytes:
        """An indexed image's bytes; ``size`` asks for a bounded JPEG thumbnail."""
        params = {"size": str(size)} if size else None
        response = self.session.get(f"{self.url}/images/{quote(image_id, safe='')}", params=params,
                                    timeout=self.timeout)
        if response.status_code >= 400:
            raise _error_from(response)
        return response.content
