"""End to end on real parts: gunicorn API, two Celery worker processes, real Redis, real photos."""

from __future__ import annotations

import io
import threading
import time
import uuid

import pytest
import requests
from PIL import Image, ImageOps

from tests.integration.harness import copy_animals, service_stack, wait_for_job

pytestmark = pytest.mark.integration
PER_CLASS = 12


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("data")
    subset = root / "animals_subset"
    copy_animals(subset, PER_CLASS)
    (root / "empty_folder").mkdir()
    (root / "text_only").mkdir()
    (root / "text_only" / "notes.txt").write_text("not an image")
    with service_stack(redis_url, root, tmp_path_factory.mktemp("artifacts"),
                       tmp_path_factory.mktemp("logs"), workers=2) as stack:
        yield {"base": stack.base, "root": root, "subset": subset, "prefix": stack.prefix,
               "redis": stack.redis, "procs": stack.procs}


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _query(base: str, data: bytes, k: int = 10, name: str = "q.jpg") -> dict:
    response = requests.post(f"{base}/jobs/query", files={"image": (name, data)},
                             data={"k": str(k)}, timeout=10)
    assert response.status_code == 202, response.text
    job = wait_for_job(base, response.json()["job_id"], timeout=60)
    assert job["status"] == "succeeded", job
    return job["result"]


def _train(base: str, dataset: str, **params) -> tuple[dict, list]:
    response = requests.post(f"{base}/jobs/train", json={"dataset": dataset, **params}, timeout=10)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == body["status_url"] == f"/jobs/{body['job_id']}"
    seen = [body["status"]]
    job = wait_for_job(base, body["job_id"], timeout=240, seen=seen)
    return job, seen


@pytest.fixture(scope="module")
def trained(service):
    job, seen = _train(service["base"], "animals_subset", epochs=2)
    assert job["status"] == "succeeded", job
    return {"job": job, "seen": seen}


def test_health_and_nothing_to_query_before_training(service):
    base = service["base"]
    assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["checks"]["workers"] >= 2
    assert ready.json()["checks"]["active_model"] is None
    data = (service["subset"] / "cat").iterdir().__next__().read_bytes()
    response = requests.post(f"{base}/jobs/query", files={"image": ("a.jpg", data)}, timeout=10)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_active_model"


@pytest.mark.parametrize(
    ("dataset", "code"),
    [
        ("/etc", "dataset_outside_data_root"),
        ("../../etc", "dataset_outside_data_root"),
        ("does_not_exist", "dataset_not_found"),
        ("empty_folder", "no_readable_images"),
        ("text_only", "no_readable_images"),
        ("text_only/notes.txt", "dataset_not_a_folder"),
        ("", "invalid_parameter"),
    ],
)
def test_train_rejects_bad_folders_without_enqueueing(service, dataset, code):
    client, prefix = service["redis"], service["prefix"]
    jobs_before = client.zcard(f"{prefix}:jobs")
    response = requests.post(f"{service['base']}/jobs/train", json={"dataset": dataset}, timeout=10)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == code
    assert client.zcard(f"{prefix}:jobs") == jobs_before
    assert client.llen(f"{prefix}.train") == 0


@pytest.mark.parametrize("body", [None, [], {"dataset": "animals_subset", "epochs": 0},
                                  {"dataset": "animals_subset", "image_size": 50},
                                  {"dataset": "animals_subset", "bogus": 1}])
def test_train_rejects_bad_parameters(service, body):
    response = requests.post(f"{service['base']}/jobs/train", json=body, timeout=10)
    assert response.status_code == 400
    assert "error" in response.json()


def test_training_runs_through_every_status_and_reports(trained):
    job, seen = trained["job"], trained["seen"]
    assert seen[0] == "queued" and seen[-1] == "succeeded"
    assert "running" in seen or len(seen) == 2  # a fast job may finish between two polls
    result = job["result"]
    assert result["images_indexed"] == 3 * PER_CLASS
    assert len(result["history"]) == 2
    assert all(e["train_loss"] > 0 and e["val_loss"] > 0 for e in result["history"])
    assert set(result["timings"]) >= {"scan_decode_s", "train_s", "embed_s", "index_s"}
    assert job["started_at"] and job["finished_at"] and job["created_at"]
    assert job["progress"]["phase"] == "done"
    assert job["error"] is None


def test_query_an_indexed_image_finds_itself_first(service, trained):
    path = sorted((service["subset"] / "dog").iterdir())[3]
    result = _query(service["base"], path.read_bytes())
    hits = result["hits"]
    assert len(hits) == 10
    assert hits[0]["path"] == f"dog/{path.name}"
    assert hits[0]["distance"] < 1e-2
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert len({h["image_id"] for h in hits}) == 10
    assert result["model_version"] == trained["job"]["result"]["version"]
    assert result["search"]["method"] in {"exact", "lsh", "exact_fallback"}


@pytest.mark.parametrize("transform", ["mirror", "half_size", "double_size"])
def test_query_transformed_copy_finds_original_in_top3(service, trained, transform):
    path = sorted((service["subset"] / "panda").iterdir())[5]
    image = Image.open(path).convert("RGB")
    if transform == "mirror":
        image = ImageOps.mirror(image)
    elif transform == "half_size":
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    else:
        image = image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC)
    hits = _query(service["base"], _png_bytes(image), k=5)["hits"]
    assert f"panda/{path.name}" in [h["path"] for h in hits[:3]]


def test_indexed_image_is_served(service, trained):
    path = sorted((service["subset"] / "cat").iterdir())[0]
    hit = _query(service["base"], path.read_bytes(), k=1)["hits"][0]
    response = requests.get(f"{service['base']}/images/{hit['image_id']}", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.content == path.read_bytes()
    missing = requests.get(f"{service['base']}/images/{'0' * 24}", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "image_not_found"


@pytest.mark.parametrize("job_id", [uuid.uuid4().hex, "not-a-job", "0" * 32])
def test_unknown_job_is_404_json(service, job_id):
    response = requests.get(f"{service['base']}/jobs/{job_id}", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


@pytest.mark.parametrize(
    ("files", "form", "status", "code"),
    [
        ({"image": ("x.jpg", b"<html>not an image</html>")}, {}, 400, "not_an_image"),
        ({"image": ("x.jpg", b"")}, {}, 400, "empty_file"),
        ({"other": ("x.jpg", b"abc")}, {}, 400, "missing_image"),
        (None, {}, 400, "missing_image"),
        ({"image": ("x.jpg", "GOOD")}, {"k": "0"}, 400, "invalid_parameter"),
        ({"image": ("x.jpg", "GOOD")}, {"k": "abc"}, 400, "invalid_parameter"),
    ],
)
def test_bad_query_uploads_get_json_4xx(service, trained, files, form, status, code):
    good = sorted((service["subset"] / "cat").iterdir())[1].read_bytes()
    if files:
        files = {k: (v[0], good if v[1] == "GOOD" else v[1]) for k, v in files.items()}
    response = requests.post(f"{service['base']}/jobs/query", files=files, data=form, timeout=10)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_ready_after_training(service, trained):
    ready = requests.get(f"{service['base']}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["checks"]["active_model"] == trained["job"]["result"]["version"]


def test_two_worker_processes_return_the_same_hits(service, trained):
    data = sorted((service["subset"] / "cat").iterdir())[7].read_bytes()
    base = service["base"]
    job_ids = []
    for _ in range(10):
        response = requests.post(f"{base}/jobs/query", files={"image": ("q.jpg", data)}, timeout=10)
        job_ids.append(response.json()["job_id"])
    results = [wait_for_job(base, job_id, timeout=60)["result"] for job_id in job_ids]
    servers = {(r["served_by"]["host"], r["served_by"]["pid"]) for r in results}
    assert len(servers) >= 2, "both worker processes should have served queries"
    first = [(h["image_id"], h["distance"]) for h in results[0]["hits"]]
    for result in results[1:]:
        assert [h["image_id"] for h in result["hits"]] == [i for i, _ in first]
        for hit, (_, distance) in zip(result["hits"], first, strict=True):
            assert hit["distance"] == pytest.approx(distance, abs=1e-4)


def test_second_training_swaps_version_while_queries_keep_succeeding(service, trained):
    base = service["base"]
    old_version = trained["job"]["result"]["version"]
    data = sorted((service["subset"] / "dog").iterdir())[0].read_bytes()
    outcomes: list[tuple[str, str | None]] = []
    stop = threading.Event()

    def query_loop():
        while not stop.is_set():
            response = requests.post(f"{base}/jobs/query", files={"image": ("q.jpg", data)},
                                     timeout=10)
            if response.status_code != 202:
                outcomes.append((f"http {response.status_code}", None))
                continue
            job = wait_for_job(base, response.json()["job_id"], timeout=120)
            version = (job.get("result") or {}).get("model_version")
            outcomes.append((job["status"], version))

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        job, _ = _train(base, "animals_subset", epochs=1, seed=7)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                v == job["result"]["version"] for _, v in outcomes):
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=150)
    assert job["status"] == "succeeded", job
    new_version = job["result"]["version"]
    assert new_version != old_version
    assert job["result"]["previous_version"] == old_version
    assert outcomes, "the query loop ran no query"
    assert all(status == "succeeded" for status, _ in outcomes), outcomes
    versions = [v for _, v in outcomes]
    assert old_version in versions and new_version in versions
    # Once the new version answered, the old one never answers again.
    assert old_version not in versions[versions.index(new_version):]


def test_waiting_long_polls_never_stall_other_requests(service):
    # A job that stays queued (recorded, never enqueued), watched by more long-polls than the
    # two gunicorn processes have threads for them (gunicorn.conf.py, IMGSIM_MAX_LONG_POLLS).
    from shared.jobs import JobStore, JobType
    from shared.keys import Keys

    store = JobStore(service["redis"], Keys(service["prefix"]), 600)
    job_id = store.create(JobType.TRAIN, {"dataset": "never"})["job_id"]
    url = f"{service['base']}/jobs/{job_id}?wait=6"
    answers: list[requests.Response] = []
    watchers = [threading.Thread(target=lambda: answers.append(requests.get(url, timeout=20)))
                for _ in range(24)]
    for thread in watchers:
        thread.start()
    time.sleep(1.0)
    for path in ("/healthz", "/models", f"/jobs/{job_id}"):
        started = time.monotonic()
        assert requests.get(service["base"] + path, timeout=10).status_code == 200
        assert time.monotonic() - started < 1.0, path
    store.request_cancel(job_id)  # ends the job: every held long-poll answers
    for thread in watchers:
        thread.join(timeout=20)
    assert len(answers) == 24 and all(a.status_code == 200 for a in answers)
    declined = [a for a in answers if "Retry-After" in a.headers]
    assert 0 < len(declined) < 24  # some held (up to 8 per process), the rest answered at once


def test_workers_load_a_new_version_before_its_first_query(service, trained):
    # Each worker process loads the active version in the background as soon as it is
    # activated: once a moment has passed, no query pays for loading (~100+ ms otherwise).
    job, _ = _train(service["base"], "animals_subset", epochs=1, seed=11)
    assert job["status"] == "succeeded", job
    time.sleep(2.5)
    data = sorted((service["subset"] / "dog").iterdir())[1].read_bytes()
    results = [_query(service["base"], data) for _ in range(6)]
    assert all(r["model_version"] == job["result"]["version"] for r in results)
    assert max(r["timings_ms"]["load_ms"] for r in results) < 20, \
        [r["timings_ms"] for r in results]
