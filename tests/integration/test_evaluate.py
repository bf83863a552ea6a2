"""Evaluation end to end: precision/mAP of the active model through real workers and gunicorn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import requests

from tests.conftest import REPO
from tests.integration.harness import copy_animals, service_stack, wait_for_job

pytestmark = pytest.mark.integration
CLASSES = ("cat", "dog", "panda")
INDEXED, HELD = 12, 4
K = 5


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("data")
    copy_animals(root / "base", INDEXED, classes=CLASSES)
    held = copy_animals(root / "held", HELD, start=INDEXED, classes=CLASSES)
    held_files = {f"{label}/{path.name}": label for label, paths in held.items()
                  for path in paths}
    # A photo at the top of the query folder has no class folder: skipped unless labelled.
    spare = copy_animals(root / "spare", 1, start=INDEXED + HELD, classes=("panda",))
    spare["panda"][0].rename(root / "held" / "top_level.jpg")
    with service_stack(redis_url, root, tmp_path_factory.mktemp("artifacts"),
                       tmp_path_factory.mktemp("logs")) as stack:
        job = _finish(stack.base, requests.post(f"{stack.base}/jobs/train",
                                                json={"dataset": "base", "epochs": 1},
                                                timeout=10))
        assert job["status"] == "succeeded", job
        yield {"base": stack.base, "root": root, "version": job["result"]["version"],
               "held": held_files}


def _finish(base: str, response: requests.Response, timeout: float = 300) -> dict:
    assert response.status_code == 202, response.text
    return wait_for_job(base, response.json()["job_id"], timeout=timeout)


def _evaluate(base: str, **body) -> dict:
    job = _finish(base, requests.post(f"{base}/jobs/evaluate", json=body, timeout=10))
    assert job["status"] == "succeeded", job
    return job["result"]


@pytest.fixture(scope="module")
def held_out(service):
    return _evaluate(service["base"], dataset="held", k=K)


def test_held_out_queries_are_scored_exactly_like_the_query_api_answers(service, held_out):
    result = held_out
    assert result["model_version"] == service["version"]
    assert result["queries"] == len(CLASSES) * HELD
    assert result["skipped_unlabelled"] == 1
    assert result["queries_in_index"] == 0
    assert result["indexed"] == len(CLASSES) * INDEXED
    assert result["query_path"] == "exact"  # 36 images: plain queries scan every row
    # Cross-check the exact figure against the public query path: each held-out photo sent to
    # POST /jobs/query with exact=true, precision computed from the hits' class folders.
    base, precisions = service["base"], []
    for rel, label in sorted(service["held"].items()):
        data = (service["root"] / "held" / rel).read_bytes()
        job = _finish(base, requests.post(f"{base}/jobs/query", files={"image": ("q.jpg", data)},
                                          data={"k": str(K), "exact": "true"}, timeout=10))
        hits = job["result"]["hits"]
        precisions.append(sum(h["path"].split("/")[0] == label for h in hits) / K)
    assert result["exact"]["precision_at_k"] == pytest.approx(sum(precisions) / len(precisions))
    assert set(result["exact"]["per_class"]) == set(CLASSES)
    # Forced through the LSH tables (not the exact scan), every query answered.
    assert sum(result["lsh"]["methods"].values()) == result["queries"]
    assert set(result["lsh"]["methods"]) <= {"lsh", "exact_fallback"}
    for name in ("exact", "lsh"):
        figures = result[name]
        assert 0.0 <= figures["map_at_k"] <= 1.0 and figures["k"] == K


def test_baselines_are_scored_on_the_same_queries(held_out):
    baselines = held_out["baselines"]
    assert set(baselines) == {"random", "tiny_image", "colour_histogram"}
    for figures in baselines.values():
        assert figures["queries"] == held_out["queries"]
        assert 0.0 <= figures["precision_at_k"] <= 1.0
        assert "indexed_images_scored" not in figures  # every indexed file was readable
    # Pandas are black and white: the colour histogram finds other pandas.
    assert baselines["colour_histogram"]["per_class"]["panda"] > 1 / len(CLASSES)


def test_figures_are_stored_with_the_model(service, held_out):
    listing = requests.get(f"{service['base']}/models", timeout=10).json()
    (model,) = [m for m in listing["models"] if m["version"] == service["version"]]
    quality = model["quality"]
    assert quality["exact"]["precision_at_k"] == held_out["exact"]["precision_at_k"]
    assert quality["baselines"]["random"] == held_out["baselines"]["random"]
    assert quality["k"] == K and quality["dataset"] == "held"


def test_indexed_images_never_count_themselves(service):
    # Indexed photos come in pairs sharing a class of their own: each query has exactly one
    # relevant image besides itself. If a query could find itself (distance 0, first hit),
    # every query would score at least 1/k; leaving itself out, most find their pair nowhere
    # in the top k.
    root = service["root"]
    photos = sorted((root / "base").rglob("*.jpg"))
    lines = ["path,class"] + [f"base/{p.relative_to(root / 'base').as_posix()},pair{n // 2}"
                              for n, p in enumerate(photos)]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    result = _evaluate(service["base"], dataset="base", labels="pairs.csv", k=K)
    assert result["queries"] == result["queries_in_index"] == len(CLASSES) * INDEXED
    assert result["skipped_no_match"] == 0
    for figures in (result["exact"], result["lsh"], *result["baselines"].values()):
        assert figures["precision_at_k"] < 1 / K


def test_queries_of_classes_the_index_lacks_are_left_out(service):
    root = service["root"]
    mixed = root / "mixed"
    shutil.copytree(root / "held", mixed)
    (mixed / "zebra").mkdir()
    # A photo of its own (a byte copy of another query would be skipped as a duplicate).
    extra = copy_animals(root / "extra", 1, start=INDEXED + HELD + 1, classes=("cat",))
    extra["cat"][0].rename(mixed / "zebra" / "z.jpg")
    result = _evaluate(service["base"], dataset="mixed", k=K)
    assert result["skipped_no_match"] == 1 and result["unmatched_classes"] == ["zebra"]
    assert result["queries"] == len(CLASSES) * HELD
    assert set(result["exact"]["per_class"]) == set(CLASSES)


def test_evaluating_the_folder_above_the_classes_fails_and_keeps_the_stored_figures(service,
                                                                                    held_out):
    before = requests.get(f"{service['base']}/models", timeout=10).json()
    # From the data root every query's class is its dataset's name (base, held...), which no
    # indexed image has: nothing can be scored.
    job = _finish(service["base"], requests.post(f"{service['base']}/jobs/evaluate",
                                                 json={"dataset": "."}, timeout=10))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "no_matching_classes"
    assert "indexed classes: cat, dog, panda" in job["error"]["message"]
    after = requests.get(f"{service['base']}/models", timeout=10).json()
    assert after == before


def test_labels_file_overrides_the_folder_classes(service):
    # The CSV's folder is the data root; it relabels the held-out cats as dogs.
    root = service["root"]
    lines = ["path,class"] + [f"held/{rel},dog" for rel, label in service["held"].items()
                              if label == "cat"] + ["held/top_level.jpg,panda"]
    (root / "relabel.csv").write_text("\n".join(lines) + "\n")
    result = _evaluate(service["base"], dataset="held", labels="relabel.csv", k=K)
    assert result["skipped_unlabelled"] == 0
    assert result["queries"] == len(CLASSES) * HELD + 1
    assert set(result["exact"]["per_class"]) == {"dog", "panda"}


def test_a_folder_without_classes_fails_with_a_reason(service):
    flat = service["root"] / "flat"
    flat.mkdir()
    shutil.copy(service["root"] / "held" / "top_level.jpg", flat / "one.jpg")
    job = _finish(service["base"], requests.post(f"{service['base']}/jobs/evaluate",
                                                 json={"dataset": "flat"}, timeout=10))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "no_labelled_images"


def test_cli_eval_waits_and_prints_the_table(service):
    env = {**os.environ, "IMGSIM_URL": service["base"], "PYTHONPATH": str(REPO)}
    env.pop("IMGSIM_API_KEY", None)
    done = subprocess.run([sys.executable, "-m", "client.cli", "eval", "held", "-k", str(K),
                           "--wait", "--quiet"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"precision@{K}" in done.stdout
    for row in ("exact", "lsh", "baseline random", "baseline tiny_image",
                "baseline colour_histogram"):
        assert row in done.stdout
    models = subprocess.run([sys.executable, "-m", "client.cli", "--json", "models"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    active = [m for m in json.loads(models.stdout)["models"] if m["active"]]
    assert active[0]["quality"]["k"] == K
