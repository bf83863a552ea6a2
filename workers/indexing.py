"""Index operations: add images to the active version without retraining; drop old namespaces."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis
import torch

from shared.collection import delete_namespace
from shared.datasets import Candidate, DatasetError, iter_dataset, resolve_dataset
from shared.images import ImageDecodeError, load_for_model, probe_image, read_file_bytes
from shared.keys import Keys
from shared.registry import ModelRegistry
from shared.settings import Settings
from workers.embedding import encode_images, normalise
from workers.errors import JobError
from workers.reader import image_id_for
from workers.search import ActiveModelCache

ProgressFn = Callable[[dict], None]
# Images decoded, embedded and committed per step: bounds memory for any folder size.
CHUNK = 256
UPLOADS = "uploads"
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
              "TIFF": ".tif", "BMP": ".bmp", "HEIF": ".heic", "AVIF": ".avif"}


def uploads_root(settings: Settings) -> Path:
    """Where uploaded images added to the index are kept (content-addressed file names)."""
    return settings.artifacts_dir / UPLOADS


def _folder_items(settings: Settings, dataset: str, skipped: list[dict]
                  ) -> tuple[Path, Iterator[tuple[str, Callable[[], bytes]]]]:
    try:
        root = resolve_dataset(settings.data_root, dataset)
    except DatasetError as exc:
        raise JobError(exc.code, exc.message) from None

    def items():
        for item in iter_dataset(root):
            if isinstance(item, Candidate):
                yield item.relpath, (lambda p=item.path: read_file_bytes(
                    p, settings.max_upload_bytes))
            else:
                skipped.append({"path": item.relpath, "reason": item.reason})
    return root, items()


def run_index(settings: Settings, client: redis.Redis, cache: ActiveModelCache, spec: dict,
              device: torch.device, report: ProgressFn, threads: int = 2) -> dict:
    """Embed images with the active model and add them to its collection.

    Args:
        settings: service settings.
        client: Redis.
        cache: this process's active-model cache (the version to add to).
        spec: {"dataset": folder} or {"uploads": [{"key", "name"}]} (bytes spooled in Redis).
        device: torch device.
        report: progress sink.
        threads: decode threads.

    Returns:
        {"version", "added": [{"image_id", "path"}], "skipped": [{"path", "reason",
        "image_id"?}], "failed": [{"path", "reason"}], "rows", "timings"}.

    Raises:
        JobError: no active model, bad folder, or an expired upload.
    """
    started = time.perf_counter()
    version, index = cache.get()
    added: list[dict] = []
    skipped: list[dict] = []
    failed: list[dict] = []
    if "dataset" in spec:
        root, items = _folder_items(settings, spec["dataset"], skipped)
    else:
        root = uploads_root(settings)
        items = iter(_upload_items(client, spec["uploads"]))
    size = version.model_config.image_size
    done = 0

    def decode(item):
        path, read = item
        try:
            data = read()
            return path, data, image_id_for(data), load_for_model(
                data, size, settings.max_image_pixels)
        except ImageDecodeError as exc:
            return path, None, None, exc.message

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        while True:
            chunk = [item for _, item in zip(range(CHUNK), items, strict=False)]
            if not chunk:
                break
            decoded = list(pool.map(decode, chunk))
            good = []
            for path, data, image_id, payload in decoded:
                if image_id is None:
                    failed.append({"path": path, "reason": payload})
                else:
                    good.append((path, data, image_id, payload))
            if good:
                vectors = normalise(encode_images(
                    version.model, np.stack([g[3] for g in good]), device), version.center)
                finite = np.isfinite(vectors).all(axis=1)
                entries = []
                for (path, data, image_id, _), ok in zip(good, finite, strict=True):
                    if not ok:
                        failed.append({"path": path, "reason": "the model produced a NaN/inf "
                                       "embedding for this image"})
                        continue
                    stored = path
                    if "dataset" not in spec:
                        stored = _save_upload(root, image_id, data)
                    entries.append({"image_id": image_id, "path": stored, "root": str(root),
                                    "shown": path})
                if entries:
                    # An upload is stored as <image_id>.<ext>; its own file name is kept as
                    # metadata ("name") and shown with its hits.
                    rows = index.add(vectors[finite], [
                        {"image_id": e["image_id"], "path": e["path"], "root": e["root"],
                         **({"name": e["shown"]} if e["shown"] != e["path"] else {})}
                        for e in entries])
                    for entry, outcome in zip(entries, rows, strict=True):
                        if "skipped" in outcome:
                            skipped.append({"path": entry["shown"], "reason": "already indexed",
                                            "image_id": entry["image_id"]})
                        else:
                            added.append({"image_id": entry["image_id"], "path": entry["shown"]})
            done += len(chunk)
            report({"phase": "index", "images_done": done, "added": len(added)})
    index.sync()
    return {"version": version.version, "added": added, "skipped": skipped, "failed": failed,
            "rows": index.alive_rows,
            "timings": {"total_s": round(time.perf_counter() - started, 2)}}


def _upload_items(client: redis.Redis, uploads: list[dict]):
    for upload in uploads:
        data = client.get(upload["key"])
        if data is None:
            raise JobError("upload_expired", "an uploaded image expired before a worker ran it")
        yield upload["name"], (lambda d=data: d)


def _save_upload(root: Path, image_id: str, data: bytes) -> str:
    """Keep an uploaded image under its content id (same bytes, same file); return its name."""
    try:
        fmt = probe_image(data, 10**12).format
    except ImageDecodeError:
        fmt = ""
    name = image_id + EXTENSIONS.get(fmt, ".img")
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if not target.exists():
        partial = root / f".{name}.{time.monotonic_ns()}"
        partial.write_bytes(data)
        partial.rename(target)
    return name


def collect_superseded(client: redis.Redis, keys: Keys, grace_s: float,
                       now: float | None = None) -> list[str]:
    """Remove the LSH tables of versions superseded more than ``grace_s`` ago.

    SCAN + UNLINK of the namespace's bucket keys (the bulk of its memory). The version's files,
    registry entry and small per-version records (images hash, row count, added rows,
    tombstones) stay, so it can be made active again: a worker then rebuilds its tables from
    the saved vectors.

    Returns:
        The versions whose namespaces were removed.
    """
    now = time.time() if now is None else now
    active = ModelRegistry(client, keys).active_version()
    removed = []
    for raw, _since in client.zrangebyscore(keys.superseded(), 0, now - grace_s,
                                            withscores=True):
        version = raw.decode()
        if version != active:
            ns = keys.namespace(version)
            client.unlink(ns.built)
            delete_namespace(client, ns.ns, pattern="t*")
            removed.append(version)
        client.zrem(keys.superseded(), version)
    return removed
