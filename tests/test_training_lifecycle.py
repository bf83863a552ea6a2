"""Cancel and redelivery at the pipeline level, on a real Redis and a real (tiny) training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shared.jobs import JobStore, JobType
from shared.keys import Keys
from shared.registry import ModelRegistry
from shared.schema import TrainParams
from shared.settings import Settings
from workers.errors import JobCanceled
from workers.pipeline import run_training
from workers.redelivery import settle_earlier_attempt

PHASES = ["scan", "train", "save", "index"]


@pytest.fixture
def setup(tmp_path, redis_url, key_prefix, redis_client):
    data = tmp_path / "data"
    folder = data / "pics"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        (folder / f"p{i}.png").write_bytes(out.getvalue())
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, data_root=data,
                        artifacts_dir=tmp_path / "artifacts")
    keys = Keys(key_prefix)
    return settings, keys, ModelRegistry(redis_client, keys)


def _params(**extra) -> TrainParams:
    return TrainParams.parse({"dataset": "pics", "epochs": 1, "image_size": 32,
                              "batch_size": 4, **extra})


def _version_keys(redis_client, keys: Keys, version: str) -> int:
    return sum(1 for _ in redis_client.scan_iter(match=f"{keys.version_namespace(version)}:*"))


@pytest.mark.parametrize("phase", PHASES)
def test_cancel_at_any_phase_leaves_nothing_and_keeps_the_previous_model(setup, redis_client,
                                                                        phase):
    settings, keys, registry = setup
    first = run_training(settings, redis_client, _params(), torch.device("cpu"), lambda _: None)
    seen: dict = {}

    def report(update: dict) -> None:
        seen.update(update)
        # "index" is raised at its last report: after every table and the image map are written.
        if update.get("phase") == phase and (phase != "index" or update.get("images_done")):
            raise JobCanceled("job")

    with pytest.raises(JobCanceled):
        run_training(settings, redis_client, _params(seed=1), torch.device("cpu"), report)
    assert registry.active_version() == first["version"]
    assert registry.versions() == [first["version"]]
    # The decoded-pixel cache is shared by every training, not a partial artifact of this one.
    left = sorted(p.name for p in settings.artifacts_dir.iterdir() if p.name != "cache")
    assert left == [first["version"]]
    if "version" in seen:  # from the save phase on a version id existed: none of its keys stay
        assert _version_keys(redis_client, keys, seen["version"]) == 0
    assert _version_keys(redis_client, keys, first["version"]) > 0


def test_redelivery_removes_a_half_written_version_before_rerunning(setup, redis_client):
    settings, keys, registry = setup
    store = JobStore(redis_client, keys, settings.job_ttl_s)
    job = store.create(JobType.TRAIN, _params().to_dict())
    store.mark_running(job["job_id"])
    # What a worker killed during the index phase leaves: a staging folder, some table keys.
    version = "v20990101-000000-abcdef"
    store.set_progress(job["job_id"], {"phase": "index", "version": version})
    (settings.artifacts_dir / f".partial-{version}").mkdir(parents=True)
    (settings.artifacts_dir / f".partial-{version}" / "model.pt").write_bytes(b"x")
    redis_client.sadd(f"{keys.version_namespace(version)}:t0:3", 1, 2)
    redis_client.hset(keys.image_paths(version), "abc", "{}")
    assert settle_earlier_attempt(settings, redis_client, store.get(job["job_id"])) is None
    assert _version_keys(redis_client, keys, version) == 0
    assert not (settings.artifacts_dir / f".partial-{version}").exists()
    assert registry.versions() == []


def test_redelivery_after_a_complete_version_does_not_train_again(setup, redis_client):
    settings, keys, registry = setup
    store = JobStore(redis_client, keys, settings.job_ttl_s)
    job = store.create(JobType.TRAIN, _params().to_dict())
    store.mark_running(job["job_id"])
    progress: dict = {}
    result = run_training(settings, redis_client, _params(), torch.device("cpu"), progress.update)
    assert progress["version"] == result["version"]  # recorded before anything was written
    store.set_progress(job["job_id"], progress)  # the worker died before marking success
    settled = settle_earlier_attempt(settings, redis_client, store.get(job["job_id"]))
    assert settled is not None and settled["version"] == result["version"]
    assert settled["recovered_after_redelivery"] is True and settled["active"] is True
    assert registry.versions() == [result["version"]]
    assert _version_keys(redis_client, keys, result["version"]) > 0


def test_a_job_lost_before_writing_anything_simply_reruns(setup, redis_client):
    settings, keys, _ = setup
    store = JobStore(redis_client, keys, settings.job_ttl_s)
    job = store.create(JobType.TRAIN, {})
    store.mark_running(job["job_id"])
    store.set_progress(job["job_id"], {"phase": "train", "epoch": 1})
    assert settle_earlier_attempt(settings, redis_client, store.get(job["job_id"])) is None
