"""The HTTP contract in-process (Flask test client, real Redis): OpenAPI, errors, auth, limits,
job listing, cancel, expiry and long-poll."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from openapi_spec_validator import validate as validate_openapi
from PIL import Image

from api import MAX_FORM_MEMORY_BYTES, create_app
from api.auth import key_matches
from api.openapi import build_spec
from shared.jobs import JobStore, JobType, decode_cursor, encode_cursor
from shared.keys import Keys
from shared.registry import ModelRegistry
from shared.settings import Settings, SettingsError
from tests.openapi_check import Conformance

MAX_UPLOAD = 64 * 1024


def _png(size=(32, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def settings(redis_url, key_prefix, tmp_path) -> Settings:
    (tmp_path / "data").mkdir()
    return Settings(redis_url=redis_url, key_prefix=key_prefix, data_root=tmp_path / "data",
                    artifacts_dir=tmp_path / "artifacts", max_upload_bytes=MAX_UPLOAD)


class Client:
    """A Flask test client whose every answer is checked against the served OpenAPI document."""

    def __init__(self, app, headers=None) -> None:
        self.app = app
        self.client = app.test_client()
        self.headers = headers or {}
        spec_response = self.client.get("/openapi.json", headers=self.headers)
        assert spec_response.status_code == 200, spec_response.get_data()
        self.conformance = Conformance(spec_response.get_json())

    def request(self, method: str, path: str, **kwargs):
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = self.client.open(path, method=method, headers=headers, **kwargs)
        self.conformance.check_flask(method, path, response)
        return response

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)


@pytest.fixture
def client(settings) -> Client:
    return Client(create_app(settings))


@pytest.fixture
def store(settings, redis_client) -> JobStore:
    return JobStore(redis_client, Keys(settings.key_prefix), settings.job_ttl_s)


# --------------------------------------------------------------------------- OpenAPI document


@pytest.mark.parametrize("auth", [False, True])
def test_openapi_document_is_valid_openapi_3_1(auth):
    spec = build_spec(auth)
    assert spec["openapi"].startswith("3.1")
    validate_openapi(spec)


def test_every_flask_route_and_method_is_documented(settings):
    app = create_app(settings)
    spec = build_spec(False)
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    routed = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routed.add((path, method.lower()))
    assert routed == documented, (
        f"routes missing from api/openapi.py: {sorted(routed - documented)}; "
        f"documented but not routed: {sorted(documented - routed)}")


def test_every_operation_documents_its_errors():
    for path, ops in build_spec(True)["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "500" in codes, (path, method)
            if op.get("security") != []:
                assert {"401", "503"} <= codes, (path, method)
            for param in op.get("parameters", []):
                assert param.get("schema"), (path, method, param)


# --------------------------------------------------------------------------- every error is JSON


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/nope", 404, "not_found"),
    ("GET", "/jobs/abc/def/ghi", 404, "not_found"),
    ("DELETE", "/jobs/train", 405, "method_not_allowed"),
    ("GET", "/jobs/query/cancel", 405, "method_not_allowed"),
    ("PUT", "/healthz", 405, "method_not_allowed"),
])
def test_unknown_routes_and_methods_answer_json(client, method, path, status, code):
    response = client.request(method, path)
    assert response.status_code == status
    assert response.is_json
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["message"]
    if status == 405:
        assert "Allow" in response.headers


def test_train_with_a_non_json_body_is_json_400(client):
    response = client.post("/jobs/train", data="dataset=x", content_type="text/plain")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"


# --------------------------------------------------------------------------- limits


def test_upload_over_the_byte_cap_is_413_json(client):
    big = b"\xff\xd8\xff" + b"\0" * (MAX_UPLOAD + 1)
    response = client.post("/jobs/query", data={"image": (io.BytesIO(big), "big.jpg")})
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"
    assert f"{MAX_UPLOAD:,}" in response.get_json()["error"]["message"]


def test_body_over_max_content_length_is_413_json_naming_the_limit(client):
    big = b"\0" * (MAX_UPLOAD + 128 * 1024)
    response = client.post("/jobs/query", data={"image": (io.BytesIO(big), "big.jpg")})
    assert response.status_code == 413
    body = response.get_json()["error"]
    assert body["code"] == "payload_too_large" and "upload limit" in body["message"]


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart body built by hand (the test client would spool a big one to a temp file)."""
    boundary = "imgsimtestboundary7d1f"
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                      + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def roomy(settings) -> Client:
    """An app whose upload cap is far above Werkzeug's form memory limit."""
    return Client(create_app(Settings(**{**settings.__dict__, "max_upload_bytes": 4 << 20})))


def test_huge_text_field_hits_the_form_memory_limit_as_413_json(roomy):
    # Werkzeug >= 3.1 refuses non-file form fields over max_form_memory_size with a 413 page.
    # The field comes first: Werkzeug leaves an already-open file part unclosed when it stops
    # mid-body (a ResourceWarning at garbage collection, which this suite turns into an error).
    body, content_type = _multipart([("k", None, b"1" * (MAX_FORM_MEMORY_BYTES + 10)),
                                     ("image", "a.png", _png())])
    response = roomy.post("/jobs/query", data=body, content_type=content_type)
    assert response.status_code == 413
    body = response.get_json()["error"]
    assert body["code"] == "payload_too_large"
    assert "form field" in body["message"] and f"{MAX_FORM_MEMORY_BYTES:,}" in body["message"]


def test_large_real_photo_passes_the_form_limits(roomy):
    """A file part far above the form memory limit is streamed, never refused as a field."""
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "PNG")
    assert len(out.getvalue()) > 2 * MAX_FORM_MEMORY_BYTES
    body, content_type = _multipart([("image", "n.png", out.getvalue())])
    response = roomy.post("/jobs/query", data=body, content_type=content_type)
    assert response.status_code == 409  # decoded fine; no model is active in this test


def test_image_sent_as_text_field_is_told_to_use_a_file_part(client):
    response = client.post("/jobs/query", data={"image": "not a file part"})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "missing_image"


def test_empty_file_name_means_no_file(client):
    response = client.post("/jobs/query", data={"image": (io.BytesIO(_png()), "")})
    assert response.status_code == 400
    assert response.get_json()["error"]["message"].startswith("no file")


def test_pixel_cap_from_the_header_is_413(settings):
    small_cap = Client(create_app(Settings(**{**settings.__dict__, "max_image_pixels": 100})))
    response = small_cap.post("/jobs/query", data={"image": (io.BytesIO(_png((20, 10))), "a.png")})
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error["code"] == "image_too_large" and "20x10" in error["message"]


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    brands = major + b"\0\0\0\0" + b"".join(compatible)
    box = (8 + len(brands)).to_bytes(4, "big") + b"ftyp" + brands
    return box + b"\0\0\0\x08mdat"


@pytest.mark.parametrize(("data", "family", "name"), [
    (_ftyp(b"heic", b"mif1", b"heic"), "HEIF", "heic"),
    (_ftyp(b"mif1", b"mif1"), "HEIF", "heif"),
    (_ftyp(b"avif", b"mif1", b"avif"), "AVIF", "avif"),
    (_ftyp(b"mif1", b"avif"), "AVIF", "avif"),
])
def test_heic_and_avif_without_a_plugin_are_415_naming_the_format(client, data, family, name):
    from shared.images import OPTIONAL_READABLE

    if family in OPTIONAL_READABLE:
        pytest.skip(f"{family} is readable here (plugin or Pillow's own codec)")
    response = client.post("/jobs/query", data={"image": (io.BytesIO(data), "photo")})
    assert response.status_code == 415
    error = response.get_json()["error"]
    assert error["code"] == "unsupported_format" and name in error["message"]


def test_avif_follows_the_codec_pillow_was_built_with(client):
    from PIL import features

    out = io.BytesIO()
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec (the 415 test covers it)")
    Image.new("RGB", (20, 10), (10, 200, 10)).save(out, "AVIF")
    response = client.post("/jobs/query", data={"image": (io.BytesIO(out.getvalue()), "a.avif")})
    # Decoded fine, so the answer is about the missing model, not the format.
    assert response.status_code == 409, response.get_json()


# --------------------------------------------------------------------------- auth


def test_api_keys_are_parsed_from_the_environment():
    assert Settings.from_env({"IMGSIM_API_KEYS": " k1, ,k2,k1 "}).api_keys == ("k1", "k2")
    assert Settings.from_env({}).api_keys == ()
    assert "k1" not in repr(Settings.from_env({"IMGSIM_API_KEYS": "k1"}))
    with pytest.raises(SettingsError):
        Settings.from_env({"IMGSIM_API_KEYS": "has space"})


@pytest.fixture
def keyed_app(settings):
    return create_app(Settings(**{**settings.__dict__, "api_keys": ("alpha-key", "beta-key")}))


@pytest.mark.parametrize("path", ["/openapi.json", "/jobs", f"/jobs/{'0' * 32}", "/nope",
                                  f"/images/{'0' * 24}", "/models", "/static"])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic YWxwaGEta2V5", "Bearer",
                                    "alpha-key", "Bearer alpha-key2"])
def test_without_a_valid_key_every_endpoint_is_401_json(keyed_app, path, header):
    headers = {"Authorization": header} if header else {}
    response = keyed_app.test_client().get(path, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] in {"unauthorized", "invalid_api_key"}
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_post_without_key_is_refused_before_anything_is_recorded(keyed_app, redis_client,
                                                                 settings):
    response = keyed_app.test_client().post("/jobs/train", json={"dataset": "x"})
    assert response.status_code == 401
    assert redis_client.zcard(Keys(settings.key_prefix).jobs_index()) == 0


@pytest.mark.parametrize("key", ["alpha-key", "beta-key"])
def test_any_configured_key_is_accepted_and_answers_conform(keyed_app, key):
    client = Client(keyed_app, headers={"Authorization": f"Bearer {key}"})
    assert client.conformance.spec["security"] == [{"bearerAuth": []}]
    assert client.get("/jobs").status_code == 200
    assert client.get(f"/jobs/{'0' * 32}").status_code == 404
    assert client.get("/nope").status_code == 404
    assert client.get("/healthz").status_code == 200
    assert client.request("GET", "/jobs", headers={"Authorization": "bearer  " + key}) \
        .status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_needs_no_key(keyed_app, path):
    response = keyed_app.test_client().get(path)
    assert response.status_code in (200, 503)
    assert response.get_json()["status"] in {"ok", "ready", "not_ready"}


@pytest.mark.parametrize("path", ["/", "/static/app.js"])
def test_the_web_page_files_need_no_key_but_its_api_calls_do(keyed_app, path):
    client = keyed_app.test_client()
    response = client.get(path)
    assert response.status_code == 200
    response.close()
    assert client.get("/models").status_code == 401


def test_key_comparison_is_over_digests_in_constant_time():
    import hashlib

    import api.auth as auth

    digests = (hashlib.sha256(b"alpha").digest(), hashlib.sha256(b"beta").digest())
    assert key_matches("beta", digests) and key_matches("alpha", digests)
    assert not key_matches("alph", digests) and not key_matches("", digests)
    assert "compare_digest" in Path(auth.__file__).read_text()


def test_without_keys_the_spec_has_no_security_requirement(client):
    assert "security" not in client.conformance.spec
    assert client.get("/jobs").status_code == 200


# --------------------------------------------------------------------------- GET /jobs


def _finish(store: JobStore, job_id: str) -> None:
    assert store.mark_running(job_id)
    assert store.succeed(job_id, {"ok": True})


def test_jobs_are_listed_newest_first_with_filters_and_cursor(client, store):
    made = []
    for i in range(7):
        job = store.create(JobType.TRAIN if i % 2 else JobType.QUERY, {"i": i})
        made.append(job["job_id"])
        time.sleep(0.002)
    _finish(store, made[1])
    listed = client.get("/jobs").get_json()
    assert [j["job_id"] for j in listed["jobs"]] == made[::-1]
    assert listed["next_cursor"] is None
    trains = client.get("/jobs?type=train").get_json()["jobs"]
    assert [j["job_id"] for j in trains] == [made[5], made[3], made[1]]
    done = client.get("/jobs?status=succeeded&type=train").get_json()["jobs"]
    assert [j["job_id"] for j in done] == [made[1]]
    assert client.get("/jobs?type=evaluate").get_json() == {"jobs": [], "next_cursor": None}
    pages, cursor = [], None
    while True:
        url = "/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url).get_json()
        pages.append([j["job_id"] for j in page["jobs"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [i for page in pages for i in page] == made[::-1]
    assert [len(p) for p in pages][:2] == [3, 3]


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x", "status=done",
                                   "type=Train!", "type=evil", "cursor=garbage",
                                   "cursor=" + "A" * 8])
def test_bad_list_parameters_are_400_naming_the_field(client, query):
    response = client.get(f"/jobs?{query}")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_parameter" and error["field"] == query.split("=")[0]


def test_cursor_round_trip_and_rejection():
    cursor = encode_cursor(1733280000.123456, "a" * 32)
    assert decode_cursor(cursor) == (1733280000.123456, "a" * 32)


# --------------------------------------------------------------------------- cancel


def test_cancel_queued_job_ends_it_at_once_and_drops_its_upload(client, store, settings,
                                                               redis_client):
    job = store.create(JobType.QUERY, {"k": 1})
    upload = Keys(settings.key_prefix).upload(job["job_id"])
    redis_client.set(upload, b"bytes", ex=60)
    response = client.post(f"/jobs/{job['job_id']}/cancel")
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "canceled" and body["cancel_requested"] is True
    assert body["error"]["code"] == "canceled" and body["finished_at"]
    assert redis_client.exists(upload) == 0
    assert not store.mark_running(job["job_id"]), "a canceled job must never start"
    again = client.post(f"/jobs/{job['job_id']}/cancel")
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "job_finished"


def test_cancel_running_job_asks_the_worker(client, store):
    job = store.create(JobType.TRAIN, {})
    assert store.mark_running(job["job_id"])
    response = client.post(f"/jobs/{job['job_id']}/cancel")
    assert response.status_code == 202
    assert response.get_json()["status"] == "running"
    assert response.get_json()["cancel_requested"] is True
    assert store.report_and_check_cancel(job["job_id"], {"phase": "train"})
    assert store.mark_canceled(job["job_id"])
    assert store.get(job["job_id"])["status"] == "canceled"
    assert client.post(f"/jobs/{job['job_id']}/cancel").status_code == 409


@pytest.mark.parametrize("ending", ["succeed", "fail"])
def test_cancel_finished_job_is_409(client, store, ending):
    job = store.create(JobType.TRAIN, {})
    store.mark_running(job["job_id"])
    if ending == "succeed":
        store.succeed(job["job_id"], {})
    else:
        store.fail(job["job_id"], "x", "y")
    response = client.post(f"/jobs/{job['job_id']}/cancel")
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "job_finished"
    assert store.get(job["job_id"])["status"] != "canceled"


@pytest.mark.parametrize("job_id", ["0" * 32, "not-an-id"])
def test_cancel_unknown_job_is_404(client, job_id):
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "job_not_found"


def test_progress_of_an_uncanceled_job_reports_no_cancel(store):
    job = store.create(JobType.TRAIN, {})
    store.mark_running(job["job_id"])
    assert not store.report_and_check_cancel(job["job_id"], {"phase": "train", "epoch": 1})
    assert store.get(job["job_id"])["progress"] == {"phase": "train", "epoch": 1}


# --------------------------------------------------------------------------- expiry


def test_records_expire_and_the_index_is_trimmed(redis_client, settings):
    keys = Keys(settings.key_prefix)
    short = JobStore(redis_client, keys, ttl_s=1)
    old = short.create(JobType.QUERY, {})
    assert 0 < redis_client.ttl(keys.job(old["job_id"])) <= 1
    time.sleep(1.2)
    assert short.get(old["job_id"]) is None
    # A late progress write (a worker still running) must not resurrect the record.
    short.set_progress(old["job_id"], {"phase": "train"})
    assert redis_client.exists(keys.job(old["job_id"])) == 0
    assert short.report_and_check_cancel(old["job_id"], {"phase": "train"})
    assert redis_client.exists(keys.job(old["job_id"])) == 0
    new = short.create(JobType.QUERY, {})  # creating trims ids older than the TTL
    members = [m.decode() for m in redis_client.zrange(keys.jobs_index(), 0, -1)]
    assert members == [new["job_id"]]
    jobs, cursor = short.list_jobs()
    assert [j["job_id"] for j in jobs] == [new["job_id"]] and cursor is None


def test_a_shorter_ttl_elsewhere_never_unlists_jobs_that_still_exist(redis_client, settings):
    # One API process with IMGSIM_JOB_TTL_S=1 (a rolling change of the setting) next to one
    # with a day: the day-long records stay listed until they expire themselves.
    keys = Keys(settings.key_prefix)
    long_lived = JobStore(redis_client, keys, ttl_s=86_400)
    short = JobStore(redis_client, keys, ttl_s=1)
    kept = long_lived.create(JobType.TRAIN, {})
    time.sleep(1.2)
    short.create(JobType.QUERY, {})
    short.list_jobs()
    assert redis_client.zscore(keys.jobs_index(), kept["job_id"]) is not None
    listed, _ = long_lived.list_jobs(job_type="train")
    assert [j["job_id"] for j in listed] == [kept["job_id"]]


def test_listing_drops_ids_whose_record_vanished(store, redis_client, settings):
    keys = Keys(settings.key_prefix)
    gone = store.create(JobType.QUERY, {})
    kept = store.create(JobType.QUERY, {})
    redis_client.delete(keys.job(gone["job_id"]))
    jobs, _ = store.list_jobs()
    assert [j["job_id"] for j in jobs] == [kept["job_id"]]
    assert redis_client.zscore(keys.jobs_index(), gone["job_id"]) is None


def test_default_ttl_is_24_hours_and_configurable():
    assert Settings().job_ttl_s == 86400
    assert Settings.from_env({"IMGSIM_JOB_TTL_S": "120"}).job_ttl_s == 120
    assert Settings.from_env({"IMGSIM_UPLOAD_TTL_S": "90"}).upload_ttl_s == 90


# --------------------------------------------------------------------------- long-poll


def test_long_poll_answers_as_soon_as_the_job_ends(client, store):
    job = store.create(JobType.TRAIN, {})
    store.mark_running(job["job_id"])
    timer = threading.Timer(0.4, lambda: store.succeed(job["job_id"], {"done": 1}))
    timer.start()
    started = time.monotonic()
    response = client.get(f"/jobs/{job['job_id']}?wait=10")
    elapsed = time.monotonic() - started
    timer.join()
    assert response.status_code == 200 and response.get_json()["status"] == "succeeded"
    assert 0.3 < elapsed < 3, elapsed


def test_long_poll_gives_up_after_n_seconds(client, store):
    job = store.create(JobType.TRAIN, {})
    started = time.monotonic()
    response = client.get(f"/jobs/{job['job_id']}?wait=0.5")
    assert 0.45 < time.monotonic() - started < 2.5
    assert response.get_json()["status"] == "queued"


def test_long_poll_wakes_on_cancel_of_a_queued_job(client, store):
    job = store.create(JobType.TRAIN, {})
    timer = threading.Timer(0.3, lambda: store.request_cancel(job["job_id"]))
    timer.start()
    started = time.monotonic()
    response = client.get(f"/jobs/{job['job_id']}?wait=10")
    timer.join()
    assert response.get_json()["status"] == "canceled"
    assert time.monotonic() - started < 3


def test_long_polls_beyond_the_limit_are_answered_at_once_with_retry_after(settings, store):
    from dataclasses import replace

    limited = Client(create_app(replace(settings, max_long_polls=2)))
    job = store.create(JobType.TRAIN, {})
    url = f"/jobs/{job['job_id']}?wait=3"
    holders = [threading.Thread(target=limited.get, args=(url,)) for _ in range(2)]
    for thread in holders:
        thread.start()
    time.sleep(0.3)  # both slots taken
    started = time.monotonic()
    response = limited.get(url)
    assert time.monotonic() - started < 1.0
    assert response.get_json()["status"] == "queued"
    assert response.headers["Retry-After"] == "1"
    store.succeed(job["job_id"], {"done": 1})  # wakes the holders
    for thread in holders:
        thread.join(timeout=5)
    again = limited.get(url)  # slots free again, and the job is final: no Retry-After
    assert again.get_json()["status"] == "succeeded" and "Retry-After" not in again.headers


@pytest.mark.parametrize("wait", ["31", "-1", "nan", "abc", "inf"])
def test_bad_wait_is_400(client, store, wait):
    job = store.create(JobType.TRAIN, {})
    response = client.get(f"/jobs/{job['job_id']}?wait={wait}")
    assert response.status_code == 400 and response.get_json()["error"]["field"] == "wait"


def test_query_without_an_active_model_is_409_and_records_nothing(client, store, settings,
                                                                  redis_client):
    assert ModelRegistry(redis_client, Keys(settings.key_prefix)).active_version() is None
    response = client.post("/jobs/query", data={"image": (io.BytesIO(_png()), "a.png")})
    assert response.status_code == 409
    assert store.list_jobs() == ([], None)


# --------------------------------------------------------------------------- POST /jobs/evaluate


@pytest.fixture
def eval_folder(settings) -> Path:
    folder = settings.data_root / "held" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(_png())
    return settings.data_root / "held"


def test_evaluate_without_an_active_model_is_409_and_records_nothing(client, eval_folder):
    response = client.post("/jobs/evaluate", json={"dataset": "held"})
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "no_active_model"
    assert client.get("/jobs").get_json()["jobs"] == []


@pytest.mark.parametrize(("body", "code", "field"), [
    ({}, "invalid_parameter", "dataset"),
    ({"dataset": "held", "k": 0}, "invalid_parameter", "k"),
    ({"dataset": "held", "k": "10"}, "invalid_parameter", "k"),
    ({"dataset": "held", "probes": 3}, "invalid_parameter", "probes"),
    ({"dataset": "held", "labels": ""}, "invalid_parameter", "labels"),
    ({"dataset": "held", "labels": 7}, "invalid_parameter", "labels"),
    ({"dataset": "missing"}, "dataset_not_found", None),
    ({"dataset": "../.."}, "dataset_outside_data_root", None),
    ({"dataset": "held", "labels": "../outside.csv"}, "labels_outside_data_root", None),
    ({"dataset": "held", "labels": "nope.csv"}, "labels_not_found", None),
    ({"dataset": "held", "labels": "held"}, "labels_not_a_file", None),
    ({"dataset": "held", "labels": "no_header.csv"}, "invalid_labels", "labels"),
    ({"dataset": "held", "labels": "bad_row.csv"}, "invalid_labels", "labels"),
    ({"dataset": "held", "labels": "binary.csv"}, "invalid_labels", "labels"),
    ({"dataset": "empty"}, "no_readable_images", None),
])
def test_evaluate_bad_requests_are_400_naming_the_problem(client, settings, redis_client,
                                                         eval_folder, body, code, field):
    root = settings.data_root
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    (root.parent / "outside.csv").write_text("path,class\ncat/a.png,cat\n")
    (root / "no_header.csv").write_text("cat/a.png,cat\n")
    (root / "bad_row.csv").write_text("path,class\n../../etc/passwd,cat\n")
    (root / "binary.csv").write_bytes(b"\xff\xfe\x00path")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    response = client.post("/jobs/evaluate", json=body)
    assert response.status_code == 400, response.get_data()
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error.get("field") == field
    assert client.get("/jobs").get_json()["jobs"] == []


def test_evaluate_is_accepted_with_a_labels_file(client, settings, redis_client, eval_folder):
    (settings.data_root / "labels.csv").write_text("path,class\nheld/cat/a.png,tabby\n")
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    response = client.post("/jobs/evaluate",
                           json={"dataset": "held", "labels": "labels.csv", "k": 5})
    assert response.status_code == 202, response.get_data()
    job = client.get(response.headers["Location"]).get_json()
    assert (job["type"], job["status"]) == ("evaluate", "queued")
    assert job["params"] == {"dataset": "held", "labels": "labels.csv", "k": 5}


@pytest.mark.parametrize("path", ["/jobs/train", "/jobs/query", "/jobs/index", "/jobs/evaluate"])
def test_json_nested_beyond_the_parser_is_a_400_not_a_500(client, settings, redis_client, path):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    body = "[" * 3000 + "]" * 3000
    response = client.post(path, data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data()
    assert response.get_json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(("path", "form", "field"), [
    ("/jobs/query", {"K": "5"}, "K"),
    ("/jobs/query", {"k": ["3", "500"]}, "k"),
    ("/jobs/query", {"probes": "4", "colour": "red"}, "colour"),
    ("/jobs/query", {"photo": (io.BytesIO(b"x"), "x.png")}, "photo"),
    ("/jobs/index", {"k": "3"}, "k"),
])
def test_unknown_or_repeated_form_fields_are_400(client, settings, redis_client, path, form,
                                                 field):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    data = {"image": (io.BytesIO(_png()), "a.png"), **form}
    response = client.post(path, data=data)
    assert response.status_code == 400, response.get_data()
    assert response.get_json()["error"]["field"] == field
    assert client.get("/jobs").get_json()["jobs"] == []


def test_index_upload_with_an_empty_file_name_means_no_file(client, settings, redis_client):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    response = client.post("/jobs/index", data={"image": (io.BytesIO(_png()), "")})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "missing_image"


@pytest.mark.parametrize("body", [{"k": "3"}, {"probes": "4"}, {"exact": "true"}, {"k": None},
                                  {"exact": None}])
def test_json_query_options_must_be_json_numbers_and_booleans(client, settings, redis_client,
                                                              body):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    response = client.post("/jobs/query", json={"image_id": "a" * 24, **body})
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == next(iter(body))


def test_json_query_probes_null_means_the_versions_default(client, settings, redis_client):
    keys = Keys(settings.key_prefix)
    ModelRegistry(redis_client, keys).activate("v-test")
    redis_client.hset(keys.namespace("v-test").images, "a" * 24, "{}")
    response = client.post("/jobs/query", json={"image_id": "a" * 24, "probes": None})
    assert response.status_code == 202, response.get_data()
    job = client.get(f"/jobs/{response.get_json()['job_id']}").get_json()
    assert (job["params"]["k"], job["params"]["probes"]) == (10, None)


# --------------------------------------------------------------------------- bounded echoes

HUGE = 600_000
# Werkzeug refuses multipart part headers much longer than this (413), before any handler.
HUGE_PART = 100_000


def _huge(char: str = "a", size: int = HUGE) -> str:
    return char * size


def _png_part(name: str = "a.png"):
    return (io.BytesIO(_png()), name)


# (method, path, request arguments, length of the long value the answer must quote bounded)
BOUNDED_CASES = [
    ("POST", "/jobs/train", lambda: {"json": {"dataset": _huge()}}, HUGE),
    ("POST", "/jobs/train", lambda: {"json": {"dataset": "held", _huge("x"): 1}}, HUGE),
    ("POST", "/jobs/index", lambda: {"json": {"dataset": _huge()}}, HUGE),
    ("POST", "/jobs/evaluate", lambda: {"json": {"dataset": _huge()}}, HUGE),
    ("POST", "/jobs/evaluate", lambda: {"json": {"dataset": "held", "labels": _huge()}}, HUGE),
    ("POST", "/jobs/query", lambda: {"json": {"image_id": "a" * 24, _huge("x"): 1}}, HUGE),
    ("POST", "/jobs/query", lambda: {"data": {"image": _png_part(),
                                              _huge("x", HUGE_PART): "5"}}, HUGE_PART),
    ("POST", "/jobs/query", lambda: {"data": {_huge("x", HUGE_PART): _png_part()}}, HUGE_PART),
    ("POST", "/jobs/query", lambda: {"data": {"image": _png_part(),
                                              _huge("x", HUGE_PART): _png_part()}}, HUGE_PART),
    ("POST", "/jobs/index", lambda: {"data": {"image": (io.BytesIO(b""), _huge("n", HUGE_PART))}},
     HUGE_PART),
    ("POST", "/jobs/index", lambda: {"data": {"image": (io.BytesIO(b"not an image"),
                                                        _huge("n", HUGE_PART))}}, HUGE_PART),
    ("GET", f"/jobs/{_huge()}", dict, HUGE),
    ("POST", f"/jobs/{_huge()}/cancel", dict, HUGE),
    ("GET", f"/images/{_huge()}", dict, HUGE),
    ("DELETE", f"/images/{_huge()}", dict, HUGE),
    ("POST", f"/models/{_huge()}/activate", dict, HUGE),
    ("POST", f"/jobs/query?{_huge('q')}=1", dict, HUGE),
    ("GET", f"/jobs?{_huge('q')}=1", dict, HUGE),
]


@pytest.mark.parametrize(("method", "path", "make_kwargs", "size"), BOUNDED_CASES,
                         ids=[f"{m}-{p[:20]}-{i}" for i, (m, p, *_) in enumerate(BOUNDED_CASES)])
def test_error_messages_quote_user_input_bounded(roomy, settings, redis_client, eval_folder,
                                                 method, path, make_kwargs, size):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    response = roomy.request(method, path, **make_kwargs())
    assert 400 <= response.status_code < 500, response.get_data()[:300]
    assert len(response.get_data()) < 2000, response.get_data()[:300]
    error = response.get_json()["error"]
    # The first characters and the total length are kept, in the message or the field named;
    # the rest is not repeated.
    bounded = f"\u2026 ({size:,} characters)"
    quoted = [error[key] for key in ("message", "field", "file") if key in error]
    assert any(bounded in text for text in quoted), error
    assert all(len(text) < 1000 for text in quoted), error


def test_an_out_of_range_json_integer_is_quoted_bounded(client, eval_folder):
    response = client.post("/jobs/train", json={"dataset": "held", "epochs": 10 ** 4000})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["field"] == "epochs" and "(4,001 characters)" in error["message"]
    assert len(response.get_data()) < 2000


# --------------------------------------------------------------------------- strict integers

NOT_ASCII_DECIMAL = ["\u0665", "\uff15", " 5 ", "5 ", "1_0", "+5", "5\n", "0x10", "1.0", "5e0",
                     ""]


def _integer_request(client, settings, redis_client, store, where: str, value: str):
    """Send ``value`` in the integer field ``where``; returns (response, field name)."""
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    if where == "query k":
        return client.post("/jobs/query", data={"image": (io.BytesIO(_png()), "a.png"),
                                                "k": value}), "k"
    if where == "batch k":
        return client.post("/jobs/query", data={"image": [(io.BytesIO(_png()), "a.png"),
                                                          (io.BytesIO(_png()), "b.png")],
                                                "k": value}), "k"
    if where == "probes":
        return client.post("/jobs/query", data={"image": (io.BytesIO(_png()), "a.png"),
                                                "probes": value}), "probes"
    query = urlencode({where: value})
    if where == "limit":
        return client.get(f"/jobs?{query}"), "limit"
    if where == "size":
        return client.get(f"/images/{'0' * 24}?{query}"), "size"
    job = store.create(JobType.TRAIN, {})
    return client.get(f"/jobs/{job['job_id']}?{query}"), "wait"


INTEGER_FIELDS = ["query k", "batch k", "probes", "limit", "size", "wait"]


# wait is a number of seconds: decimals and exponents are numbers there, not bad integers.
BAD_INTEGER_CASES = [(where, value) for where in INTEGER_FIELDS for value in NOT_ASCII_DECIMAL
                     if not (where == "wait" and value in ("1.0", "5e0"))]


@pytest.mark.parametrize(("where", "value"), BAD_INTEGER_CASES)
def test_integer_text_fields_take_ascii_decimal_digits_only(client, settings, redis_client,
                                                             store, where, value):
    response, field = _integer_request(client, settings, redis_client, store, where, value)
    assert response.status_code == 400, (where, value, response.get_data())
    error = response.get_json()["error"]
    assert (error["code"], error["field"]) == ("invalid_parameter", field)
    assert client.get("/jobs?type=query").get_json()["jobs"] == []


@pytest.mark.parametrize("where", INTEGER_FIELDS)
def test_integer_text_fields_still_take_plain_digits_and_range_check_negatives(
        client, settings, redis_client, store, where):
    plain = "0" if where == "wait" else "16"  # a wait of 16 s would hold the test that long
    response, _ = _integer_request(client, settings, redis_client, store, where, plain)
    assert response.status_code in (200, 202, 404), response.get_data()  # 404: no such image
    response, field = _integer_request(client, settings, redis_client, store, where, "-1")
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == field
    if where == "query k":
        assert response.get_json()["error"]["message"] == "k: must be between 1 and 100, got -1"


@pytest.mark.parametrize("wait", ["0.5", ".5", "1e-1", "0"])
def test_wait_takes_decimal_numbers(client, store, wait):
    job = store.create(JobType.TRAIN, {})
    assert client.get(f"/jobs/{job['job_id']}?wait={wait}").status_code == 200


# --------------------------------------------------------------------------- canonical names


def _queued_args(redis_client, settings, queue: str, job_id: str) -> list:
    """The arguments of the broker message of ``job_id`` waiting in ``queue``."""
    import base64
    import json

    for raw in redis_client.lrange(f"{settings.key_prefix}.{queue}", 0, -1):
        message = json.loads(raw)
        if message["headers"]["id"] == job_id:
            return json.loads(base64.b64decode(message["body"]))[0]
    raise AssertionError(f"no message for {job_id} in {queue}")


@pytest.mark.parametrize(("typed", "canonical"), [
    ("held/../held", "held"),
    ("./held/", "held"),
    ("held/cat/..", "held"),
    ("held/cat", "held/cat"),
    (".", "."),
    ("held/..", "."),
    ("ABSOLUTE/held", "held"),
    ("ABSOLUTE", "."),
    ("link_to_held", "held"),
])
@pytest.mark.parametrize("path", ["/jobs/train", "/jobs/index", "/jobs/evaluate"])
def test_datasets_are_recorded_and_sent_under_their_canonical_name(
        client, settings, redis_client, eval_folder, path, typed, canonical):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    (settings.data_root / "link_to_held").symlink_to("held")
    typed = typed.replace("ABSOLUTE", str(settings.data_root))
    response = client.post(path, json={"dataset": typed})
    assert response.status_code == 202, response.get_data()
    job = client.get(response.headers["Location"]).get_json()
    assert job["params"]["dataset"] == canonical
    queue = "train"  # training, index and evaluation jobs share the train queue
    args = _queued_args(redis_client, settings, queue, job["job_id"])
    assert args[1]["dataset"] == canonical
    # What the worker does with it: the canonical name resolves to the same folder.
    from shared.datasets import resolve_dataset

    assert resolve_dataset(settings.data_root, canonical) == \
        resolve_dataset(settings.data_root, typed)


def test_evaluation_labels_path_is_recorded_canonical(client, settings, redis_client,
                                                      eval_folder):
    (settings.data_root / "held" / "labels.csv").write_text("path,class\ncat/a.png,tabby\n")
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    response = client.post("/jobs/evaluate", json={
        "dataset": f"{settings.data_root}/held/cat/../",
        "labels": "./held/cat/../labels.csv", "k": 5})
    assert response.status_code == 202, response.get_data()
    job = client.get(response.headers["Location"]).get_json()
    assert job["params"] == {"dataset": "held", "labels": "held/labels.csv", "k": 5}


# --------------------------------------------------------------------------- query strings


def _concrete(template: str) -> str:
    return (template.replace("{job_id}", "0" * 32).replace("{image_id}", "0" * 24)
            .replace("{version}", "v-test"))


DOCUMENTED_OPERATIONS = sorted((path, method) for path, ops in build_spec(False)["paths"].items()
                               for method in ops if path != "/")


@pytest.mark.parametrize(("template", "method"), DOCUMENTED_OPERATIONS)
def test_every_operation_refuses_an_undeclared_query_parameter(client, settings, redis_client,
                                                               template, method):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    response = client.request(method.upper(), _concrete(template) + "?zz_undeclared=1")
    assert response.status_code == 400, response.get_data()
    error = response.get_json()["error"]
    assert (error["code"], error["field"]) == ("invalid_parameter", "zz_undeclared")
    if method in ("post", "delete"):
        assert "request body" in error["message"]
    else:
        assert "accepted:" in error["message"]
    assert client.get("/jobs").get_json()["jobs"] == []
    assert ModelRegistry(redis_client, Keys(settings.key_prefix)).active_version() == "v-test"


@pytest.mark.parametrize("path", ["/jobs/query?k=3", "/jobs/query?probes=2&exact=true"])
def test_post_options_in_the_query_string_are_refused_not_ignored(client, settings,
                                                                  redis_client, path):
    ModelRegistry(redis_client, Keys(settings.key_prefix)).activate("v-test")
    response = client.post(path, data={"image": (io.BytesIO(_png()), "a.png")})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["field"] in ("k", "probes")
    assert error["message"] == (f"{error['field']}: unknown query parameter; POST /jobs/query "
                                "takes no query parameters: its options go in the request body "
                                "(JSON or form fields)")
    assert client.get("/jobs").get_json()["jobs"] == []


@pytest.mark.parametrize(("path", "field", "accepted"), [
    ("/jobs?limt=5", "limt", "cursor, limit, status, type"),
    (f"/jobs/{'0' * 32}?wiat=5", "wiat", "wait"),
    (f"/images/{'0' * 24}?sz=64", "sz", "size"),
    ("/models?active=1", "active", "none"),
])
def test_get_names_what_it_accepts(client, path, field, accepted):
    response = client.get(path)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["field"] == field and error["message"].endswith(f"accepted: {accepted}")
    assert client.client.head(path).status_code == 400  # HEAD is GET without the body


@pytest.mark.parametrize("path", ["/jobs?limit=1&limit=2", f"/images/{'0' * 24}?size=16&size=32"])
def test_a_declared_query_parameter_given_twice_is_400(client, path):
    response = client.get(path)
    assert response.status_code == 400
    assert response.get_json()["error"]["message"].endswith("given more than once")


def test_declared_parameters_and_the_web_page_still_pass(client, store):
    job = store.create(JobType.TRAIN, {})
    assert client.get("/jobs?type=train&status=queued&limit=5&cursor=").status_code == 200
    assert client.get(f"/jobs/{job['job_id']}?wait=0").status_code == 200
    response = client.get("/?utm_source=newsletter")  # browsers add these to page links
    assert response.status_code == 200
    response.close()


def test_a_query_string_without_a_key_is_401_not_400(keyed_app):
    response = keyed_app.test_client().post("/jobs/query?k=3")
    assert response.status_code == 401


# --------------------------------------------------------------------------- OPTIONS


def _every_routed_path(app) -> list[tuple[str, set[str]]]:
    out = []
    for rule in app.url_map.iter_rules():
        path = (rule.rule.replace("<job_id>", "0" * 32).replace("<image_id>", "0" * 24)
                .replace("<version>", "v-test").replace("<path:filename>", "app.js"))
        out.append((path, set(rule.methods)))
    return out


def test_options_is_204_with_allow_and_no_content_type_on_every_route(settings):
    app = create_app(settings)
    client = app.test_client()
    paths = _every_routed_path(app)
    assert len(paths) > 10
    for path, methods in paths:
        response = client.open(path + "?any=thing", method="OPTIONS")
        assert response.status_code == 204, (path, response.status_code)
        assert response.get_data() == b"" and "Content-Type" not in response.headers, path
        allowed = {m.strip() for m in response.headers["Allow"].split(",")}
        assert methods <= allowed, (path, allowed)


def test_options_of_an_unknown_route_is_404_json(client):
    response = client.client.open("/nope", method="OPTIONS")
    assert response.status_code == 404 and response.is_json


def test_options_needs_a_key_where_the_route_does(keyed_app):
    client = keyed_app.test_client()
    refused = client.open("/jobs", method="OPTIONS")
    assert refused.status_code == 401 and refused.is_json
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    keyed = client.open("/jobs", method="OPTIONS", headers={"Authorization": "Bearer alpha-key"})
    assert keyed.status_code == 204 and keyed.headers["Allow"] == "GET, HEAD, OPTIONS"
    for public in ("/healthz", "/readyz", "/", "/static/app.js"):
        assert client.open(public, method="OPTIONS").status_code == 204, public
