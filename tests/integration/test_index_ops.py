"""Index operations end to end: add, dedupe, delete, query by id, batch, version swap + clean-up."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import requests

from tests.conftest import DATASETS, FIXTURES
from tests.integration.harness import copy_animals, service_stack, wait_for_job

pytestmark = pytest.mark.integration
PER_CLASS = 10
GRACE_S = 3


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("data")
    base_copies = copy_animals(root / "base", PER_CLASS)
    copy_animals(root / "extra", 3, start=PER_CLASS)
    shutil.copy(base_copies["panda"][0], root / "extra" / "same_bytes_as_indexed.jpg")
    shutil.copy(FIXTURES / "not_an_image.jpg", root / "extra" / "broken.jpg")
    shutil.copy(FIXTURES / "truncated_half.jpg", root / "extra" / "truncated.jpg")
    with service_stack(redis_url, root, tmp_path_factory.mktemp("artifacts"),
                       tmp_path_factory.mktemp("logs"), workers=2,
                       env={"IMGSIM_VERSION_GRACE_S": str(GRACE_S)}) as stack:
        job = _finish(stack.base, requests.post(f"{stack.base}/jobs/train",
                                                json={"dataset": "base", "epochs": 2},
                                                timeout=10))
        assert job["status"] == "succeeded", job
        yield {"base": stack.base, "root": root, "redis": stack.redis, "prefix": stack.prefix,
               "version": job["result"]["version"], "procs": stack.procs}


def _finish(base: str, response: requests.Response, timeout: float = 240) -> dict:
    assert response.status_code == 202, response.text
    return wait_for_job(base, response.json()["job_id"], timeout=timeout)


def _ok(base: str, response: requests.Response) -> dict:
    job = _finish(base, response)
    assert job["status"] == "succeeded", job
    return job["result"]


def _query_file(base: str, data: bytes, **form) -> dict:
    return _ok(base, requests.post(f"{base}/jobs/query", files={"image": ("q.jpg", data)},
                                   data={"k": "10", **form}, timeout=10))


@pytest.fixture(scope="module")
def folder_added(service):
    base = service["base"]
    result = _ok(base, requests.post(f"{base}/jobs/index", json={"dataset": "extra"}, timeout=10))
    return result


def test_index_folder_adds_new_images_skips_known_content_and_lists_failures(service,
                                                                            folder_added):
    result = folder_added
    assert result["version"] == service["version"]
    assert len(result["added"]) == 9
    listing = requests.get(f"{service['base']}/models", timeout=10).json()
    (model,) = [m for m in listing["models"] if m["version"] == service["version"]]
    assert model["trained_images"] == 3 * PER_CLASS
    assert model["images"] >= 3 * PER_CLASS + 9  # what queries search (uploads may add more)
    assert {a["path"].split("/")[0] for a in result["added"]} == {"cat", "dog", "panda"}
    skipped = {s["path"]: s for s in result["skipped"]}
    assert skipped["same_bytes_as_indexed.jpg"]["reason"] == "already indexed"
    assert len(skipped["same_bytes_as_indexed.jpg"]["image_id"]) == 24
    failed = {f["path"]: f["reason"] for f in result["failed"]}
    assert set(failed) == {"broken.jpg", "truncated.jpg"}
    assert result["rows"] == 3 * PER_CLASS + 9


def test_added_image_is_found_and_served_by_every_worker(service, folder_added):
    base = service["base"]
    added = next(a for a in folder_added["added"] if a["path"].startswith("dog/"))
    data = (service["root"] / "extra" / added["path"]).read_bytes()
    servers = set()
    for _ in range(6):
        result = _query_file(base, data)
        assert result["hits"][0]["image_id"] == added["image_id"]
        assert result["hits"][0]["distance"] < 1e-2
        assert result["search"]["indexed"] == 3 * PER_CLASS + 9
        servers.add(result["served_by"]["pid"])
    assert len(servers) == 2  # the worker that did not add the rows picked them up too
    served = requests.get(f"{base}/images/{added['image_id']}", timeout=5)
    assert served.status_code == 200 and served.content == data


def test_indexing_the_same_folder_again_adds_nothing(service, folder_added):
    base = service["base"]
    again = _ok(base, requests.post(f"{base}/jobs/index", json={"dataset": "extra"}, timeout=10))
    assert again["added"] == []
    assert sum(s["reason"] == "already indexed" for s in again["skipped"]) == 10
    assert again["rows"] == folder_added["rows"]


def test_uploaded_files_are_added_once_and_served(service, folder_added):
    base = service["base"]
    photo = sorted((DATASETS / "animals" / "panda").iterdir())[50].read_bytes()
    other = sorted((DATASETS / "animals" / "cat").iterdir())[50].read_bytes()
    files = [("image", ("p.jpg", photo)), ("image", ("c.jpg", other)),
             ("image", ("p_again.jpg", photo))]
    result = _ok(base, requests.post(f"{base}/jobs/index", files=files, timeout=10))
    assert [a["path"] for a in result["added"]] == ["p.jpg", "c.jpg"]
    assert result["skipped"][0]["path"] == "p_again.jpg"
    served = requests.get(f"{base}/images/{result['added'][0]['image_id']}", timeout=5)
    assert served.status_code == 200 and served.content == photo
    # Stored under its content id; its own file name travels with its hits.
    first = _query_file(base, other)["hits"][0]
    assert first["image_id"] == result["added"][1]["image_id"]
    assert first["name"] == "c.jpg" and first["path"] != "c.jpg"
    bad = requests.post(f"{base}/jobs/index", files=[("image", ("x.jpg", b"<html>"))],
                        timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"


def test_query_by_image_id_finds_itself_first(service):
    base = service["base"]
    hit = _query_file(base, sorted((service["root"] / "base" / "cat").iterdir())[2]
                      .read_bytes())["hits"][0]
    result = _ok(base, requests.post(f"{base}/jobs/query",
                                     json={"image_id": hit["image_id"], "k": 5}, timeout=10))
    assert result["query"] == {"image_id": hit["image_id"]}
    assert len(result["hits"]) == 5
    assert result["hits"][0]["image_id"] == hit["image_id"]  # its stored vector: distance 0
    assert result["hits"][0]["distance"] < 1e-5
    unknown = requests.post(f"{base}/jobs/query", json={"image_id": "f" * 24}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "image_not_found"
    bad = requests.post(f"{base}/jobs/query", json={"image_id": "nope"}, timeout=10)
    assert bad.status_code == 400


def test_batch_query_gives_one_result_per_file(service):
    base = service["base"]
    paths = [sorted((service["root"] / "base" / label).iterdir())[4]
             for label in ("cat", "dog", "panda")]
    files = [("image", (p.name, p.read_bytes())) for p in paths]
    result = _ok(base, requests.post(f"{base}/jobs/query", files=files, data={"k": "3"},
                                     timeout=10))
    assert [r["name"] for r in result["batch"]] == [p.name for p in paths]
    for entry, path in zip(result["batch"], paths, strict=True):
        assert len(entry["hits"]) == 3
        assert entry["hits"][0]["path"] == f"{path.parent.name}/{path.name}"


def test_search_options_exact_and_probes(service):
    base = service["base"]
    data = sorted((service["root"] / "base" / "dog").iterdir())[1].read_bytes()
    auto = _query_file(base, data)
    assert auto["search"]["method"] == "exact"  # a small collection is scanned, and says so
    assert "below the LSH threshold" in auto["search"]["reason"]
    asked = _query_file(base, data, exact="true")
    assert asked["search"] == {**asked["search"], "method": "exact", "reason": "requested"}
    probed = _query_file(base, data, probes="3")
    assert probed["search"]["method"] in {"lsh", "exact_fallback"}
    assert probed["hits"][0]["image_id"] == auto["hits"][0]["image_id"]
    bad = requests.post(f"{base}/jobs/query", files={"image": ("q.jpg", data)},
                        data={"probes": "-1"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "probes"


def test_deleted_image_is_never_returned(service, folder_added):
    base = service["base"]
    path = sorted((service["root"] / "base" / "panda").iterdir())[6]
    data = path.read_bytes()
    target = _query_file(base, data)["hits"][0]
    assert target["path"] == f"panda/{path.name}"

    def listed_images() -> int:
        models = requests.get(f"{base}/models", timeout=10).json()["models"]
        return next(m["images"] for m in models if m["version"] == service["version"])

    before = listed_images()
    response = requests.delete(f"{base}/images/{target['image_id']}", timeout=5)
    assert response.status_code == 200
    assert listed_images() == before - 1
    assert response.json()["image_id"] == target["image_id"] and response.json()["deleted"]
    for form in ({}, {"exact": "true"}, {"probes": "8"}, {}, {}):
        ids = [h["image_id"] for h in _query_file(base, data, **form)["hits"]]
        assert target["image_id"] not in ids
    assert requests.get(f"{base}/images/{target['image_id']}", timeout=5).status_code == 404
    again = requests.delete(f"{base}/images/{target['image_id']}", timeout=5)
    assert again.status_code == 404 and again.json()["error"]["code"] == "image_not_found"
    by_id = requests.post(f"{base}/jobs/query", json={"image_id": target["image_id"]},
                          timeout=10)
    assert by_id.status_code == 404


def test_version_swap_under_query_loop_then_old_namespace_removed(service, folder_added):
    base, client = service["base"], service["redis"]
    old = service["version"]
    data = sorted((service["root"] / "base" / "cat").iterdir())[0].read_bytes()
    outcomes: list[tuple[str, str | None]] = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            response = requests.post(f"{base}/jobs/query", files={"image": ("q.jpg", data)},
                                     data={"k": "5"}, timeout=10)
            if response.status_code != 202:
                outcomes.append((f"http {response.status_code}", None))
                continue
            job = wait_for_job(base, response.json()["job_id"], timeout=120)
            outcomes.append((job["status"], (job.get("result") or {}).get("model_version")))

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        job = _finish(base, requests.post(f"{base}/jobs/train",
                                          json={"dataset": "base", "epochs": 1, "seed": 3},
                                          timeout=10))
        new = job["result"]["version"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(v == new for _, v in outcomes):
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=150)
    assert job["status"] == "succeeded", job
    assert outcomes and all(status == "succeeded" for status, _ in outcomes), outcomes
    versions = [v for _, v in outcomes]
    assert old in versions and new in versions
    assert old not in versions[versions.index(new):]
    # After the grace period the superseded tables are gone (SCAN + UNLINK), the new serves.
    old_ns = f"{service['prefix']}:{{{old}}}:t*"
    deadline = time.monotonic() + GRACE_S + 30
    while time.monotonic() < deadline and list(client.scan_iter(match=old_ns, count=1000)):
        time.sleep(0.5)
    assert not list(client.scan_iter(match=old_ns, count=1000))
    assert list(client.scan_iter(match=f"{service['prefix']}:{{{new}}}:t*", count=1000))
    assert not client.exists(f"{service['prefix']}:{{{old}}}:built")
    assert _query_file(base, data)["model_version"] == new
    service["swapped_to"] = new


def test_rollback_rebuilds_the_old_tables_and_collects_the_ones_rolled_away_from(service):
    base, client, prefix = service["base"], service["redis"], service["prefix"]
    old, new = service["version"], service["swapped_to"]
    answer = requests.post(f"{base}/models/{old}/activate", timeout=10)
    assert answer.status_code == 200 and answer.json()["previous"] == new
    data = sorted((service["root"] / "base" / "dog").iterdir())[0].read_bytes()
    assert _query_file(base, data)["model_version"] == old  # its tables rebuilt by a worker
    assert list(client.scan_iter(match=f"{prefix}:{{{old}}}:t*", count=1000))
    # The version rolled away from is superseded like after a training: tables gone after the
    # grace period, so rollbacks never leak Redis memory.
    new_tables = f"{prefix}:{{{new}}}:t*"
    deadline = time.monotonic() + GRACE_S + 30
    while time.monotonic() < deadline and list(client.scan_iter(match=new_tables, count=1000)):
        time.sleep(0.5)
    assert not list(client.scan_iter(match=new_tables, count=1000))
    assert _query_file(base, data)["model_version"] == old
