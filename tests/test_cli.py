"""The ``imgsim`` command's pieces that need no server: parsing, exit codes, progress, sheets."""

from __future__ import annotations

import io
import socket

import pytest
from PIL import Image

from api.thumbnails import ThumbnailCache
from client.cli import EXIT_USAGE, ProgressBar, build_parser, main
from client.sheet import Tile, contact_sheet, save_sheet


def _run(argv, env=None):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, env=env or {}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", [[], ["nope"], ["query"], ["query", "a.jpg", "-k", "x"],
                                  ["train"], ["jobs", "--limit", "many"], ["activate"]])
def test_usage_errors_exit_2_with_one_line(argv):
    code, out, err = _run(argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("imgsim: error:")


def test_common_options_work_before_and_after_the_command():
    parser = build_parser()
    before = parser.parse_args(["--json", "--url", "http://h:1", "models"])
    after = parser.parse_args(["models", "--json", "--url", "http://h:1"])
    plain = parser.parse_args(["models"])
    assert before.json and after.json and not plain.json
    assert before.url == after.url == "http://h:1" and plain.url is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_error_exit_2_uses_env_url():
    url = f"http://127.0.0.1:{_closed_port()}"
    code, _, err = _run(["models"], env={"IMGSIM_URL": url})
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and f"cannot reach the imgsim API at {url}" in err
    assert "refused" in err.lower()


def test_bad_url_and_missing_image_are_usage_errors(tmp_path):
    assert _run(["--url", "ftp://x", "models"])[0] == EXIT_USAGE
    code, _, err = _run(["--url", "http://127.0.0.1:9", "query", str(tmp_path / "none.jpg")])
    assert code == EXIT_USAGE and "no such image file" in err


def test_progress_bar_shows_phase_epoch_and_loss():
    stream = io.StringIO()
    bar = ProgressBar(True, stream)
    bar({"type": "train", "status": "running", "progress": {"phase": "scan"}})
    bar({"type": "train", "status": "running", "progress": {
        "phase": "train", "epoch": 2, "epochs": 5, "loss": 0.01234, "images_done": 40,
        "images_total": 100}})
    bar({"type": "train", "status": "succeeded", "progress": {"phase": "done"}})
    text = stream.getvalue()
    assert "train:scan" in text and "train:train" in text
    assert "epoch 2/5" in text and "loss 0.0123" in text and "40/100" in text
    assert bar.bar is None
    quiet = io.StringIO()
    ProgressBar(False, quiet)({"type": "train", "status": "running", "progress": {}})
    assert quiet.getvalue() == ""


def _jpeg(color, size=(120, 80)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


def test_contact_sheet_lays_out_query_and_hits(tmp_path):
    hits = [Tile(_jpeg((0, 0, 200)), f"#{i} score 0.9", f"cat/{i}.jpg") for i in range(1, 7)]
    hits.append(Tile(None, "#7 score 0.1", "missing.jpg"))  # unavailable: grey placeholder
    hits.append(Tile(b"not an image", "#8 score 0.1", "bad.jpg"))
    sheet = contact_sheet(Tile(_jpeg((200, 0, 0)), "query", "q.jpg"), hits, columns=5, cell=100)
    assert sheet.size == (12 + 5 * 112, 36 + 12 + 2 * (100 + 40 + 12))
    # The query is the first cell (red), the hits follow (blue), placeholders are grey.
    assert sheet.getpixel((12 + 50, 48 + 50))[0] > 150
    assert sheet.getpixel((12 + 112 + 50, 48 + 50))[2] > 150
    grey = sheet.getpixel((12 + 2 * 112 + 50, 48 + 152 + 50))
    assert grey == (233, 236, 241)
    path = tmp_path / "sheet.png"
    save_sheet(sheet, path)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == sheet.size


def test_thumbnail_cache_evicts_least_recently_used_by_bytes():
    cache = ThumbnailCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None


def test_a_folder_given_as_the_query_image_is_a_usage_error(tmp_path):
    code, _, err = _run(["query", str(tmp_path)])
    assert code == EXIT_USAGE and "is a folder" in err and "imgsim index" in err


def test_a_closed_pipe_on_stdout_ends_quietly(monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, _text):
            raise BrokenPipeError

    def listing(_self, **_kwargs):
        return {"jobs": [{"job_id": "a" * 32, "type": "query", "status": "queued"}],
                "next_cursor": None}

    monkeypatch.setattr("client.ImgsimClient.jobs", listing)
    err = io.StringIO()
    assert main(["--json", "jobs"], env={}, out=ClosedPipe(), err=err) == 0
    assert err.getvalue() == ""


@pytest.fixture()
def foreign_server():
    """A plain HTTP server that is not imgsim: HTML 404s, an HTML page, an empty 404."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/models"):
                body, status, kind = b"<html>welcome</html>", 200, "text/html"
            elif self.path.startswith("/jobs?"):
                body, status, kind = b"", 404, "text/plain"
            else:
                body, status, kind = b"<!DOCTYPE HTML><html>404</html>", 404, "text/html"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("argv", "said"), [
    (["models"], "HTTP 200 with text/html, not a JSON object"),
    (["jobs"], "HTTP 404 with text/plain (0 bytes)"),
    (["job", "abc"], "HTTP 404 with text/html"),
])
def test_a_server_that_is_not_imgsim_is_named_as_such(foreign_server, argv, said):
    code, out, err = _run(["--url", foreign_server, *argv])
    assert code == EXIT_USAGE and out == ""
    assert err.count("\n") == 1
    assert f"the server at {foreign_server} does not answer like an imgsim API" in err
    assert said in err and "<html" not in err.lower()
