"""The MANIFEST.tsv embedding rows (vec_*.npy) and lshashpy3's Redis pitfalls, on a real Redis."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.conftest import FIXTURES
from workers.lsh_index import LshIndex, LshParams, generate_planes

DIM = 64


def _vector_rows() -> dict[str, dict[str, str]]:
    with (FIXTURES / "MANIFEST.tsv").open(encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {row["file"]: row for row in rows if row["file"].endswith(".npy")}


ROWS = _vector_rows()


def _unit(rng, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def base(redis_client, key_prefix):
    """An index of 40 random unit vectors in its own namespace."""
    rng = np.random.default_rng(3)
    vectors = _unit(rng, 40)
    planes = generate_planes(LshParams(hash_bits=4, num_tables=6), DIM, seed=1)
    index = LshIndex(redis_client, f"{key_prefix}:{{vtest}}", planes, vectors)
    index.index_batch(range(len(vectors)), vectors)
    return index, vectors, planes


def _namespace_keys(redis_client, index) -> int:
    return sum(1 for _ in redis_client.scan_iter(match=f"{index.namespace}:*"))


def test_every_vector_row_is_covered():
    assert set(ROWS) == {"vec_float32_d64.npy", "vec_nan_d64.npy", "vec_zero_d64.npy",
                         "vec_wrong_dim_d63.npy"}


def test_float32_vector_is_indexed_and_found_with_plain_python_numbers(base, redis_client):
    index, vectors, planes = base
    point = np.load(FIXTURES / "vec_float32_d64.npy")
    assert point.dtype == np.float32 and point.shape == (DIM,)
    unit = point / np.linalg.norm(point)
    grown = LshIndex(redis_client, index.namespace, planes, np.vstack([vectors, unit[None]]))
    grown.index(unit, extra_data=len(vectors))
    hits = grown.query(unit, num_results=3)
    assert hits[0][0] == len(vectors) and hits[0][1] < 1e-5
    assert all(type(row) is int and type(dist) is float for row, dist in hits)
    json.dumps(hits)  # what a task returns must be JSON as is
    # Same answer as an exact scan (what dict storage would give): storage does not matter.
    exact = grown.search(unit, 3, exact=True)
    assert [r for r, _ in hits] == exact.rows.tolist()


def test_nan_vector_is_refused_before_anything_is_stored(base, redis_client):
    index, _, _ = base
    point = np.load(FIXTURES / "vec_nan_d64.npy")
    assert np.isnan(point).any()
    before = _namespace_keys(redis_client, index)
    members_before = sum(redis_client.scard(k) for k in redis_client.scan_iter(
        match=f"{index.namespace}:*"))
    with pytest.raises(ValueError, match="NaN"):
        index.index(point, extra_data=99)
    with pytest.raises(ValueError, match="NaN"):
        index.index_batch([99, 100], np.vstack([np.ones(DIM, np.float32), point]))
    with pytest.raises(ValueError, match="NaN"):
        index.search(point, 5)
    assert _namespace_keys(redis_client, index) == before
    assert sum(redis_client.scard(k) for k in redis_client.scan_iter(
        match=f"{index.namespace}:*")) == members_before
    assert not any(b"99" in redis_client.smembers(k)
                   for k in redis_client.scan_iter(match=f"{index.namespace}:*"))


def test_zero_vector_never_yields_nan_distances(base, redis_client):
    index, vectors, planes = base
    zero = np.load(FIXTURES / "vec_zero_d64.npy")
    assert not zero.any()
    grown = LshIndex(redis_client, index.namespace, planes, np.vstack([vectors, zero[None]]))
    grown.index(zero, extra_data=len(vectors))
    for query in (zero, vectors[0]):
        found = grown.search(query, 10)
        assert len(found.rows) == 10
        assert np.isfinite(found.distances).all()
        scores = 1.0 - found.distances ** 2 / 2.0  # what the query result reports
        assert np.isfinite(scores).all()
    # The zero vector is its own nearest neighbour (distance 0), ranked without NaN.
    assert grown.search(zero, 1).rows.tolist() == [len(vectors)]


def test_wrong_dimension_is_a_clear_mismatch_error(base):
    index, _, _ = base
    point = np.load(FIXTURES / "vec_wrong_dim_d63.npy")
    assert point.shape == (63,)
    for call in (lambda: index.index(point, extra_data=1),
                 lambda: index.search(point, 3),
                 lambda: index.query(point)):
        with pytest.raises(ValueError, match="model/index dimension mismatch"):
            call()


def test_a_new_model_dimension_gets_its_own_versioned_index(redis_client, key_prefix):
    """Planes live with the model version, so a 63-d model builds a separate 63-d index."""
    rng = np.random.default_rng(5)
    old = LshIndex(redis_client, f"{key_prefix}:{{v1}}", generate_planes(LshParams(3, 2), 64, 0),
                   _unit(rng, 5))
    new_vectors = _unit(rng, 5, 63)
    new = LshIndex(redis_client, f"{key_prefix}:{{v2}}", generate_planes(LshParams(3, 2), 63, 0),
                   new_vectors)
    new.index_batch(range(5), new_vectors)
    assert new.search(new_vectors[2], 1).rows.tolist() == [2]
    with pytest.raises(ValueError, match="mismatch"):
        old.search(new_vectors[2], 1)


def test_row_id_zero_round_trips(base):
    """lshashpy3's ``if extra_data:`` dropped id 0; the wrapper keeps it."""
    index, vectors, _ = base
    hits = index.query(vectors[0], num_results=1)
    assert hits[0][0] == 0
    with pytest.raises(ValueError):
        index.index(vectors[0])  # no row id at all is refused, never stored as None


def test_more_tables_than_redis_databases_stay_in_one_database(redis_client, key_prefix):
    rng = np.random.default_rng(9)
    vectors = _unit(rng, 12)
    index = LshIndex(redis_client, f"{key_prefix}:{{wide}}",
                     generate_planes(LshParams(hash_bits=3, num_tables=20), DIM, 2), vectors)
    index.index_batch(range(12), vectors)
    tables = {k.decode().split(":")[2] for k in redis_client.scan_iter(
        match=f"{index.namespace}:*")}
    assert tables == {f"t{i}" for i in range(20)}
    assert index.search(vectors[4], 1).rows.tolist() == [4]


def test_empty_buckets_fall_back_to_exact_and_short_indexes_answer_what_they_hold(
        redis_client, key_prefix):
    rng = np.random.default_rng(11)
    vectors = _unit(rng, 6)
    # 24 bits per table: six items almost surely sit alone in their buckets.
    index = LshIndex(redis_client, f"{key_prefix}:{{sparse}}",
                     generate_planes(LshParams(hash_bits=24, num_tables=1), DIM, 4), vectors)
    index.index_batch(range(6), vectors)
    found = index.search(_unit(rng, 1)[0], 5)
    assert found.method == "exact_fallback" and len(found.rows) == 5
    assert len(index.search(vectors[1], 50).rows) == 6
    empty = LshIndex(redis_client, f"{key_prefix}:{{none}}",
                     generate_planes(LshParams(4, 2), DIM, 4), np.zeros((0, DIM), np.float32))
    assert empty.search(vectors[0], 5).rows.tolist() == []
