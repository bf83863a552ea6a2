"""The training job: scan -> decode -> train -> embed -> save version -> index -> activate."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import redis
import torch

from shared.collection import delete_namespace
from shared.datasets import SHOWN_CHARS, DatasetError, display_name, resolve_dataset
from shared.keys import Keys
from shared.registry import ModelRegistry, remove_version
from shared.schema import TrainParams
from shared.settings import Settings
from workers.artifacts import new_version_id, save_version
from workers.device import autocast_dtype
from workers.embedding import encode_images, normalise
from workers.errors import JobError
from workers.lsh_index import LshIndex, LshParams, generate_planes
from workers.model import ModelConfig
from workers.reader import PixelCache, decode_dataset, stage_images
from workers.training import TrainingConfig, train_autoencoder

ProgressFn = Callable[[dict], None]


def run_training(
    settings: Settings,
    client: redis.Redis,
    params: TrainParams,
    device: torch.device,
    report: ProgressFn,
    threads: int = 2,
) -> dict:
    """Train a new model version on a folder and make it the active one.

    The previous active version keeps serving until the final atomic switch; on any failure
    the new version's files and Redis keys are removed.

    Args:
        settings: service settings.
        client: Redis connection for the tables and the registry.
        params: validated training parameters.
        device: torch device.
        report: receives progress dicts (phase, epoch, loss, images done/total).
        threads: decode threads (one per core is right: Pillow decodes without the GIL).

    Returns:
        JSON result: version, counts, skipped files, per-epoch losses, phase timings.

    Raises:
        JobError: bad folder, no usable image, diverged training.
    """
    keys = Keys(settings.key_prefix)
    registry = ModelRegistry(client, keys)
    timings: dict[str, float] = {}
    try:
        root = resolve_dataset(settings.data_root, params.dataset)
    except DatasetError as exc:
        raise JobError(exc.code, exc.message) from None

    started = time.perf_counter()
    report({"phase": "scan", "images_done": 0, "images_total": None})
    decoded = decode_dataset(
        root, params.image_size, settings.max_image_pixels, settings.max_upload_bytes, threads,
        on_progress=lambda done, total: report(
            {"phase": "scan", "images_done": done, "images_total": total}),
        cache=PixelCache(settings.artifacts_dir / "cache" / "pixels", settings.pixel_cache_bytes),
    )
    timings["scan_decode_s"] = round(time.perf_counter() - started, 2)
    n = len(decoded.entries)
    if n < 2:
        raise JobError(
            "no_readable_images",
            f"found {n} readable image(s) in "
            f"{display_name(params.dataset, SHOWN_CHARS, quote=True)}; training needs at least 2 "
            f"({len(decoded.skipped)} file(s) skipped)",
        )

    phase_start = time.perf_counter()
    model_config = ModelConfig(params.architecture, params.image_size, params.embedding_dim)
    train_config = TrainingConfig(params.epochs, params.batch_size, params.learning_rate,
                                  params.val_fraction, params.patience, params.seed)
    staged = stage_images(decoded.images, device)  # on a GPU: copied there once, for every epoch
    try:
        outcome = train_autoencoder(
            staged, model_config, train_config, device,
            on_progress=lambda p: report({"phase": "train", **p}),
            amp_dtype=autocast_dtype(device, settings.precision),
        )
    except FloatingPointError as exc:
        raise JobError("training_diverged", str(exc)) from None
    timings["train_s"] = round(time.perf_counter() - phase_start, 2)

    phase_start = time.perf_counter()
    report({"phase": "embed", "images_done": 0, "images_total": n})
    codes = encode_images(outcome.model, staged, device, precision=settings.precision)
    finite = np.isfinite(codes).all(axis=1)
    if not finite.all():
        raise JobError("embedding_not_finite",
                       f"the model produced NaN/inf embeddings for {int((~finite).sum())} images")
    center = codes.mean(axis=0)
    vectors = normalise(codes, center)
    report({"phase": "embed", "images_done": n, "images_total": n})
    timings["embed_s"] = round(time.perf_counter() - phase_start, 2)

    version = new_version_id()
    lsh = LshParams.for_size(n, params.hash_bits, params.num_tables)
    planes = generate_planes(lsh, vectors.shape[1], params.seed)
    images = [{"image_id": e.image_id, "path": e.path} for e in decoded.entries]
    config = {
        "version": version,
        "model": model_config.to_dict(),
        "embedding_dim": int(vectors.shape[1]),
        "train_params": params.to_dict(),
        "lsh": lsh.to_dict(),
        "dataset_root": str(root),
        "history": outcome.history,
        "best_epoch": outcome.best_epoch,
        "images": n,
        "device": str(device),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    namespace = keys.version_namespace(version)
    # Recorded before anything is written, so a redelivered job can find a half-written version.
    report({"phase": "save", "version": version})
    try:
        phase_start = time.perf_counter()
        try:
            save_version(settings.artifacts_dir, version, outcome.model, config, planes, center,
                         vectors, images)
        except OSError as exc:
            raise JobError("artifacts_write_failed",
                           f"cannot write the model version to {settings.artifacts_dir}: "
                           f"{exc.strerror or exc}") from None
        timings["save_s"] = round(time.perf_counter() - phase_start, 2)

        phase_start = time.perf_counter()
        report({"phase": "index", "images_done": 0, "images_total": n})
        index = LshIndex(client, namespace, planes, vectors)
        index.build(vectors, [{**e, "root": str(root)} for e in images])
        report({"phase": "index", "images_done": n, "images_total": n})
        timings["index_s"] = round(time.perf_counter() - phase_start, 2)

        summary = {
            "version": version, "created_at": config["created_at"], "images": n,
            "embedding_dim": config["embedding_dim"], "architecture": params.architecture,
            "dataset": params.dataset, "lsh": config["lsh"], "train_params": params.to_dict(),
            "final_val_loss": outcome.history[outcome.best_epoch - 1]["val_loss"]
            if outcome.best_epoch else None,
        }
        registry.register(version, summary)
        previous = registry.activate(version)  # the single atomic switch
        if previous and previous != version:  # its tables go after a grace period
            registry.mark_superseded(previous)
    except BaseException:
        delete_namespace(client, namespace)
        registry.forget(version)
        remove_version(settings.artifacts_dir, version)
        raise
    timings["total_s"] = round(time.perf_counter() - started, 2)
    return {
        "version": version,
        "previous_version": previous,
        "dataset": params.dataset,
        "images_indexed": n,
        "skipped_count": len(decoded.skipped),
        "pixel_cache": decoded.cache,
        "skipped": [s.to_dict() for s in decoded.skipped[:1000]],
        "embedding_dim": config["embedding_dim"],
        "architecture": params.architecture,
        "epochs_run": len(outcome.history),
        "best_epoch": outcome.best_epoch,
        "stopped_early": outcome.stopped_early,
        "history": outcome.history,
        "lsh": config["lsh"],
        "device": str(device),
        "timings": timings,
    }

