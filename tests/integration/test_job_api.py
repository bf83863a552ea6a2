"""Every hostile input and the job lifecycle, end to end: gunicorn, real Celery workers, Redis.

One training over a copy of the messy training folder (TRAIN_FOLDER.tsv, with its runtime-made
cases) plus every MANIFEST.tsv file; then each MANIFEST file uploaded as a query, the
RUNTIME_CASES.tsv situations, cancel (queued and running), redelivery after a lost worker,
long-poll and listing. Every HTTP answer is checked against the served OpenAPI document.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

import tests.test_datasets as train_manifest
import tests.test_images as image_manifest
from api import MAX_FORM_MEMORY_BYTES
from tests.conftest import FIXTURES, delete_prefix
from tests.fixture_folders import build_messy_training_folder
from tests.integration.harness import Processes, free_port, wait_for_http, wait_for_workers
from tests.openapi_check import Conformance

pytestmark = pytest.mark.integration
MAX_UPLOAD = 1024 * 1024
MANIFEST_DIR = "zz_manifest"  # scanned last: duplicates of train_folder files are skipped here
FINAL = {"succeeded", "failed", "canceled"}
TRAIN = {"dataset": "messy", "epochs": 2, "image_size": 32, "batch_size": 16}


def _rows(name: str) -> list[dict[str, str]]:
    with (FIXTURES / name).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


IMAGE_ROWS = image_manifest.ROWS
TRAIN_ROWS = train_manifest.ROWS
RUNTIME_ROWS = _rows("RUNTIME_CASES.tsv")


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


class Api:
    """HTTP against the live API; every answer is validated against /openapi.json."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()
        self.conformance = Conformance(self.session.get(f"{base}/openapi.json", timeout=10).json())

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 40)
        response = self.session.request(method, self.base + path, **kwargs)
        self.conformance.check_requests(response)
        return response

    def wait(self, job_id: str, timeout: float = 240) -> dict:
        """Long-poll a job until it ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GET", f"/jobs/{job_id}?wait=10").json()
            if job["status"] in FINAL:
                return job
        raise TimeoutError(f"job {job_id} did not end within {timeout}s")

    def query(self, data: bytes, name: str = "q.jpg", k: int = 10) -> dict:
        response = self.call("POST", "/jobs/query", files={"image": (name, data)},
                             data={"k": str(k)})
        assert response.status_code == 202, response.text
        return self.wait(response.json()["job_id"], timeout=60)

    def train(self, **params) -> str:
        response = self.call("POST", "/jobs/train", json={**TRAIN, **params})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("data")
    messy = build_messy_training_folder(FIXTURES / "train_folder", root / "messy")
    (messy / MANIFEST_DIR).mkdir()
    for row in IMAGE_ROWS:
        shutil.copy(FIXTURES / row["file"], messy / MANIFEST_DIR / row["file"])
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(FIXTURES / "control_rgb.jpg", outside / "a.jpg")
    shutil.copy(FIXTURES / "control_rgb.png", outside / "b.png")
    os.symlink(outside, root / "escape")
    prefix = f"imgsimtest{uuid.uuid4().hex[:8]}"
    artifacts = tmp_path_factory.mktemp("artifacts")
    env = {
        "IMGSIM_REDIS_URL": redis_url, "IMGSIM_KEY_PREFIX": prefix,
        "IMGSIM_DATA_ROOT": str(root), "IMGSIM_ARTIFACTS_DIR": str(artifacts),
        "IMGSIM_TORCH_THREADS": "1", "IMGSIM_TRAIN_THREADS": "1",
        "IMGSIM_WORKER_CONCURRENCY": "1", "IMGSIM_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        # Queries go through the LSH tables in Redis even for this small collection.
        "IMGSIM_LSH_MIN_ROWS": "0",
    }
    procs = Processes(env, tmp_path_factory.mktemp("logs"))
    client = redis.Redis.from_url(redis_url)
    port = free_port()
    try:
        # One process per queue: a running training never delays queries, and a second
        # training waits in the queue behind the first (what the cancel test needs).
        procs.start_worker("wtrain", queues=f"{prefix}.train")
        procs.start_worker("wquery", queues=f"{prefix}.query")
        procs.start_api(port)
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz")
        wait_for_workers(client, prefix, 2)
        yield {"api": Api(base), "root": root, "messy": messy, "prefix": prefix,
               "redis": client, "procs": procs, "artifacts": artifacts}
    except BaseException:
        print(procs.log("wtrain"), procs.log("wquery"), procs.log("api"))
        raise
    finally:
        procs.stop_all()
        delete_prefix(client, prefix)


@pytest.fixture(scope="module")
def trained(stack):
    api = stack["api"]
    job = api.wait(api.train())
    assert job["status"] == "succeeded", job
    version = job["result"]["version"]
    images = json.loads((stack["artifacts"] / version / "images.json").read_text())
    return {"job": job, "version": version, "images": images,
            "indexed": {entry["path"]: entry["image_id"] for entry in images},
            "skipped": {entry["path"]: entry["reason"] for entry in job["result"]["skipped"]}}


def active_version(stack) -> str | None:
    value = stack["redis"].get(f"{stack['prefix']}:active_model")
    return value.decode() if value else None


def assert_undisturbed(stack, version: str) -> None:
    """The workers are up, the active model unchanged and a control query still succeeds."""
    for name in ("wtrain", "wquery", "api"):
        assert stack["procs"].procs[name].poll() is None, f"{name} died"
    assert active_version(stack) == version
    control = (FIXTURES / "control_rgb.jpg").read_bytes()
    job = stack["api"].query(control, "control.jpg", k=3)
    assert job["status"] == "succeeded", job
    assert job["result"]["model_version"] == version
    assert job["result"]["hits"][0]["image_id"] == image_id(control)


# --------------------------------------------------------------------------- training scan


def test_messy_training_succeeds_and_reports_every_skip(trained):
    result = trained["job"]["result"]
    assert result["images_indexed"] == len(trained["images"])
    assert result["skipped_count"] == len(result["skipped"])
    assert all(entry["reason"] for entry in result["skipped"])
    paths = [entry["path"] for entry in trained["images"]]
    assert len(paths) == len(set(paths))
    assert len(set(trained["indexed"].values())) == len(paths), "an image was indexed twice"
    assert not any("loop_to_train_folder/" in p for p in paths)
    json.dumps(result).encode("utf-8")  # report is JSON and UTF-8 clean (Latin-1 name included)


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=[r["file"] for r in TRAIN_ROWS])
def test_training_folder_row_gets_its_documented_scan_behaviour(trained, row):
    rel = row["file"].removeprefix("train_folder/").rstrip("/")
    text = row["expected_behaviour"]
    indexed, skipped = trained["indexed"], trained["skipped"]
    if "\\x" in rel:  # the Latin-1 name: included, or skipped with its reason
        assert skipped.get(rel) == "undecodable file name", skipped
    elif text.startswith("training scan includes it"):
        assert rel in indexed, f"{rel} not indexed; skipped: {skipped.get(rel)}"
    elif text.startswith("training scan skips it"):
        # A file inside a skipped (hidden) folder is covered by the folder's own entry.
        parts = rel.split("/")
        reasons = [skipped.get("/".join(parts[:i])) for i in range(len(parts), 0, -1)]
        assert any(reasons), f"{rel} should be skipped with a reason: {sorted(skipped)}"
        assert rel not in indexed
    elif text.startswith("not opened as a file"):
        assert rel not in indexed and rel not in skipped
        assert any(path.startswith(rel + "/") for path in indexed)
    elif text.startswith("scan terminates quickly"):
        assert skipped.get(rel) == "directory symlink not followed"
    elif text.startswith("counted once"):
        assert skipped.get(rel) == "duplicate of dogs/dog_01.png"
        assert "dogs/dog_01.png" in indexed
    elif text.startswith("ignored with a warning"):
        assert skipped.get(rel) == "empty folder"
    else:
        pytest.fail(f"no expectation for {rel}: {text}")


@pytest.mark.parametrize("row", IMAGE_ROWS, ids=[r["file"] for r in IMAGE_ROWS])
def test_manifest_file_in_a_training_folder_is_indexed_or_skipped_with_a_reason(trained, row):
    rel = f"{MANIFEST_DIR}/{row['file']}"
    expectation = image_manifest._expectation(row)
    indexed, skipped = trained["indexed"], trained["skipped"]
    data = (FIXTURES / row["file"]).read_bytes()
    if expectation == "accepted":
        if rel not in indexed:  # byte-identical to a file indexed earlier: deduplicated
            reason = skipped.get(rel, "")
            assert reason.startswith("duplicate of "), (rel, reason)
            assert indexed[reason.removeprefix("duplicate of ")] == image_id(data)
    else:
        assert rel not in indexed
        reason = skipped.get(rel, "")
        assert reason, f"{rel} should be skipped with a reason"
        if expectation == "heic_unsupported":
            assert "heic" in reason


# --------------------------------------------------------------------------- queries


@pytest.mark.parametrize("row", IMAGE_ROWS, ids=[r["file"] for r in IMAGE_ROWS])
def test_manifest_file_uploaded_as_a_query_gets_its_documented_answer(stack, trained, row):
    api, name = stack["api"], row["file"]
    data = (FIXTURES / name).read_bytes()
    expectation = image_manifest._expectation(row)
    jobs_before = stack["redis"].zcard(f"{stack['prefix']}:jobs")
    response = api.call("POST", "/jobs/query", files={"image": (name, data)}, data={"k": "20"})
    assert response.status_code < 500, response.text
    if expectation == "accepted":
        assert response.status_code == 202, response.text
        job = api.wait(response.json()["job_id"], timeout=60)
        assert job["status"] == "succeeded", job
        hits = {hit["image_id"]: hit["distance"] for hit in job["result"]["hits"]}
        assert hits.get(image_id(data), 1.0) < 1e-3, (name, job["result"]["hits"][:3])
        assert len(hits) == len(job["result"]["hits"]), "an image listed twice"
    else:
        error = response.json()["error"]
        if expectation == "heic_unsupported":
            assert (response.status_code, error["code"]) == (415, "unsupported_format")
            assert "heic" in error["message"]
        else:
            assert (error["code"], response.status_code) == image_manifest.REJECTED[name]
        assert stack["redis"].zcard(f"{stack['prefix']}:jobs") == jobs_before
    assert_undisturbed(stack, trained["version"])


# --------------------------------------------------------------------------- RUNTIME_CASES


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _torch_only_in_children(stack, trained):
    assert_undisturbed(stack, trained["version"])  # a query ran in a prefork child
    parent = stack["procs"].procs["wquery"].pid
    children = _children(parent)
    assert children, "the prefork pool has no child"
    assert "libtorch" not in _maps(parent), "torch (and so CUDA) loaded in the Celery parent"
    assert any("libtorch" in _maps(child) for child in children)


def _results_are_json(stack, trained):
    job = stack["api"].query((FIXTURES / "control_rgb.png").read_bytes(), "c.png")
    assert all(type(hit["distance"]) is float for hit in job["result"]["hits"])
    for job_id in (job["job_id"], trained["job"]["job_id"]):
        assert stack["redis"].exists(f"celery-task-meta-{job_id}") == 0
    for name in ("wtrain", "wquery"):
        log = stack["procs"].log(name)
        assert "EncodeError" not in log and "not JSON serializable" not in log


def _results_are_small(stack, trained):
    assert len(json.dumps(trained["job"]["result"])) < 256 * 1024
    assert not (stack["artifacts"] / trained["version"] / "embeddings.npy").is_symlink()
    assert stack["redis"].exists(f"celery-task-meta-{trained['job']['job_id']}") == 0


def _upload_travels_by_key(stack, trained):
    data = (FIXTURES / "control_rgb.jpg").read_bytes()
    job = stack["api"].query(data)
    assert job["params"] == {"k": 10, "bytes": len(data)}
    assert stack["redis"].exists(f"{stack['prefix']}:upload:{job['job_id']}") == 0
    # The broker message itself: tests/integration/test_api_fuzz.py inspects it in the queue.


def _redis_index_answers(stack, trained):
    job = stack["api"].query((FIXTURES / "dup_a.jpg").read_bytes(), k=5)
    assert job["status"] == "succeeded" and len(job["result"]["hits"]) == 5
    assert job["result"]["search"]["method"] in {"lsh", "exact_fallback"}


def _tables_in_one_database(stack, trained):
    namespace = f"{stack['prefix']}:{{{trained['version']}}}"
    tables = {key.decode()[len(namespace) + 1:].split(":")[0]
              for key in stack["redis"].scan_iter(match=f"{namespace}:t*")}
    lsh = trained["job"]["result"]["lsh"]
    assert tables == {f"t{i}" for i in range(lsh["num_tables"])}


def _row_zero_round_trips(stack, trained):
    first = trained["images"][0]
    data = (stack["messy"] / first["path"]).read_bytes()
    hits = stack["api"].query(data, k=5)["result"]["hits"]
    assert first["image_id"] in {h["image_id"] for h in hits if h["distance"] < 1e-3}


def _short_buckets_still_answer(stack, trained):
    job = stack["api"].query((FIXTURES / "control_rgb.jpg").read_bytes(), k=100)
    assert job["status"] == "succeeded"
    assert len(job["result"]["hits"]) == min(100, len(trained["images"]))


def _oversized_uploads_are_413_json(stack, trained):
    api = stack["api"]
    big = b"\xff\xd8\xff" + os.urandom(MAX_UPLOAD + 200 * 1024)
    response = api.call("POST", "/jobs/query", files={"image": ("big.jpg", big)})
    assert response.status_code == 413
    assert "upload limit" in response.json()["error"]["message"]
    just_over = b"\xff\xd8\xff" + os.urandom(MAX_UPLOAD)
    response = api.call("POST", "/jobs/query", files={"image": ("big.jpg", just_over)})
    assert response.status_code == 413
    assert f"{MAX_UPLOAD:,}" in response.json()["error"]["message"]
    # A real photo far above Werkzeug's form memory limit but under the cap is accepted.
    noise = np.random.default_rng(1).integers(0, 255, (480, 480, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "PNG")
    assert MAX_FORM_MEMORY_BYTES < len(out.getvalue()) < MAX_UPLOAD
    assert api.query(out.getvalue(), "noise.png")["status"] == "succeeded"
    field = api.call("POST", "/jobs/query",
                     files={"image": ("a.jpg", (FIXTURES / "control_rgb.jpg").read_bytes())},
                     data={"k": "9" * (MAX_FORM_MEMORY_BYTES + 10)})
    assert field.status_code == 413 and "form field" in field.json()["error"]["message"]
    assert_undisturbed(stack, trained["version"])


def _client_file_names_are_never_paths(stack, trained):
    api = stack["api"]
    data = (FIXTURES / "control_rgb.jpg").read_bytes()
    for name in ("../../etc/evil.jpg", "/etc/passwd", "фото.jpg", "a\\..\\b.jpg"):
        assert api.query(data, name=name)["status"] == "succeeded"
    assert not (stack["root"].parent / "etc" / "evil.jpg").exists()
    empty = api.call("POST", "/jobs/query", files={"image": ("", data)})
    assert empty.status_code == 400 and empty.json()["error"]["message"].startswith("no file")


RUNTIME_CHECKS = {
    "torch inference inside a Celery prefork worker": _torch_only_in_children,
    "CUDA touched in the Celery parent": _torch_only_in_children,
    "task returns numpy arrays": _results_are_json,
    "returns a very large result": _results_are_small,
    "Flask passes the uploaded image bytes": _upload_travels_by_key,
    "RedisStorage returns bytes": _redis_index_answers,
    "puts hash table i into Redis DB number i": _tables_in_one_database,
    "index(extra_data=0)": _row_zero_round_trips,
    "LSH query returns an empty list": _short_buckets_still_answer,
    "upload bigger than MAX_CONTENT_LENGTH": _oversized_uploads_are_413_json,
    "multipart upload whose filename header": _client_file_names_are_never_paths,
}


@pytest.mark.parametrize("row", RUNTIME_ROWS, ids=[r["case"][:40] for r in RUNTIME_ROWS])
def test_runtime_case_holds(stack, trained, row):
    checks = [check for key, check in RUNTIME_CHECKS.items() if key in row["case"]]
    assert len(checks) == 1, f"map this RUNTIME_CASES row to one check: {row['case']}"
    checks[0](stack, trained)


# --------------------------------------------------------------------------- folders


@pytest.mark.parametrize(("dataset", "code"), [
    ("escape", "dataset_outside_data_root"),
    ("escape/", "dataset_outside_data_root"),
    ("messy/../escape", "dataset_outside_data_root"),
    ("messy/../../", "dataset_outside_data_root"),
    ("messy/cats/cat_01.jpg", "dataset_not_a_folder"),
    ("messy/empty_class", "no_readable_images"),
    ("messy/\x00", "invalid_dataset"),
])
def test_training_folders_must_resolve_inside_the_data_root(stack, dataset, code):
    response = stack["api"].call("POST", "/jobs/train", json={"dataset": dataset})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


# --------------------------------------------------------------------------- lifecycle


def test_long_poll_answers_when_the_job_ends(stack, trained):
    api = stack["api"]
    response = api.call("POST", "/jobs/query",
                        files={"image": ("q.png", (FIXTURES / "gray_L.png").read_bytes())})
    started = time.monotonic()
    job = api.call("GET", f"{response.headers['Location']}?wait=20").json()
    elapsed = time.monotonic() - started
    assert job["status"] == "succeeded" and elapsed < 10, (job["status"], elapsed)
    again = time.monotonic()
    assert api.call("GET", f"/jobs/{job['job_id']}?wait=20").json()["status"] == "succeeded"
    assert time.monotonic() - again < 1.0  # a finished job answers at once


def test_cancel_queued_and_running_training_keeps_the_previous_model(stack, trained):
    api, client, prefix = stack["api"], stack["redis"], stack["prefix"]
    version = trained["version"]
    artifacts_before = sorted(p.name for p in stack["artifacts"].iterdir())
    keys_before = {k for k in client.scan_iter(match=f"{prefix}:{{*")}
    long_job = api.train(epochs=500, batch_size=2, patience=100)
    deadline = time.monotonic() + 120
    while api.call("GET", f"/jobs/{long_job}").json()["progress"].get("phase") != "train":
        assert time.monotonic() < deadline, "the long training never reached its training phase"
        time.sleep(0.1)
    queued_job = api.train()
    assert api.call("GET", f"/jobs/{queued_job}").json()["status"] == "queued"
    canceled = api.call("POST", f"/jobs/{queued_job}/cancel")
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"

    asked = time.monotonic()
    running = api.call("POST", f"/jobs/{long_job}/cancel")
    assert running.status_code == 202
    assert running.json()["status"] == "running" and running.json()["cancel_requested"]
    job = api.wait(long_job, timeout=60)
    stopped_after = time.monotonic() - asked
    assert job["status"] == "canceled" and job["error"]["code"] == "canceled", job
    assert stopped_after < 10, stopped_after
    print(f"running training stopped {stopped_after:.2f}s after the cancel request")

    # The queued message reaches the worker, which must not run it.
    deadline = time.monotonic() + 30
    while client.llen(f"{prefix}.train") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    queued = api.call("GET", f"/jobs/{queued_job}").json()
    assert queued["status"] == "canceled" and queued["started_at"] is None, queued
    assert active_version(stack) == version
    assert sorted(p.name for p in stack["artifacts"].iterdir()) == artifacts_before
    assert {k for k in client.scan_iter(match=f"{prefix}:{{*")} == keys_before
    for job_id in (long_job, queued_job):
        again = api.call("POST", f"/jobs/{job_id}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert_undisturbed(stack, version)


def test_cancel_a_finished_job_is_409(stack, trained):
    response = stack["api"].call("POST", f"/jobs/{trained['job']['job_id']}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_finished"


def test_jobs_are_listed_newest_first_and_filtered(stack, trained):
    api = stack["api"]
    everything = api.call("GET", "/jobs?limit=100").json()["jobs"]
    created = [job["created_at"] for job in everything]
    assert created == sorted(created, reverse=True)
    trains = api.call("GET", "/jobs?type=train&limit=100").json()["jobs"]
    assert trains and all(job["type"] == "train" for job in trains)
    assert trained["job"]["job_id"] in {job["job_id"] for job in trains}
    succeeded = api.call("GET", "/jobs?type=train&status=succeeded").json()["jobs"]
    assert all(job["status"] == "succeeded" for job in succeeded)
    page = api.call("GET", "/jobs?limit=2").json()
    following = api.call("GET", f"/jobs?limit=2&cursor={page['next_cursor']}").json()
    assert [j["job_id"] for j in page["jobs"] + following["jobs"]] == \
        [j["job_id"] for j in everything[:4]]


def test_redelivered_training_after_a_lost_worker_indexes_once(stack, trained):
    api, client, prefix = stack["api"], stack["redis"], stack["prefix"]
    versions_before = {v.decode() for v in client.zrange(f"{prefix}:models", 0, -1)}
    job_id = api.train(epochs=6, batch_size=2, patience=100, seed=3)
    deadline = time.monotonic() + 120
    while api.call("GET", f"/jobs/{job_id}").json()["progress"].get("phase") != "train":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    children = _children(stack["procs"].procs["wtrain"].pid)
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)  # the worker process is lost mid-training
    job = api.wait(job_id, timeout=240)
    assert job["status"] == "succeeded", job
    log = stack["procs"].log("wtrain")
    assert "WorkerLostError" in log or "SIGKILL" in log, log[-2000:]
    versions_after = {v.decode() for v in client.zrange(f"{prefix}:models", 0, -1)}
    assert versions_after - versions_before == {job["result"]["version"]}
    namespaces = {key.decode().split("{")[1].split("}")[0]
                  for key in client.scan_iter(match=f"{prefix}:{{*")}
    assert namespaces <= versions_after, "a half-written version was left in Redis"
    assert not [p for p in stack["artifacts"].iterdir() if p.name.startswith(".partial-")]
    assert active_version(stack) == job["result"]["version"]


def test_a_refused_oversized_body_leaves_the_connection_usable(stack, trained):
    # 413 is decided from Content-Length before the body is read; the server reads the rest
    # before answering, so the next request on the same keep-alive connection is parsed from
    # its own bytes (without that, half of these follow-up requests failed: connection reset).
    session = requests.Session()
    base = stack["api"].base
    big = b"\xff\xd8\xff" + os.urandom(MAX_UPLOAD + 200 * 1024)
    control = (FIXTURES / "control_rgb.jpg").read_bytes()
    for _ in range(10):
        refused = session.post(f"{base}/jobs/query", files={"image": ("big.jpg", big)},
                               timeout=40)
        assert refused.status_code == 413
        accepted = session.post(f"{base}/jobs/query", files={"image": ("c.jpg", control)},
                                timeout=40)
        assert accepted.status_code == 202, accepted.text
