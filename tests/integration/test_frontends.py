"""The front ends on real parts: /models, thumbnails, the ``imgsim`` CLI and the web page.

One gunicorn API and one Celery worker against the real Redis; the page is driven in Debian's
headless Chromium through its chromedriver. Screenshots of every page state are written to
pytest's temporary folder and copied to ``var/test-output/screenshots/`` in the checkout.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import REPO
from tests.integration.harness import copy_animals, free_port, service_stack, wait_for_job

pytestmark = pytest.mark.integration
PER_CLASS = 8
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS_COPY = REPO / "var" / "test-output" / "screenshots"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("data")
    subset = root / "animals_small"
    copies = copy_animals(subset, PER_CLASS)
    # One readable photo: the API accepts the folder, the worker fails the job (needs >= 2).
    (root / "one_photo").mkdir()
    shutil.copy(copies["cat"][0], root / "one_photo" / "only.jpg")
    artifacts = tmp_path_factory.mktemp("artifacts")
    with service_stack(redis_url, root, artifacts, tmp_path_factory.mktemp("logs")) as running:
        base = running.base
        response = requests.post(f"{base}/jobs/train", json={
            "dataset": "animals_small", "epochs": 2, "image_size": 32}, timeout=10)
        assert response.status_code == 202, response.text
        first = wait_for_job(base, response.json()["job_id"], timeout=240)
        assert first["status"] == "succeeded", first
        yield {"base": base, "root": root, "subset": subset, "artifacts": artifacts,
               "first_version": first["result"]["version"], "procs": running.procs}


def _cli(stack, *argv: str, url: str | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m client.cli`` as a user would (the URL from IMGSIM_URL)."""
    env = {**os.environ, "IMGSIM_URL": url or stack["base"], "PYTHONPATH": str(REPO)}
    env.pop("IMGSIM_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "client.cli", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _photo(stack, label: str, index: int) -> Path:
    return sorted((stack["subset"] / label).iterdir())[index]


def _active(stack) -> str | None:
    return requests.get(f"{stack['base']}/models", timeout=5).json()["active"]


# ---- /models ---------------------------------------------------------------------------------


def test_models_lists_versions_and_activation_rolls_back(stack):
    base, first = stack["base"], stack["first_version"]
    # Typed the long way round: the job, its result and the version show the canonical name,
    # and the worker, resolving it again, finds the folder.
    run = _cli(stack, "train", "animals_small/../animals_small/", "--epochs", "1",
               "--image-size", "32", "--seed", "3", "--wait", "--json")
    assert run.returncode == 0, run.stderr
    trained = json.loads(run.stdout)
    second = trained["result"]["version"]
    assert trained["params"]["dataset"] == trained["result"]["dataset"] == "animals_small"

    listing = requests.get(f"{base}/models", timeout=5).json()
    assert listing["active"] == second
    versions = [m["version"] for m in listing["models"]]
    assert versions.index(second) < versions.index(first)  # newest first
    newest = listing["models"][0]
    assert newest["version"] == second and newest["active"] is True
    assert newest["images"] == 3 * PER_CLASS and newest["embedding_dim"] == 256
    assert newest["architecture"] == "default" and newest["created_at"]
    assert newest["train_params"]["epochs"] == 1 and newest["train_params"]["seed"] == 3
    assert newest["dataset"] == newest["train_params"]["dataset"] == "animals_small"
    assert newest["quality"] is None
    assert [m["active"] for m in listing["models"]].count(True) == 1

    rollback = requests.post(f"{base}/models/{first}/activate", timeout=5)
    assert rollback.status_code == 200
    assert rollback.json() == {"active": first, "previous": second}
    data = _photo(stack, "dog", 2).read_bytes()
    response = requests.post(f"{base}/jobs/query", files={"image": ("q.jpg", data)}, timeout=10)
    job = wait_for_job(base, response.json()["job_id"], timeout=60)
    assert job["result"]["model_version"] == first  # the worker follows the switch

    for bad in ("v0-unknown", "..", "%2e%2e%2fetc"):
        response = requests.post(f"{base}/models/{bad}/activate", timeout=5)
        assert response.status_code == 404, bad
        # ".." is resolved away by the HTTP client, so no route matches at all.
        assert response.json()["error"]["code"] in {"model_not_found", "not_found"}, bad

    # A version whose files are incomplete is refused and the active one stays.
    vectors = stack["artifacts"] / second / "embeddings.npy"
    moved = vectors.with_name("embeddings.npy.away")
    vectors.rename(moved)
    try:
        response = requests.post(f"{base}/models/{second}/activate", timeout=5)
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "model_incomplete" and "embeddings.npy" in error["missing"]
        assert _active(stack) == first
    finally:
        moved.rename(vectors)
    response = requests.post(f"{base}/models/{second}/activate", timeout=5)
    assert response.json() == {"active": second, "previous": first}


# ---- thumbnails ------------------------------------------------------------------------------


def _hit_ids(stack, k: int = 3) -> list[str]:
    data = _photo(stack, "cat", 1).read_bytes()
    response = requests.post(f"{stack['base']}/jobs/query", files={"image": ("q.jpg", data)},
                             data={"k": str(k)}, timeout=10)
    job = wait_for_job(stack["base"], response.json()["job_id"], timeout=60)
    assert job["status"] == "succeeded", job
    return [h["image_id"] for h in job["result"]["hits"]]


def test_thumbnails_are_bounded_jpegs_with_cache_validators(stack):
    base = stack["base"]
    image_id = _hit_ids(stack)[0]
    original = Image.open(io.BytesIO(requests.get(f"{base}/images/{image_id}", timeout=5).content))
    response = requests.get(f"{base}/images/{image_id}?size=64", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert "max-age" in response.headers["Cache-Control"]
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) == 64
    ratio = original.width / original.height
    assert abs(thumb.width / thumb.height - ratio) < 0.05  # aspect ratio kept
    again = requests.get(f"{base}/images/{image_id}?size=64", timeout=5,
                         headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304 and not again.content
    other = requests.get(f"{base}/images/{image_id}?size=32", timeout=5)
    assert other.headers["ETag"] != response.headers["ETag"]
    # Never larger than the original, whatever is asked.
    big = Image.open(io.BytesIO(requests.get(f"{base}/images/{image_id}?size=1024",
                                             timeout=5).content))
    assert big.size == original.size or max(big.size) <= 1024
    assert big.width <= original.width and big.height <= original.height
    for bad in ("0", "8", "5000", "abc", ""):
        response = requests.get(f"{base}/images/{image_id}?size={bad}", timeout=5)
        assert response.status_code == 400, bad
        assert response.json()["error"]["field"] == "size"
    missing = requests.get(f"{base}/images/{'0' * 24}?size=64", timeout=5)
    assert missing.status_code == 404


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_query_prints_hits_and_writes_a_contact_sheet(stack, tmp_path):
    photo = _photo(stack, "panda", 3)
    sheet = tmp_path / "sheet.png"
    run = _cli(stack, "query", str(photo), "-k", "6", "--sheet", str(sheet))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert f"panda/{photo.name}" in lines[2]  # the indexed photo itself ranks first
    assert len([line for line in lines if line[:2].strip().isdigit()]) == 6
    assert f"contact sheet: {sheet}" in run.stdout
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > 5 * 150 and image.height > 2 * 150

    run = _cli(stack, "--json", "query", str(photo), "-k", "4")
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)
    assert job["status"] == "succeeded" and len(job["result"]["hits"]) == 4
    assert job["result"]["hits"][0]["path"] == f"panda/{photo.name}"


def test_cli_models_activate_and_job(stack):
    run = _cli(stack, "models", "--json")
    assert run.returncode == 0, run.stderr
    listing = json.loads(run.stdout)
    active = listing["active"]
    text = _cli(stack, "models")
    assert text.returncode == 0
    assert any(line.startswith("*") and active in line for line in text.stdout.splitlines())

    run = _cli(stack, "activate", stack["first_version"])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"active model: {stack['first_version']} (was {active})"
    run = _cli(stack, "activate", active)
    assert run.returncode == 0
    missing = _cli(stack, "activate", "v-nope")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "model_not_found" in missing.stderr

    started = _cli(stack, "train", "animals_small", "--epochs", "1", "--image-size", "32",
                   "--json")
    assert started.returncode == 0, started.stderr
    job_id = json.loads(started.stdout)["job_id"]
    waited = _cli(stack, "job", job_id, "--wait")
    assert waited.returncode == 0, waited.stderr
    assert f"job {job_id}  train  succeeded" in waited.stdout
    assert "images indexed 24" in waited.stdout
    shown = _cli(stack, "job", job_id, "--json")
    assert json.loads(shown.stdout)["status"] == "succeeded"


def test_cli_exit_codes(stack, tmp_path):
    failed = _cli(stack, "train", "one_photo", "--epochs", "1", "--wait")
    assert failed.returncode == 1
    assert "no_readable_images" in failed.stderr.splitlines()[-1]

    refused = _cli(stack, "train", "does_not_exist", "--wait")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("dataset folder not found: 'does_not_exist'")
    assert refused.stderr.count("\n") == 1

    unreachable = _cli(stack, "models", url=f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 2
    assert unreachable.stderr.count("\n") == 1 and "cannot reach" in unreachable.stderr

    not_image = tmp_path / "notes.jpg"
    not_image.write_text("plain text")
    bad_upload = _cli(stack, "query", str(not_image))
    assert bad_upload.returncode == 2 and "not_an_image" in bad_upload.stderr

    for argv in (["query"], ["frobnicate"], ["query", "x.jpg", "-k", "many"], []):
        usage = _cli(stack, *argv)
        assert usage.returncode == 2, argv
        assert usage.stderr.count("\n") == 1 and usage.stderr.startswith("imgsim: error:"), argv


# ---- web page --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            pytest.fail(f"browser tests need Debian's chromium and chromium-driver ({path} is "
                        "missing): bash scripts/setup.sh installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1360,1000", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    saved: list[Path] = []

    def save(driver, name: str) -> Path:
        path = folder / f"{len(saved) + 1:02d}-{name}.png"
        driver.save_screenshot(str(path))
        saved.append(path)
        return path

    yield save
    shutil.rmtree(SCREENSHOTS_COPY, ignore_errors=True)  # only this run's states
    SCREENSHOTS_COPY.mkdir(parents=True, exist_ok=True)
    for path in saved:
        shutil.copy(path, SCREENSHOTS_COPY / path.name)
    print(f"\nscreenshots: {folder} (copied to {SCREENSHOTS_COPY})")


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _attr(driver, element_id: str, name: str) -> str | None:
    return driver.find_element("id", element_id).get_attribute(name)


def _images_loaded(driver, selector: str) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector)


def test_page_upload_shows_k_hits_and_clicking_a_hit_searches_again(stack, browser, screenshots):
    from selenium.webdriver.support.ui import Select

    browser.get(stack["base"] + "/")
    _wait(browser, lambda d: _attr(d, "model-panel", "data-active"))
    assert _attr(browser, "model-panel", "data-active") == _active(stack)
    screenshots(browser, "empty-page")

    Select(browser.find_element("id", "k-input")).select_by_visible_text("5")
    photo = _photo(stack, "dog", 4)
    browser.find_element("id", "file-input").send_keys(str(photo))
    _wait(browser, lambda d: _attr(d, "hits", "data-state") in {"done", "failed"})
    assert _attr(browser, "hits", "data-state") == "done", \
        browser.find_element("id", "query-error").text
    hits = browser.find_elements("css selector", "#hits .hit")
    assert len(hits) == 5
    assert hits[0].find_element("css selector", ".name").text == photo.name
    assert hits[0].find_element("css selector", ".score").text.startswith("score 1.0")
    _wait(browser, lambda d: _images_loaded(d, "#hits .hit img"))
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('#hits .hit img')].map(i => "
        "[i.naturalWidth, i.naturalHeight, i.src]);")
    assert all(max(w, h) <= 256 and "size=256" in src for w, h, src in sizes)
    screenshots(browser, "query-results")

    clicked = hits[2]
    clicked_id = clicked.get_attribute("data-image-id")
    clicked_name = clicked.find_element("css selector", ".name").text
    clicked.click()
    _wait(browser, lambda d: d.find_element("id", "query-title").text.endswith(clicked_name)
          and _attr(d, "hits", "data-state") == "done")
    again = browser.find_elements("css selector", "#hits .hit")
    assert len(again) == 5
    assert again[0].get_attribute("data-image-id") == clicked_id  # an indexed image finds itself
    _wait(browser, lambda d: _images_loaded(d, "#hits .hit img"))
    screenshots(browser, "query-by-clicked-hit")


def test_page_training_form_reaches_100_percent_and_updates_the_model_panel(
        stack, browser, screenshots):
    browser.get(stack["base"] + "/")
    _wait(browser, lambda d: _attr(d, "model-panel", "data-active"))
    before = _attr(browser, "model-panel", "data-active")
    browser.find_element("id", "train-dataset").send_keys("animals_small")
    epochs = browser.find_element("id", "train-epochs")
    epochs.clear()
    epochs.send_keys("6")
    browser.find_element("id", "train-submit").click()
    _wait(browser, lambda d: (_attr(d, "loss-chart", "data-points") or "0") != "0"
          or _attr(d, "train-progress", "data-status") in {"succeeded", "failed"}, timeout=120)
    if _attr(browser, "train-progress", "data-status") not in {"succeeded", "failed"}:
        screenshots(browser, "training-in-progress")
    _wait(browser, lambda d: _attr(d, "train-progress", "data-status")
          in {"succeeded", "failed", "canceled"}, timeout=240)
    assert _attr(browser, "train-progress", "data-status") == "succeeded", \
        browser.find_element("id", "train-status").text
    assert browser.find_element("id", "train-percent").text == "100%"
    status = browser.find_element("id", "train-status").text
    epochs_run = re.search(r"epoch (\d+)/6", status)
    assert epochs_run, status  # early stopping may end before epoch 6
    assert _attr(browser, "loss-chart", "data-points") == epochs_run.group(1)
    after = _active(stack)
    assert after != before
    _wait(browser, lambda d: _attr(d, "model-panel", "data-active") == after)
    assert browser.find_element("id", "model-version").text == after
    assert browser.find_element("id", "model-images").text == f"{3 * PER_CLASS} images"
    assert browser.find_element("id", "model-dim").text == "256"
    screenshots(browser, "training-done-model-updated")

    browser.find_element("id", "train-dataset").clear()
    browser.find_element("id", "train-dataset").send_keys("no_such_folder")
    browser.find_element("id", "train-submit").click()
    _wait(browser, lambda d: d.find_element("id", "train-error").is_displayed())
    assert "dataset_not_found" in browser.find_element("id", "train-error").text
    screenshots(browser, "training-form-error")


def test_page_shows_the_quality_an_evaluation_stored(stack, browser, screenshots):
    base = stack["base"]
    accepted = requests.post(f"{base}/jobs/evaluate", json={"dataset": "animals_small", "k": 5},
                             timeout=10)
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(base, accepted.json()["job_id"], timeout=240)
    assert job["status"] == "succeeded", job
    result = job["result"]
    browser.get(base + "/")
    _wait(browser, lambda d: "P@5" in d.find_element("id", "model-quality").text)
    text = browser.find_element("id", "model-quality").text
    assert f"P@5 {result['lsh']['precision_at_k']:.3f} (LSH)" in text
    for label, name in (("random", "random"), ("tiny image", "tiny_image"),
                        ("colour histogram", "colour_histogram")):
        assert f"{label} {result['baselines'][name]['precision_at_k']:.3f}" in text
    screenshots(browser, "model-quality")
