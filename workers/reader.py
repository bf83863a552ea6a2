"""Reader: scan a training folder, decode every image once into a uint8 array, drop duplicates.

Decoded pixels are kept in a memory-mapped cache under the artifacts folder, keyed by the
dataset's file list and file stats plus everything that decides the pixels (image size, caps,
decoder code and library versions), so later jobs on an unchanged folder skip decoding.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import features

import shared.images
from shared.datasets import Candidate, Skipped, iter_dataset
from shared.images import ImageDecodeError, load_for_model, read_file_bytes

log = logging.getLogger(__name__)

# Bump when this module changes what pixels, ids or skip reasons come out of a file.
DECODER_VERSION = 1
PIXELS = "pixels.npy"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ImageEntry:
    """One indexed image: content-derived id and path relative to the dataset."""

    image_id: str
    path: str


@dataclass
class DecodedDataset:
    """Pixels ready for the model plus what was kept and what was skipped."""

    root: Path
    images: np.ndarray  # (N, S, S, 3) uint8; a read-only memmap when it came from the cache
    entries: list[ImageEntry]
    skipped: list[Skipped]
    cache: str = "off"  # "hit", "stored", "not_stored" (see PixelCache) or "off"


def image_id_for(data: bytes) -> str:
    """Content id: the same bytes always get the same id, in every version."""
    return hashlib.sha256(data).hexdigest()[:24]


@functools.cache
def decoder_fingerprint() -> str:
    """Everything besides the files that decides the decoded pixels, as one string.

    The decoding module's source, Pillow's version, its JPEG library and the optional format
    plugins: a change to any of them changes the key, so no cache entry outlives its decoder.
    """
    digest = hashlib.sha256(Path(shared.images.__file__).read_bytes()).hexdigest()[:16]
    try:
        jpeg = features.version("jpg") or "none"
    except (ValueError, KeyError):  # older Pillow without this feature name
        jpeg = "unknown"
    optional = ",".join(sorted(shared.images.OPTIONAL_READABLE))
    return (f"reader{DECODER_VERSION}:images-{digest}:pillow-{PIL.__version__}:jpeg-{jpeg}:"
            f"webp-{shared.images.WEBP_SUPPORTED}:plugins-{optional}")


def _decode_one(candidate: Candidate, size: int, max_pixels: int, max_bytes: int):
    try:
        data = read_file_bytes(candidate.path, max_bytes)
        pixels = load_for_model(data, size, max_pixels)
    except ImageDecodeError as exc:
        return candidate, None, exc.message
    return candidate, image_id_for(data), pixels


class PixelCache:
    """Decoded datasets on disk, one folder per key: ``pixels.npy`` (uint8) + ``manifest.json``.

    Entries are written to a staging folder and renamed into place, so a reader only ever sees
    complete ones; hits are memory-mapped read-only, so several jobs share one copy through the
    page cache. The least recently used entries are removed beyond ``max_bytes``.

    Args:
        folder: where entries live (``<artifacts>/cache/pixels``).
        max_bytes: size budget of all entries together; 0 disables the cache.
        settle_s: a file changed less than this long before the scan makes the entry
            "not_stored": a rewrite within the file system's timestamp granularity could keep
            its size and times, and such an entry might later serve the old pixels.
    """

    def __init__(self, folder: Path, max_bytes: int, settle_s: float = 2.0) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.settle_s = settle_s

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def key_for(self, root: Path, candidates: list[Candidate], stats: list[os.stat_result],
                image_size: int, max_pixels: int, max_bytes: int) -> str:
        """Hash of the file list with sizes, times and inodes, and of the decoding settings."""
        digest = hashlib.sha256()
        digest.update(json.dumps([decoder_fingerprint(), str(root), image_size, max_pixels,
                                  max_bytes]).encode())
        for candidate, st in zip(candidates, stats, strict=True):
            digest.update(json.dumps([candidate.relpath, st.st_size, st.st_mtime_ns,
                                      st.st_ctime_ns, st.st_ino, st.st_dev]).encode())
        return digest.hexdigest()[:40]

    def load(self, key: str, image_size: int) -> tuple[np.ndarray, list[ImageEntry],
                                                       list[Skipped]] | None:
        """The entry for ``key`` (pixels memory-mapped), or None when absent or unusable."""
        entry = self.folder / key
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            pixels = np.load(entry / PIXELS, mmap_mode="r")
        except (OSError, ValueError) as exc:
            if entry.exists():
                log.warning("pixel cache entry %s unreadable (%s); decoding again", key, exc)
                shutil.rmtree(entry, ignore_errors=True)
            return None
        expected = (len(manifest.get("entries", [])), image_size, image_size, 3)
        if manifest.get("key") != key or pixels.dtype != np.uint8 or pixels.shape != expected:
            log.warning("pixel cache entry %s does not match its manifest; decoding again", key)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):  # a read-only or full disk still serves the hit
            os.utime(entry / MANIFEST)  # recently used: pruned last
        entries = [ImageEntry(image_id, path) for image_id, path in manifest["entries"]]
        skipped = [Skipped(path, reason) for path, reason in manifest["skipped"]]
        return pixels, entries, skipped

    def store(self, key: str, images: np.ndarray, entries: list[ImageEntry],
              skipped: list[Skipped]) -> bool:
        """Write an entry atomically; False when it would not fit or the disk refused it."""
        if images.nbytes > self.max_bytes:
            return False
        staging = self.folder / f".partial-{key}-{uuid.uuid4().hex[:8]}"
        final = self.folder / key
        try:
            staging.mkdir(parents=True)
            np.save(staging / PIXELS, np.ascontiguousarray(images, dtype=np.uint8))
            manifest = {
                "key": key, "decoder": decoder_fingerprint(), "created_at": time.time(),
                "entries": [[e.image_id, e.path] for e in entries],
                "skipped": [[s.relpath, s.reason] for s in skipped],
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False))
            for name in (PIXELS, MANIFEST):  # complete on disk before it becomes visible
                with open(staging / name, "rb") as handle:
                    os.fsync(handle.fileno())
            os.rename(staging, final)
        except OSError as exc:
            # Another job stored the same key first (rename onto a non-empty folder fails), or
            # the disk is full: the cache is an optimisation, the job goes on without it.
            shutil.rmtree(staging, ignore_errors=True)
            if not (final / MANIFEST).exists():
                log.warning("pixel cache entry %s not stored: %s", key, exc)
                return False
        self.prune(keep=key)
        return True

    def prune(self, keep: str | None = None) -> None:
        """Remove least recently used entries beyond the budget, and stale staging folders."""
        try:
            children = list(self.folder.iterdir())
        except OSError:
            return
        now = time.time()
        sized: list[tuple[float, int, Path]] = []
        for child in children:
            try:
                if child.name.startswith(".partial-"):
                    if now - child.stat().st_mtime > 3600:  # left by a killed writer
                        shutil.rmtree(child, ignore_errors=True)
                    continue
                used = (child / MANIFEST).stat().st_mtime
                size = sum(f.stat().st_size for f in child.iterdir())
            except OSError:
                continue
            sized.append((used, size, child))
        total = sum(size for _, size, _ in sized)
        for _used, size, child in sorted(sized):
            if total <= self.max_bytes:
                break
            if child.name == keep:
                continue
            # Unlinking is safe for a job that has it memory-mapped: its pages stay readable.
            shutil.rmtree(child, ignore_errors=True)
            total -= size


def _stat_all(candidates: list[Candidate]) -> list[os.stat_result] | None:
    stats = []
    for candidate in candidates:
        try:
            stats.append(os.stat(candidate.path))
        except OSError:  # vanished or unreadable: decoding will say why; nothing to key on
            return None
    return stats


def decode_dataset(
    root: Path,
    image_size: int,
    max_pixels: int,
    max_bytes: int,
    threads: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
    cache: PixelCache | None = None,
) -> DecodedDataset:
    """Scan ``root`` and decode every readable image to ``image_size`` squares.

    Args:
        root: resolved dataset folder.
        image_size: model input side.
        max_pixels: per-image pixel cap.
        max_bytes: per-file size cap.
        threads: decode threads (Pillow releases the GIL while decoding).
        on_progress: called with (done, total) while decoding.
        cache: decoded-pixel cache to read and fill; None decodes every time.

    Returns:
        DecodedDataset in scan order; byte-identical files are kept once.
    """
    scan_started_ns = time.time_ns()
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for item in iter_dataset(root):
        (candidates if isinstance(item, Candidate) else skipped).append(item)
    total = len(candidates)
    key = None
    stats = _stat_all(candidates) if cache is not None and cache.enabled else None
    if stats is not None:
        key = cache.key_for(root, candidates, stats, image_size, max_pixels, max_bytes)
        found = cache.load(key, image_size)
        if found is not None:
            pixels, entries, decode_skipped = found
            if on_progress:
                on_progress(total, total)
            return DecodedDataset(root, pixels, entries, skipped + decode_skipped, "hit")

    images = np.empty((len(candidates), image_size, image_size, 3), dtype=np.uint8)
    entries: list[ImageEntry] = []
    decode_skipped: list[Skipped] = []
    first_path: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = pool.map(lambda c: _decode_one(c, image_size, max_pixels, max_bytes), candidates)
        for done, (candidate, image_id, payload) in enumerate(results, start=1):
            if image_id is None:
                decode_skipped.append(Skipped(candidate.relpath, payload))
            elif image_id in first_path:
                decode_skipped.append(
                    Skipped(candidate.relpath, f"duplicate of {first_path[image_id]}"))
            else:
                first_path[image_id] = candidate.relpath
                images[len(entries)] = payload
                entries.append(ImageEntry(image_id, candidate.relpath))
            if on_progress and (done % 64 == 0 or done == total):
                on_progress(done, total)
    images = images[: len(entries)].copy()
    status = "off"
    if key is not None:
        # Stats were taken before reading, so a file changed since gets a new key next time;
        # only a change too recent for the timestamps to tell apart could go unseen.
        settle_ns = int(cache.settle_s * 1e9)
        newest = max((max(st.st_mtime_ns, st.st_ctime_ns) for st in stats), default=0)
        racy = newest > scan_started_ns - settle_ns
        stored = not racy and cache.store(key, images, entries, decode_skipped)
        status = "stored" if stored else "not_stored"
    return DecodedDataset(root, images, entries, skipped + decode_skipped, status)


def stage_images(images: np.ndarray, device) -> np.ndarray:
    """Where training reads batches from: the host array, or one uint8 copy on the GPU.

    On CUDA the whole uint8 set goes to device memory once (2,399 images at 64 px are 29 MB),
    so an epoch does no host-to-device copies; when it would take more than a quarter of the
    free memory, batches are copied from pinned host memory instead.

    Args:
        images: (N, S, S, 3) uint8.
        device: the torch device of the model.

    Returns:
        ``images`` itself on CPU, else a torch uint8 tensor on ``device`` (or ``images``).
    """
    if getattr(device, "type", "cpu") != "cuda":
        return images
    import torch  # workers only; the reader's decoding half stays importable without torch

    free, _total = torch.cuda.mem_get_info(device)
    if images.nbytes > free // 4:
        return images
    host = np.require(images, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])  # copies a memmap
    return torch.from_numpy(host).pin_memory().to(device)
