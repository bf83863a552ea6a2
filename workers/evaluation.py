"""The evaluation job: precision/mAP at k of the active model on labelled query images.

Queries go through the product's own pieces (decoder, encoder, the version's LSH tables and
its exact scan); two label-free baselines and a random ranking are scored on the same index
and queries in the same run, so a user sees whether the trained model beats them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis
import torch

from shared.datasets import (
    SHOWN_CHARS,
    DatasetError,
    display_name,
    resolve_dataset,
    resolve_labels_file,
)
from shared.images import ImageDecodeError, load_for_model, read_file_bytes
from shared.jobs import now_iso
from shared.keys import Keys
from shared.labels import LabelResolver, LabelsError, read_labels_csv
from shared.registry import ModelRegistry
from shared.schema import EvaluateParams
from shared.settings import Settings
from workers.embedding import encode_images, normalise
from workers.errors import JobError
from workers.lsh_index import LshIndex
from workers.quality import (
    colour_histogram_features,
    nearest,
    random_hits,
    retrieval_metrics,
    tiny_image_features,
)
from workers.reader import PixelCache, decode_dataset
from workers.search import ActiveModelCache

ProgressFn = Callable[[dict], None]
# The baselines hold every indexed image's pixels and features in memory: beyond this many
# rows they are left out (and the result says so); the model's own figures are always computed.
BASELINE_MAX_ROWS = 200_000
UNLABELLED = ""
# Query images embedded per step (progress is reported after each).
ENCODE_CHUNK = 256


class IndexedImages:
    """The live rows of a version's collection with their files and class labels."""

    def __init__(self, rows: np.ndarray, image_ids: list[str], roots: list[str],
                 paths: list[str], labels: list[str]) -> None:
        self.rows = rows
        self.image_ids = image_ids
        self.roots = roots
        self.paths = paths
        self.labels = labels
        self.position = {int(row): i for i, row in enumerate(rows.tolist())}

    @classmethod
    def load(cls, index: LshIndex, resolver: LabelResolver) -> IndexedImages:
        """Every image in the index's images hash (deleted ones are not in it), by row."""
        raw = index.client.hgetall(index.keys.images)
        items = sorted(((k.decode(), json.loads(v)) for k, v in raw.items()),
                       key=lambda item: int(item[1]["row"]))
        return cls(
            np.asarray([int(e["row"]) for _, e in items], dtype=np.int64),
            [image_id for image_id, _ in items],
            [e["root"] for _, e in items],
            [e["path"] for _, e in items],
            [resolver.label(e["root"], e["path"]) or UNLABELLED for _, e in items],
        )

    def __len__(self) -> int:
        return len(self.rows)


def _some(names: list[str], shown: int = 5) -> str:
    """The first few class names, bounded, for a message."""
    if not names:
        return "none"
    head = ", ".join(display_name(name, 40) for name in names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _resolver(settings: Settings, params: EvaluateParams) -> LabelResolver:
    if not params.labels:
        return LabelResolver()
    try:
        path = resolve_labels_file(settings.data_root, params.labels)
        return LabelResolver(read_labels_csv(path), path.parent)
    except (DatasetError, LabelsError) as exc:
        raise JobError(exc.code, exc.message) from None


def _ranked_labels(neighbours: np.ndarray, query_positions: list[int | None],
                   labels: list[str], k: int) -> list[list[str]]:
    """Labels of each query's first k neighbours, the query's own index row left out."""
    out = []
    for own, row_positions in zip(query_positions, neighbours.tolist(), strict=True):
        kept = [p for p in row_positions if p != own][:k]
        out.append([labels[p] for p in kept])
    return out


def _search_all(index: LshIndex, indexed: IndexedImages, vectors: np.ndarray, k: int,
                query_positions: list[int | None], exact: bool,
                on_done: Callable[[int], None]) -> tuple[list[list[str]], dict]:
    """Every query through ``LshIndex.search``: the exact scan, or forced through the tables;
    ``on_done`` hears how many are done (every 64)."""
    hits: list[list[str]] = []
    methods: Counter[str] = Counter()
    candidates = 0
    started = time.perf_counter()
    for vector, own in zip(vectors, query_positions, strict=True):
        # Asking for the version's probe depth forces the LSH path even on a small collection.
        found = index.search(vector, k + 1, exact=exact,
                             probes=None if exact else index.default_probes)
        methods[found.method] += 1
        candidates += found.candidates
        positions = [indexed.position.get(int(r)) for r in found.rows.tolist()]
        kept = [p for p in positions if p is not None and p != own][:k]
        hits.append([indexed.labels[p] for p in kept])
        if len(hits) % 64 == 0 or len(hits) == len(vectors):
            on_done(len(hits))
    seconds = time.perf_counter() - started
    return hits, {"methods": dict(methods),
                  "mean_candidates": round(candidates / max(len(vectors), 1), 1),
                  "mean_query_ms": round(seconds * 1000 / max(len(vectors), 1), 3)}


def _indexed_pixels(settings: Settings, indexed: IndexedImages, size: int, threads: int,
                    cache: PixelCache) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of every indexed image at the model's input size, for the baselines.

    A whole dataset folder is decoded through the pixel cache (a hit after its training);
    rows not found there (added uploads, files from other folders) are decoded one by one.

    Returns:
        (images (M, S, S, 3) uint8, positions (M,) into ``indexed``): rows whose file is gone
        or unreadable are left out.
    """
    images = np.zeros((len(indexed), size, size, 3), dtype=np.uint8)
    found = np.zeros(len(indexed), dtype=bool)
    by_root: dict[str, list[int]] = {}
    for pos, root in enumerate(indexed.roots):
        by_root.setdefault(root, []).append(pos)
    missing: list[int] = []
    for root, positions in by_root.items():
        if len(positions) < 64 or not Path(root).is_dir():  # a few uploads: one by one
            missing += positions
            continue
        decoded = decode_dataset(Path(root), size, settings.max_image_pixels,
                                 settings.max_upload_bytes, threads, cache=cache)
        where = {e.image_id: i for i, e in enumerate(decoded.entries)}
        for pos in positions:
            i = where.get(indexed.image_ids[pos])
            if i is None:
                missing.append(pos)
            else:
                images[pos] = decoded.images[i]
                found[pos] = True

    def decode_one(pos: int) -> tuple[int, np.ndarray | None]:
        try:
            data = read_file_bytes(Path(indexed.roots[pos]) / indexed.paths[pos],
                                   settings.max_upload_bytes)
            return pos, load_for_model(data, size, settings.max_image_pixels)
        except (ImageDecodeError, OSError):
            return pos, None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for pos, pixels in pool.map(decode_one, missing):
            if pixels is not None:
                images[pos] = pixels
                found[pos] = True
    positions = np.flatnonzero(found)
    return images[positions], positions


def _baselines(settings: Settings, indexed: IndexedImages, query_images: np.ndarray,
               query_labels: list[str], query_ids: list[str], k: int, size: int, threads: int,
               cache: PixelCache) -> dict:
    """Random ranking, tiny 16x16 image (centred cosine), 8x8x8 colour histogram (chi-square)."""
    n = len(indexed)
    own = [indexed.position.get(r) for r in _rows_of(indexed, query_ids)]
    counts = Counter(indexed.labels)
    relevant = [counts[label] - (1 if pos is not None else 0)
                for label, pos in zip(query_labels, own, strict=True)]
    draws = random_hits(n, len(query_labels), k + 1, seed=0)
    out = {"random": retrieval_metrics(
        query_labels, _ranked_labels(draws, own, indexed.labels, k), k, relevant)}
    if n > BASELINE_MAX_ROWS:
        reason = f"{n:,} indexed images is above the {BASELINE_MAX_ROWS:,} the baselines handle"
        out["tiny_image"] = out["colour_histogram"] = {"skipped": reason}
        return out
    images, positions = _indexed_pixels(settings, indexed, size, threads, cache)
    labels = [indexed.labels[p] for p in positions.tolist()]
    own_in_subset = {int(p): i for i, p in enumerate(positions.tolist())}
    own_sub = [own_in_subset.get(p) if p is not None else None for p in own]
    sub_counts = Counter(labels)
    sub_relevant = [sub_counts[label] - (1 if pos is not None else 0)
                    for label, pos in zip(query_labels, own_sub, strict=True)]
    for name, features, metric in (
        ("tiny_image", tiny_image_features, "cosine"),
        ("colour_histogram", colour_histogram_features, "chi2"),
    ):
        neighbours = nearest(features(images), features(query_images), k + 1, metric)
        figures = retrieval_metrics(query_labels, _ranked_labels(neighbours, own_sub, labels, k),
                                    k, sub_relevant)
        if len(positions) < n:
            figures["indexed_images_scored"] = len(positions)
        out[name] = figures
    return out


def _rows_of(indexed: IndexedImages, image_ids: list[str]) -> list[int | None]:
    row_of = dict(zip(indexed.image_ids, indexed.rows.tolist(), strict=True))
    return [row_of.get(i) for i in image_ids]


def run_evaluation(settings: Settings, client: redis.Redis, cache: ActiveModelCache,
                   params: EvaluateParams, device: torch.device, report: ProgressFn,
                   threads: int = 2) -> dict:
    """Score the active model on labelled query images and store the figures with it.

    A query image that is itself in the index (same bytes) never counts itself as a hit, so
    evaluating on the indexed folder is a leave-one-out measurement.

    Args:
        settings: service settings.
        client: Redis.
        cache: this process's active-model cache.
        params: dataset of query images, optional labels file, k.
        device: torch device.
        report: progress sink.
        threads: decode threads.

    Returns:
        {"model_version", "dataset", "labels", "k", "queries", "queries_in_index",
        "skipped_unlabelled", "indexed", "exact", "lsh", "baselines", "query_path",
        "timings", "evaluated_at"}: each of exact / lsh / baselines.* holds
        precision_at_k, map_at_k and per_class.

    Raises:
        JobError: no active model, bad folder or labels, no labelled query, index too small.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    version, index = cache.get()
    try:
        root = resolve_dataset(settings.data_root, params.dataset)
    except DatasetError as exc:
        raise JobError(exc.code, exc.message) from None
    resolver = _resolver(settings, params)
    k = params.k
    size = version.model_config.image_size
    pixel_cache = PixelCache(settings.artifacts_dir / "cache" / "pixels",
                             settings.pixel_cache_bytes)

    report({"phase": "scan", "images_done": 0, "images_total": None})
    decoded = decode_dataset(
        root, size, settings.max_image_pixels, settings.max_upload_bytes, threads,
        on_progress=lambda done, total: report(
            {"phase": "scan", "images_done": done, "images_total": total}),
        cache=pixel_cache,
    )
    labelled = [(i, resolver.label(root, e.path)) for i, e in enumerate(decoded.entries)]
    kept = [(i, label) for i, label in labelled if label]
    if not kept:
        raise JobError("no_labelled_images",
                       f"no image in {display_name(params.dataset, SHOWN_CHARS, quote=True)} "
                       "has a class: put them in one folder per "
                       "class, or name a labels CSV (path,class)")
    query_rows = np.asarray([i for i, _ in kept], dtype=np.int64)
    query_labels = [label for _, label in kept]
    query_ids = [decoded.entries[i].image_id for i in query_rows.tolist()]
    timings["scan_decode_s"] = round(time.perf_counter() - started, 2)

    index.sync()
    indexed = IndexedImages.load(index, resolver)
    if len(indexed) < k + 1:
        raise JobError("index_too_small",
                       f"the active version holds {len(indexed)} images; evaluating at k={k} "
                       f"needs at least {k + 1}")
    own = [indexed.position.get(r) if r is not None else None
           for r in _rows_of(indexed, query_ids)]
    counts = Counter(indexed.labels)
    relevant = [counts[label] - (1 if pos is not None else 0)
                for label, pos in zip(query_labels, own, strict=True)]
    # A query whose class no other indexed image has cannot be scored (it would count as 0 and
    # drag the figures down: e.g. a folder evaluated one level too high, where every query's
    # class is the dataset's own name). Leave those out, say so, and refuse when none is left.
    scorable = [i for i, count in enumerate(relevant) if count > 0]
    unmatched = sorted({query_labels[i] for i, count in enumerate(relevant) if count <= 0})
    if not scorable:
        raise JobError("no_matching_classes",
                       f"no query image has a class that other indexed images share (query "
                       f"classes: {_some(unmatched)}; indexed classes: "
                       f"{_some(sorted(set(counts) - {UNLABELLED}))}): evaluate a folder with "
                       "the same class folders as the index, or name a labels CSV")
    skipped_no_match = len(query_rows) - len(scorable)
    query_rows = query_rows[scorable]
    query_labels = [query_labels[i] for i in scorable]
    query_ids = [query_ids[i] for i in scorable]
    own = [own[i] for i in scorable]
    relevant = [relevant[i] for i in scorable]

    phase = time.perf_counter()
    report({"phase": "embed", "images_done": 0, "images_total": len(query_rows)})
    query_images = np.asarray(decoded.images[query_rows])
    chunks = []
    for start in range(0, len(query_images), ENCODE_CHUNK):
        chunks.append(encode_images(version.model, query_images[start : start + ENCODE_CHUNK],
                                    device, precision=settings.precision))
        report({"phase": "embed", "images_done": start + len(chunks[-1]),
                "images_total": len(query_rows)})
    vectors = normalise(np.concatenate(chunks), version.center)
    report({"phase": "embed", "images_done": len(query_rows), "images_total": len(query_rows)})
    timings["embed_s"] = round(time.perf_counter() - phase, 2)

    phase = time.perf_counter()
    searches = 2 * len(query_rows)  # every query exactly, then through the tables
    report({"phase": "search", "images_done": 0, "images_total": searches})
    exact_hits, exact_info = _search_all(
        index, indexed, vectors, k, own, exact=True,
        on_done=lambda done: report({"phase": "search", "images_done": done,
                                     "images_total": searches}))
    lsh_hits, lsh_info = _search_all(
        index, indexed, vectors, k, own, exact=False,
        on_done=lambda done: report({"phase": "search", "images_done": len(query_rows) + done,
                                     "images_total": searches}))
    exact = {**retrieval_metrics(query_labels, exact_hits, k, relevant), **exact_info}
    lsh = {**retrieval_metrics(query_labels, lsh_hits, k, relevant), **lsh_info,
           "probes": index.default_probes}
    timings["search_s"] = round(time.perf_counter() - phase, 2)

    phase = time.perf_counter()
    report({"phase": "baselines", "images_done": 0, "images_total": len(indexed)})
    baselines = _baselines(settings, indexed, query_images, query_labels, query_ids, k, size,
                           threads, pixel_cache)
    report({"phase": "baselines", "images_done": len(indexed), "images_total": len(indexed)})
    timings["baselines_s"] = round(time.perf_counter() - phase, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)

    plain = ("exact" if indexed and index.alive_rows < index.exact_below else "lsh")
    quality = {
        "model_version": version.version,
        "dataset": params.dataset,
        "labels": params.labels,
        "k": k,
        "queries": len(query_rows),
        "queries_in_index": sum(pos is not None for pos in own),
        "skipped_unlabelled": len(labelled) - len(kept),
        "skipped_no_match": skipped_no_match,
        "unmatched_classes": unmatched[:20],
        "skipped_files": len(decoded.skipped),
        "indexed": len(indexed),
        "exact": exact,
        "lsh": lsh,
        "baselines": baselines,
        # What a plain query (no options) uses on this collection, so the figure that applies
        # to users is clear: below IMGSIM_LSH_MIN_ROWS it is the exact scan.
        "query_path": plain,
        "evaluated_at": now_iso(),
        "timings": timings,
    }
    stored = ModelRegistry(client, Keys(settings.key_prefix)).set_quality(version.version,
                                                                          quality)
    return {**quality, "stored_with_model": stored}
