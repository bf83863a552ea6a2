"""Reader: scan a training folder, decode every image once into a uint8 array, drop duplicates."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.datasets import Candidate, Skipped, iter_dataset
from shared.images import ImageDecodeError, load_for_model, read_file_bytes


@dataclass(frozen=True)
class ImageEntry:
    """One indexed image: content-derived id and path relative to the dataset."""

    image_id: str
    path: str


@dataclass
class DecodedDataset:
    """Pixels ready for the model plus what was kept and what was skipped."""

    root: Path
    images: np.ndarray  # (N, S, S, 3) uint8
    entries: list[ImageEntry]
    skipped: list[Skipped]


def image_id_for(data: bytes) -> str:
    """Content id: the same bytes always get the same id, in every version."""
    return hashlib.sha256(data).hexdigest()[:24]


def _decode_one(candidate: Candidate, size: int, max_pixels: int, max_bytes: int):
    try:
        data = read_file_bytes(candidate.path, max_bytes)
        pixels = load_for_model(data, size, max_pixels)
    except ImageDecodeError as exc:
        return candidate, None, exc.message
    return candidate, image_id_for(data), pixels


def decode_dataset(
    root: Path,
    image_size: int,
    max_pixels: int,
    max_bytes: int,
    threads: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> DecodedDataset:
    """Scan ``root`` and decode every readable image to ``image_size`` squares.

    Args:
        root: resolved dataset folder.
        image_size: model input side.
        max_pixels: per-image pixel cap.
        max_bytes: per-file size cap.
        threads: decode threads (Pillow releases the GIL while decoding).
        on_progress: called with (done, total) while decoding.

    Returns:
        DecodedDataset in scan order; byte-identical files are kept once.
    """
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for item in iter_dataset(root):
        (candidates if isinstance(item, Candidate) else skipped).append(item)
    images = np.empty((len(candidates), image_size, image_size, 3), dtype=np.uint8)
    entries: list[ImageEntry] = []
    first_path: dict[str, str] = {}
    total = len(candidates)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = pool.map(lambda c: _decode_one(c, image_size, max_pixels, max_bytes), candidates)
        for done, (candidate, image_id, payload) in enumerate(results, start=1):
            if image_id is None:
                skipped.append(Skipped(candidate.relpath, payload))
            elif image_id in first_path:
                skipped.append(Skipped(candidate.relpath, f"duplicate of {first_path[image_id]}"))
            else:
                first_path[image_id] = candidate.relpath
                images[len(entries)] = payload
                entries.append(ImageEntry(image_id, candidate.relpath))
            if on_progress and (done % 64 == 0 or done == total):
                on_progress(done, total)
    return DecodedDataset(root, images[: len(entries)].copy(), entries, skipped)
