"""Query side: the active version loaded once per worker process, then embed, probe, re-rank."""

from __future__ import annotations

import threading
import time

import numpy as np
import redis
import torch

from shared.images import ImageDecodeError, load_for_model
from shared.keys import Keys
from shared.registry import ModelRegistry
from shared.settings import Settings
from workers.artifacts import ModelVersion, load_version
from workers.embedding import encode_images, normalise
from workers.errors import JobError
from workers.lsh_index import LshIndex


class ActiveModelCache:
    """Holds the loaded active version of this process; reloads when the pointer moves.

    One Redis GET per query checks the pointer; loading happens at most once per version.
    """

    def __init__(self, settings: Settings, client: redis.Redis, device: torch.device) -> None:
        self._settings = settings
        self._client = client
        self._device = device
        self._registry = ModelRegistry(client, Keys(settings.key_prefix))
        self._keys = Keys(settings.key_prefix)
        self._lock = threading.Lock()
        self._loaded: tuple[ModelVersion, LshIndex] | None = None

    def get(self) -> tuple[ModelVersion, LshIndex]:
        """Return the active version and its index, loading it if it changed.

        Raises:
            JobError: no active model, or its files are missing.
        """
        active = self._registry.active_version()
        if active is None:
            raise JobError("no_active_model", "no model has been trained yet: run a training job")
        with self._lock:
            if self._loaded is None or self._loaded[0].version != active:
                try:
                    version = load_version(self._settings.artifacts_dir, active, self._device)
                except FileNotFoundError as exc:
                    raise JobError("model_files_missing",
                                   f"active model {active} has no files: {exc}") from None
                index = LshIndex(self._client, self._keys.version_namespace(active),
                                 version.planes, version.vectors)
                self._loaded = (version, index)
            return self._loaded


def run_query(
    cache: ActiveModelCache,
    settings: Settings,
    data: bytes,
    k: int,
    device: torch.device,
) -> dict:
    """Embed an uploaded image and return its k nearest indexed images.

    Args:
        cache: this process's active-model cache.
        settings: service settings (pixel cap).
        data: the uploaded file's bytes.
        k: number of hits wanted.
        device: torch device.

    Returns:
        JSON result: hits (image_id, path, distance, score), model version, search method,
        candidates scored and a timing breakdown in milliseconds.

    Raises:
        JobError: the upload is not a usable image, or no model is active.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    version, index = cache.get()
    timings["load_ms"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    try:
        pixels = load_for_model(data, version.model_config.image_size, settings.max_image_pixels)
    except ImageDecodeError as exc:
        raise JobError(exc.code, exc.message) from None
    timings["decode_ms"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    code = encode_images(version.model, pixels[None], device)
    if not np.isfinite(code).all():
        raise JobError("embedding_not_finite", "the model produced a NaN/inf embedding")
    query = normalise(code, version.center)[0]
    timings["encode_ms"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    found = index.search(query, k)
    timings["search_ms"] = (time.perf_counter() - t0) * 1000
    hits = [
        {
            "image_id": version.image_ids[row],
            "path": version.paths[row],
            "distance": round(float(dist), 6),
            # Vectors are unit length, so cosine similarity = 1 - d^2 / 2.
            "score": round(float(1.0 - dist * dist / 2.0), 6),
        }
        for row, dist in zip(found.rows.tolist(), found.distances.tolist(), strict=True)
    ]
    return {
        "model_version": version.version,
        "k": k,
        "hits": hits,
        "search": {
            "method": found.method,
            "candidates": found.candidates,
            "indexed": len(version.image_ids),
        },
        "timings_ms": {name: round(value, 2) for name, value in timings.items()},
    }
