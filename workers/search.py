"""Query side: the active version loaded once per worker process, then embed, probe, re-rank."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import redis
import torch

from shared.images import ImageDecodeError, load_for_model, sample_jpeg
from shared.keys import Keys
from shared.registry import ModelRegistry
from shared.settings import Settings
from workers.artifacts import ModelVersion, load_version
from workers.embedding import encode_images, normalise
from workers.errors import JobError
from workers.lsh_index import LshIndex, LshParams
from workers.vector_store import VectorStore

log = logging.getLogger(__name__)


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
                index = open_index(self._client, self._keys, self._settings, version)
                try:
                    _warm_up(version, index, self._device, self._settings)
                except Exception as exc:  # only a head start: a real query reports any error
                    log.warning("warm-up of %s failed: %s", version.version, exc)
                self._loaded = (version, index)
            return self._loaded


def _warm_up(version: ModelVersion, index: LshIndex, device: torch.device,
             settings: Settings) -> None:
    """Run one tiny query through the freshly loaded version, so the first real one does not
    pay one-off costs: ~60 ms on this CPU (oneDNN setting up the encoder's kernels for the
    query shape, Pillow's JPEG decoder, the first touch of the vector file)."""
    query = embed_upload(version, settings, sample_jpeg(), device)
    if index.store is not None and len(index.store):
        search_vector(version, index, query, 1, exact=True)


def open_index(client: redis.Redis, keys: Keys, settings: Settings,
               version: ModelVersion) -> LshIndex:
    """The LSH index of a loaded version over its vector store (trained + added rows).

    A version whose tables were removed (superseded, then made active again) gets them
    rebuilt from its saved vectors here, under the version's write lock.
    """
    lsh = LshParams.from_dict(version.config["lsh"])
    store = VectorStore(version.vectors, settings.artifacts_dir / version.version)
    index = LshIndex(client, keys.version_namespace(version.version), version.planes, store,
                     probes=lsh.probes, exact_below=settings.lsh_min_rows)
    if not index.exists():
        with index._write_lock(60.0):
            if not index.exists():
                index.sync()  # every committed row, the added ones included
                entries = None if client.exists(index.keys.images) else [
                    {"image_id": i, "path": p, "root": version.dataset_root}
                    for i, p in zip(version.image_ids, version.paths, strict=True)]
                index.build(store.take(np.arange(len(store))), entries)
    index.sync()
    return index


def row_entry(version: ModelVersion, index: LshIndex, row: int) -> dict:
    """{"image_id", "path"} of a row, plus "name" (an upload's own file name) when known:
    trained rows from the version, added rows from Redis."""
    if row < len(version.image_ids):
        return {"image_id": version.image_ids[row], "path": version.paths[row]}
    return dict(index.added_meta[row - len(version.image_ids)])


def search_vector(version: ModelVersion, index: LshIndex, query: np.ndarray, k: int,
                  probes: int | None = None, exact: bool = False,
                  exclude_row: int | None = None) -> dict:
    """Search the index with an embedding and describe the hits.

    Args:
        version: the loaded version.
        index: its index.
        query: (dim,) normalised embedding.
        k: hits wanted.
        probes: extra buckets per table (None: the version's default).
        exact: scan every row.
        exclude_row: a row never returned (the query image itself when querying by id).

    Returns:
        {"hits", "search"} parts of a query result.
    """
    want = k + (1 if exclude_row is not None else 0)
    found = index.search(query, want, probes=probes, exact=exact)
    hits = []
    for row, dist in zip(found.rows.tolist(), found.distances.tolist(), strict=True):
        if row == exclude_row or len(hits) == k:
            continue
        hits.append({
            **row_entry(version, index, row),
            "distance": round(float(dist), 6),
            # Vectors are unit length, so cosine similarity = 1 - d^2 / 2.
            "score": round(float(1.0 - dist * dist / 2.0), 6),
        })
    search = {"method": found.method, "candidates": found.candidates,
              "indexed": index.alive_rows}
    if found.method == "lsh":
        search["probes"] = found.probes
    if found.reason:
        search["reason"] = found.reason
    return {"hits": hits, "search": search}


def run_query_by_id(cache: ActiveModelCache, image_id: str, k: int, probes: int | None = None,
                    exact: bool = False) -> dict:
    """The k images nearest to an indexed one, from its stored vector (no re-embedding).

    Like querying with the image's own bytes, the image itself comes first (distance 0).

    Raises:
        JobError: no active model, or the image is not in the active version.
    """
    t0 = time.perf_counter()
    version, index = cache.get()
    raw = index.client.hget(index.keys.images, image_id)
    row = None if raw is None else int(json.loads(raw)["row"])
    if row is None:
        raise JobError("image_not_found",
                       f"no image {image_id!r} in the active version {version.version}")
    index.sync()
    if row >= len(index.store):
        raise JobError("image_not_found", f"image {image_id!r} is not committed yet")
    query = index.store.take(np.asarray([row]))[0]
    part = search_vector(version, index, query, k, probes, exact)
    return {"model_version": version.version, "k": k, "query": {"image_id": image_id},
            **part, "timings_ms": {"total_ms": round((time.perf_counter() - t0) * 1000, 2)}}


def embed_upload(version: ModelVersion, settings: Settings, data: bytes, device: torch.device,
                 timings: dict[str, float] | None = None) -> np.ndarray:
    """Decode an uploaded image and embed it as the index's vectors are (centred, unit length).

    Args:
        version: the loaded model version.
        settings: service settings (pixel cap, precision).
        data: the image file's bytes.
        device: torch device.
        timings: receives ``decode_ms`` and ``encode_ms`` when given.

    Returns:
        The (dim,) query vector.

    Raises:
        JobError: not a usable image, or the model produced a non-finite embedding.
    """
    t0 = time.perf_counter()
    try:
        pixels = load_for_model(data, version.model_config.image_size, settings.max_image_pixels)
    except ImageDecodeError as exc:
        raise JobError(exc.code, exc.message) from None
    t1 = time.perf_counter()
    code = encode_images(version.model, pixels[None], device, precision=settings.precision)
    if not np.isfinite(code).all():
        raise JobError("embedding_not_finite", "the model produced a NaN/inf embedding")
    query = normalise(code, version.center)[0]
    if timings is not None:
        timings["decode_ms"] = (t1 - t0) * 1000
        timings["encode_ms"] = (time.perf_counter() - t1) * 1000
    return query


def run_query(
    cache: ActiveModelCache,
    settings: Settings,
    data: bytes,
    k: int,
    device: torch.device,
    probes: int | None = None,
    exact: bool = False,
) -> dict:
    """Embed an uploaded image and return its k nearest indexed images.

    Args:
        cache: this process's active-model cache.
        settings: service settings (pixel cap).
        data: the uploaded file's bytes.
        k: number of hits wanted.
        device: torch device.
        probes: extra buckets per table (None: the version's default).
        exact: scan every row instead of probing the tables.

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
    query = embed_upload(version, settings, data, device, timings)
    t0 = time.perf_counter()
    part = search_vector(version, index, query, k, probes, exact)
    timings["search_ms"] = (time.perf_counter() - t0) * 1000
    return {
        "model_version": version.version,
        "k": k,
        **part,
        "timings_ms": {name: round(value, 2) for name, value in timings.items()},
    }
