"""Raw HTTP against gunicorn (no worker): what the server refuses before Flask runs is JSON too,
and a client that stops sending its body gets 408 instead of holding a thread."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid

import pytest
import redis
import requests

from tests.conftest import delete_prefix
from tests.integration.harness import Processes, free_port, wait_for_http

pytestmark = pytest.mark.integration
BODY_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_url):
    prefix = f"imgsimtest{uuid.uuid4().hex[:8]}"
    procs = Processes({
        "IMGSIM_REDIS_URL": redis_url, "IMGSIM_KEY_PREFIX": prefix,
        "IMGSIM_DATA_ROOT": str(tmp_path_factory.mktemp("data")),
        "IMGSIM_ARTIFACTS_DIR": str(tmp_path_factory.mktemp("artifacts")),
        "IMGSIM_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }, tmp_path_factory.mktemp("logs"))
    port = free_port()
    try:
        procs.start_api(port)
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
        yield port
    finally:
        procs.stop_all()
        delete_prefix(redis.Redis.from_url(redis_url), prefix)


def exchange(port: int, raw: bytes, wait_s: float = 20.0) -> tuple[int, dict, str, float]:
    """Send raw bytes, read one response; (status, headers, body, seconds until it came)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait_s)
        started = time.monotonic()
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of the answer"
            body += chunk
        return (int(lines[0].split()[1]), headers, body[:length].decode(),
                time.monotonic() - started)


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GET /jobs/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_line_too_long"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431,
     "headers_too_large"),
    (b"NOT AN HTTP REQUEST\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400, "bad_request"),
    (b"POST /jobs/train HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_request"),
], ids=["request-line-too-long", "header-too-large", "garbage", "bare-lf", "bad-length"])
def test_requests_refused_by_the_server_itself_get_json(api, raw, status, code):
    got, headers, body, _ = exchange(api, raw)
    assert got == status
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]
    assert len(body) < 600  # the client's bytes are not echoed back in full


CHUNKED = (b"POST /jobs/train HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize("body", [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"],
                         ids=["bad-chunk-size", "chunk-without-terminator"])
def test_broken_chunked_framing_is_400_json(api, body):
    status, headers, text, _ = exchange(api, CHUNKED + body)
    assert status == 400, text
    assert headers["content-type"] == "application/json"
    assert json.loads(text)["error"]["code"] == "bad_request"


@pytest.mark.parametrize("kind", ["json", "multipart"])
def test_a_stalled_body_gets_408_json_and_other_requests_keep_answering(api, kind):
    if kind == "json":
        head = (b"POST /jobs/train HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        partial = b'{"dataset":'
    else:
        head = (b"POST /jobs/query HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 5000\r\n\r\n")
        partial = (b'--XX\r\nContent-Disposition: form-data; name="image"; '
                   b'filename="a.jpg"\r\n\r\nab')
    stalled = []
    # Stalled clients hold a thread each until the timeout; the others keep answering.
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", api))
        sock.sendall(head + partial)
        stalled.append(sock)
    try:
        assert requests.get(f"http://127.0.0.1:{api}/healthz", timeout=5).status_code == 200
        status, headers, body, seconds = exchange(api, head + partial)
        assert status == 408, body
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert re.search(rf"no data for {BODY_TIMEOUT_S} s", body)
        assert BODY_TIMEOUT_S - 0.5 <= seconds < BODY_TIMEOUT_S + 5
    finally:
        for sock in stalled:
            sock.close()


def test_the_document_lists_what_these_answers_can_be(api):
    spec = requests.get(f"http://127.0.0.1:{api}/openapi.json", timeout=5).json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"414", "431"} <= set(responses), (method, path)
            assert ("408" in responses) == ("requestBody" in operation), (method, path)
