"""Retrieval quality: per-class hold-out split, precision/mAP at k, and label-free baselines."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

METRICS = ("cosine", "chi2", "euclidean")
# Upper bound on the floats of one (queries x index x dims) block in the chi-square scan.
_CHI2_BLOCK_FLOATS = 4_000_000


def holdout_split(labels: Sequence[str], fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of each class as queries; the rest is what gets indexed.

    Classes are taken in sorted order and each gets its own draw from one generator seeded with
    ``seed``, so the split depends only on the labels, the fraction and the seed. A class holds
    out round(n * fraction) rows, at least one and never all of them (a class of one image is
    indexed, never queried: it could not have a relevant hit).

    Args:
        labels: class of every row.
        fraction: share of each class held out as queries, in [0, 1).
        seed: random seed.

    Returns:
        (index_rows, query_rows): sorted int64 row numbers, disjoint, covering every row.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = np.asarray([str(label) for label in labels])
    rng = np.random.default_rng(seed)
    queries: list[np.ndarray] = []
    for label in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == label)
        wanted = round(len(rows) * fraction)
        take = min(max(wanted, 1), len(rows) - 1) if fraction > 0 and len(rows) >= 2 else 0
        queries.append(rng.permutation(rows)[:take])
    query_rows = np.sort(np.concatenate(queries)) if queries else np.zeros(0, np.int64)
    index_mask = np.ones(len(labels), dtype=bool)
    index_mask[query_rows] = False
    return np.flatnonzero(index_mask).astype(np.int64), query_rows.astype(np.int64)


def relevant_counts(index_labels: Sequence[str], query_labels: Sequence[str]) -> list[int]:
    """How many indexed items share each query's class (R in ``retrieval_metrics``).

    Args:
        index_labels: class of every indexed item.
        query_labels: class of every query.

    Returns:
        One count per query.
    """
    counts = Counter(str(label) for label in index_labels)
    return [counts.get(str(label), 0) for label in query_labels]


def retrieval_metrics(query_labels: Sequence[str], hit_labels: Sequence[Sequence[str]], k: int,
                      relevant_counts: Sequence[int] | None = None) -> dict:
    """Precision@k and mean average precision@k of ranked hits, judged by class labels.

    A hit is relevant when its label equals the query's. For one query with relevance
    rel_1..rel_k of its first k hits (a missing hit counts as not relevant):

    - P@k = (rel_1 + ... + rel_k) / k;
    - AP@k = sum over i <= k of P@i * rel_i, divided by min(k, R), where R is
      ``relevant_counts[q]`` (relevant items in the index) when given, otherwise the number of
      relevant hits among the first k (then AP@k only measures how early they came). AP@k is
      0 when the divisor is 0.

    Both are averaged over the queries; ``per_class`` is P@k averaged over each class's queries.

    Args:
        query_labels: class of each query.
        hit_labels: per query, the classes of its hits, best first.
        k: cut-off (hits beyond k are ignored).
        relevant_counts: per query, the number of indexed items of its class, or None.

    Returns:
        {"k", "queries", "precision_at_k", "map_at_k", "per_class": {label: P@k}}.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(hit_labels) != len(query_labels):
        raise ValueError("need one list of hits per query")
    if relevant_counts is not None and len(relevant_counts) != len(query_labels):
        raise ValueError("need one relevant count per query")
    precisions = np.zeros(len(query_labels))
    average_precisions = np.zeros(len(query_labels))
    ranks = np.arange(1, k + 1)
    for q, (label, hits) in enumerate(zip(query_labels, hit_labels, strict=True)):
        rel = np.zeros(k)
        first = [str(h) == str(label) for h in list(hits)[:k]]
        rel[: len(first)] = first
        precision_at_i = np.cumsum(rel) / ranks
        precisions[q] = rel.sum() / k
        relevant = relevant_counts[q] if relevant_counts is not None else rel.sum()
        divisor = min(k, relevant)
        average_precisions[q] = (precision_at_i * rel).sum() / divisor if divisor > 0 else 0.0
    per_class: dict[str, float] = {}
    labels = np.asarray([str(label) for label in query_labels])
    for label in sorted(set(labels.tolist())):
        per_class[label] = float(precisions[labels == label].mean())
    return {
        "k": k,
        "queries": len(query_labels),
        "precision_at_k": float(precisions.mean()) if len(precisions) else 0.0,
        "map_at_k": float(average_precisions.mean()) if len(average_precisions) else 0.0,
        "per_class": per_class,
    }


def random_precision(index_labels: Sequence[str], query_labels: Sequence[str]) -> float:
    """Expected precision@k of hits drawn at random from the index (any k not above its size).

    Args:
        index_labels: class of every indexed item.
        query_labels: class of each query.

    Returns:
        Mean over the queries of the share of the index that has the query's class.
    """
    if not len(query_labels) or not len(index_labels):
        return 0.0
    counts = relevant_counts(index_labels, query_labels)
    return float(np.mean(counts) / len(index_labels))


def random_hits(n_index: int, n_queries: int, k: int, seed: int = 0) -> np.ndarray:
    """A seeded random ranking: k distinct index rows per query.

    Args:
        n_index: number of indexed items.
        n_queries: number of queries.
        k: hits per query (at most ``n_index``).
        seed: random seed.

    Returns:
        (n_queries, k) int64 row numbers.
    """
    k = min(k, n_index)
    rng = np.random.default_rng(seed)
    # argpartition of uniform keys = a uniform k-subset, in random order, without a Python loop.
    keys = rng.random((n_queries, n_index))
    if k == n_index:
        return np.argsort(keys, axis=1).astype(np.int64)
    return np.argpartition(keys, k - 1, axis=1)[:, :k].astype(np.int64)


def tiny_image_features(images: np.ndarray, side: int = 16) -> np.ndarray:
    """The tiny-image baseline: each image shrunk to ``side`` x ``side`` RGB, centred per image.

    Each vector has its own mean subtracted (brightness drops out), so cosine similarity
    between them compares the layout of colours and shades.

    Args:
        images: (N, S, S, 3) uint8.
        side: side of the tiny image.

    Returns:
        (N, side * side * 3) float32; compare with the "cosine" metric.
    """
    images = np.asarray(images)
    n, size = images.shape[0], images.shape[1]
    if size % side == 0:  # area average by reshaping: the same as a box filter, no loop
        f = size // side
        small = images.reshape(n, side, f, side, f, 3).mean(axis=(2, 4), dtype=np.float32)
    else:
        small = np.stack([
            np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BOX),
                       dtype=np.float32) for img in images
        ]) if n else np.zeros((0, side, side, 3), np.float32)
    flat = small.reshape(n, -1).astype(np.float32)
    return flat - flat.mean(axis=1, keepdims=True)


def colour_histogram_features(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """The colour-histogram baseline: a joint ``bins``^3 RGB histogram, summing to 1.

    Args:
        images: (N, S, S, 3) uint8.
        bins: bins per channel (a divisor of 256).

    Returns:
        (N, bins**3) float32; compare with the "chi2" metric.
    """
    images = np.asarray(images, dtype=np.uint8)
    if 256 % bins:
        raise ValueError("bins must divide 256")
    n = images.shape[0]
    q = (images // (256 // bins)).astype(np.int64)
    cell = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    # One bincount over every image: image i's cells are offset by i * bins^3.
    offsets = (np.arange(n, dtype=np.int64) * bins**3)[:, None, None]
    counts = np.bincount((cell + offsets).ravel(), minlength=n * bins**3)
    hist = counts.reshape(n, bins**3).astype(np.float32)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0)


def _top_k(dist: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k smallest distances per line, ascending; ties go to the lower row."""
    n = dist.shape[1]
    if k < n:
        part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), dist.shape).copy()
    chosen = np.take_along_axis(dist, part, axis=1)
    order = np.lexsort((part, chosen), axis=1)
    return np.take_along_axis(part, order, axis=1)


def nearest(index_feats: np.ndarray, query_feats: np.ndarray, k: int,
            metric: str = "euclidean", block: int = 256) -> np.ndarray:
    """Exact k nearest indexed rows of each query, by blocks of queries.

    Args:
        index_feats: (N, D) features of the indexed items.
        query_feats: (Q, D) features of the queries.
        k: neighbours per query (capped at N).
        metric: "cosine" (largest cosine similarity; zero vectors are never similar),
            "chi2" (smallest sum of (a - b)^2 / (a + b), terms with a + b = 0 count 0; meant
            for non-negative histograms) or "euclidean".
        block: queries per block (the chi-square scan also caps the block's size in floats).

    Returns:
        (Q, min(k, N)) int64 index rows, nearest first.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    x = np.asarray(index_feats, dtype=np.float32)
    queries = np.asarray(query_feats, dtype=np.float32)
    if x.ndim != 2 or queries.ndim != 2 or x.shape[1] != queries.shape[1]:
        raise ValueError("index_feats and query_feats must be (N, D) and (Q, D)")
    k = min(k, x.shape[0])
    out = np.zeros((queries.shape[0], k), dtype=np.int64)
    if k == 0 or queries.shape[0] == 0:
        return out
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    elif metric == "chi2":
        block = max(1, min(block, _CHI2_BLOCK_FLOATS // max(1, x.shape[0] * x.shape[1])))
    sq = (x * x).sum(axis=1)
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block]
        if metric == "cosine":
            dist = -(q @ x.T)
        elif metric == "euclidean":
            dist = sq[None, :] - 2.0 * (q @ x.T)  # |q|^2 is the same for a row: ranks only
        else:
            a, b = q[:, None, :], x[None, :, :]
            total = a + b
            diff = a - b
            dist = np.divide(diff * diff, total, out=np.zeros_like(total),
                             where=total > 0).sum(axis=2)
        out[start : start + len(q)] = _top_k(dist, k)
    return out
