"""Retrieval-quality helpers on tiny cases whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from workers.quality import (
    colour_histogram_features,
    holdout_split,
    nearest,
    random_hits,
    random_precision,
    relevant_counts,
    retrieval_metrics,
    tiny_image_features,
)


def test_holdout_split_per_class_deterministic_and_disjoint():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    index_rows, query_rows = holdout_split(labels, 0.2, seed=3)
    # a: round(2.0) = 2, b: round(1.0) = 1, c: a single image is never held out.
    assert [labels[r] for r in query_rows].count("a") == 2
    assert [labels[r] for r in query_rows].count("b") == 1
    assert 15 in index_rows and 15 not in query_rows
    assert sorted(np.concatenate([index_rows, query_rows]).tolist()) == list(range(16))
    assert not set(index_rows.tolist()) & set(query_rows.tolist())
    again = holdout_split(labels, 0.2, seed=3)
    assert np.array_equal(again[0], index_rows) and np.array_equal(again[1], query_rows)
    other = [holdout_split(labels, 0.2, seed=s)[1].tolist() for s in range(6)]
    assert len({tuple(o) for o in other}) > 1  # the seed matters


def test_holdout_split_keeps_one_in_the_index_and_one_query_per_class():
    index_rows, query_rows = holdout_split(["x", "x", "y", "y", "y"], 0.9)
    assert [r for r in query_rows if r < 2] and [r for r in index_rows if r < 2]
    assert len(query_rows) == 1 + 2  # x: min(2, 2 - 1) = 1; y: round(2.7) = 3 -> capped at 2
    assert holdout_split(["x", "y"], 0.0)[1].size == 0
    with pytest.raises(ValueError):
        holdout_split(["x"], 1.0)


def test_retrieval_metrics_by_hand():
    # q0 (a): hits a b a -> P@3 = 2/3; with R = 4: AP@3 = (1/1 + 2/3) / min(3, 4) = 5/9.
    # q1 (b): hits a a b -> P@3 = 1/3; with R = 1: AP@3 = (1/3) / 1 = 1/3.
    queries = ["a", "b"]
    hits = [["a", "b", "a"], ["a", "a", "b"]]
    m = retrieval_metrics(queries, hits, 3, relevant_counts=[4, 1])
    assert m["k"] == 3 and m["queries"] == 2
    assert m["precision_at_k"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["map_at_k"] == pytest.approx((5 / 9 + 1 / 3) / 2)
    assert m["per_class"] == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    # Without R the divisor is the relevant hits found: q0 (1 + 2/3) / 2, q1 (1/3) / 1.
    m = retrieval_metrics(queries, hits, 3)
    assert m["map_at_k"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)


def test_retrieval_metrics_cutoff_missing_hits_and_no_relevant():
    m = retrieval_metrics(["a"], [["a", "a", "b", "a"]], 2, relevant_counts=[10])
    assert m["precision_at_k"] == 1.0 and m["map_at_k"] == 1.0
    m = retrieval_metrics(["a"], [["a"]], 4, relevant_counts=[2])  # short list: misses count 0
    assert m["precision_at_k"] == 0.25 and m["map_at_k"] == pytest.approx(1 / 2)
    m = retrieval_metrics(["a"], [["b", "c"]], 2)
    assert m["precision_at_k"] == 0.0 and m["map_at_k"] == 0.0
    with pytest.raises(ValueError):
        retrieval_metrics(["a"], [["a"], ["b"]], 1)


def test_relevant_counts_and_random_baseline():
    index_labels = ["a", "a", "a", "b"]
    assert relevant_counts(index_labels, ["a", "b", "c"]) == [3, 1, 0]
    assert random_precision(index_labels, ["a", "b"]) == pytest.approx((3 / 4 + 1 / 4) / 2)
    hits = random_hits(50, 200, 10, seed=1)
    assert hits.shape == (200, 10)
    assert all(len(set(row)) == 10 for row in hits.tolist())
    assert hits.min() >= 0 and hits.max() < 50
    assert np.array_equal(hits, random_hits(50, 200, 10, seed=1))
    # Rows 0..9 of 50 are "a": a random draw finds about 20 % of them.
    labels = ["a" if i < 10 else "b" for i in range(50)]
    p = retrieval_metrics(["a"] * 200, [[labels[r] for r in row] for row in hits], 10)
    assert 0.15 < p["precision_at_k"] < 0.25


def test_nearest_each_metric_by_hand():
    index = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=np.float32)
    query = np.array([[2.0, 0.1], [0.1, 0.1]], dtype=np.float32)
    # Euclidean from (2, .1): rows 0 (1.0), 2 (~3.1), 1 (~2.2) -> 0, 1, 2.
    assert nearest(index, query, 3, "euclidean").tolist()[0] == [0, 1, 2]
    # Cosine ignores length: (.1, .1) points like (3, 3); (2, .1) is closest to (1, 0).
    assert nearest(index, query, 1, "cosine").tolist() == [[0], [2]]
    # Chi-square on histograms: q = (.5, .5, 0); rows (1, 0, 0): .25/1.5 + .5 = 2/3,
    # (.5, .25, .25): 0 + .0625/.75 + .25 = 1/3, (0, 0, 1): .5 + .5 + 1 = 2.
    hist = np.array([[1, 0, 0], [0.5, 0.25, 0.25], [0, 0, 1]], dtype=np.float32)
    assert nearest(hist, np.array([[0.5, 0.5, 0]]), 3, "chi2").tolist() == [[1, 0, 2]]
    # Ties go to the lower row; k beyond N is capped; blocks give the same answer.
    same = np.ones((4, 2), dtype=np.float32)
    assert nearest(same, same[:1], 9, "euclidean").tolist() == [[0, 1, 2, 3]]
    rng = np.random.default_rng(0)
    x, q = rng.random((40, 5)), rng.random((13, 5))
    for metric in ("cosine", "chi2", "euclidean"):
        assert np.array_equal(nearest(x, q, 7, metric, block=3), nearest(x, q, 7, metric))
    with pytest.raises(ValueError):
        nearest(x, q, 3, "manhattan")


def test_nearest_euclidean_matches_brute_force():
    rng = np.random.default_rng(1)
    x, q = rng.standard_normal((100, 8)), rng.standard_normal((20, 8))
    full = np.argsort(((q[:, None, :] - x[None]) ** 2).sum(axis=2), axis=1)[:, :5]
    assert np.array_equal(nearest(x, q, 5, "euclidean"), full)


def test_tiny_image_features_average_and_centre():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[0, :16] = 200  # top half bright
    images[1] = 90        # flat: nothing left once centred
    f = tiny_image_features(images)
    assert f.shape == (2, 16 * 16 * 3)
    tiny = f[0].reshape(16, 16, 3)
    assert tiny[:8].ravel() == pytest.approx([100.0] * 384)   # 200 - mean 100
    assert tiny[8:].ravel() == pytest.approx([-100.0] * 384)
    assert np.allclose(f[1], 0.0)
    odd = tiny_image_features(np.full((1, 24, 24, 3), 7, dtype=np.uint8))  # not a multiple
    assert odd.shape == (1, 768) and np.allclose(odd, 0.0)


def test_colour_histogram_features_counts_joint_bins():
    images = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    images[0, 0, 0] = (255, 0, 0)    # bin (7, 0, 0) = 7 * 64 = 448
    images[0, 0, 1] = (31, 32, 224)  # bin (0, 1, 7) = 8 + 7 = 15
    h = colour_histogram_features(images)
    assert h.shape == (2, 512) and np.allclose(h.sum(axis=1), 1.0)
    assert h[0, 448] == 0.25 and h[0, 15] == 0.25 and h[0, 0] == 0.5
    assert h[1, 0] == 1.0
